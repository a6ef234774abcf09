"""Load and inspect an exported PMF ensemble (``pmf.pt``): the reader beside the one writer
(:func:`~openmm_cgflow_plugin.pmf_file.save_pmf`).

A ``pmf.pt`` is a TorchScript module (the file contract of design.md):

* ``forward(s)``: ``s`` [N, d] CG coordinates (radians for dihedrals, IUPAC/mdtraj sign; nm for other
  coordinates such as Mueller-Brown's s = x - y) -> ensemble-mean PMF [N] in kT, same dtype as ``s``;
* ``mean_and_spread(s)`` -> (mean [N], standard deviation over the ensemble [N]), both in kT;
* attributes ``cg_names: List[str]``, ``periodic: List[bool]``, ``temperature: float`` (K) and
  ``cg_atoms: List[List[int]]`` (0-based atom quadruple of each dihedral CG coordinate; empty otherwise);
  optionally ``metadata: str`` (JSON) and ``cg_ranges: List[List[float]]`` ((lo, hi) per coordinate,
  written by ``save_pmf``). Older files (attributes directly on the module, no ``cg_ranges``) load too.

:func:`load_pmf` checks all of this and returns a :class:`PMF`, a thin wrapper that evaluates the module
on NumPy arrays or tensors and carries the :class:`~openmm_cgflow_plugin.cgspace.CGSpace`. This module
imports torch, openmm (units) and numpy only.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence, Union

import numpy as np
import openmm.unit as unit
import torch

from .cgspace import CGSpace, kT_kJmol

__all__ = ["PMF", "load_pmf", "check_temperature"]

#: Relative tolerance when comparing a requested temperature with the file's.
TEMPERATURE_RTOL = 1e-6
_REQUIRED_ATTRIBUTES = ("cg_names", "periodic", "temperature", "cg_atoms")


def _kelvin(temperature) -> float:
    if unit.is_quantity(temperature):
        temperature = temperature.value_in_unit(unit.kelvin)
    return float(temperature)


class PMF:
    """A loaded ``pmf.pt``.

    Attributes:
        module: the TorchScript module (``torch.jit.ScriptModule``).
        path: the file it came from (None when built from a module).
        cg_names, periodic, cg_atoms: as in the file; ``n_cg`` = d.
        temperature: K; ``kT``: kJ/mol at that temperature.
        cg_ranges: (lo, hi) per coordinate from the file's ``cg_ranges`` (None for older files).
        cgspace: the :class:`~openmm_cgflow_plugin.cgspace.CGSpace` (names, periodic, temperature, atoms).
        metadata: dict parsed from the module's ``metadata`` JSON string (empty if absent).
    """

    def __init__(self, module, path: Optional[str] = None):
        self.module = module
        self.path = path
        self.cg_names = [str(n) for n in module.cg_names]
        self.periodic = [bool(p) for p in module.periodic]
        self.temperature = float(getattr(module, "temperature", 0.0))
        self.cg_atoms = [[int(i) for i in q] for q in getattr(module, "cg_atoms", [])]
        ranges = getattr(module, "cg_ranges", None)
        self.cg_ranges = None if ranges is None else [(float(lo), float(hi)) for lo, hi in ranges]
        meta = getattr(module, "metadata", "{}")
        try:
            self.metadata = json.loads(meta) if isinstance(meta, str) else {}
        except ValueError:
            self.metadata = {}

    @property
    def n_cg(self) -> int:
        return len(self.cg_names)

    @property
    def cgspace(self) -> CGSpace:
        """The CG space of this PMF (raises ValueError for inconsistent metadata)."""
        return CGSpace(self.cg_names, self.periodic, self.temperature, self.cg_atoms)

    @property
    def kT(self) -> float:
        """kT in kJ/mol at the file's temperature."""
        return kT_kJmol(self.temperature)

    def _tensor(self, s) -> torch.Tensor:
        if isinstance(s, torch.Tensor):
            x = s.detach()
        else:
            x = torch.as_tensor(np.asarray(s, dtype=np.float64))
        if x.dim() == 1 and self.n_cg == 1:
            x = x[:, None]
        elif x.dim() == 1 and x.shape[0] == self.n_cg:
            x = x[None, :]
        if x.dim() != 2 or x.shape[1] != self.n_cg:
            raise ValueError(f"CG coordinates must have shape [N, {self.n_cg}] for this PMF "
                             f"({', '.join(self.cg_names)}), got {tuple(x.shape)}")
        return x

    def mean(self, s) -> np.ndarray:
        """Ensemble-mean PMF [N] in kT at CG coordinates ``s`` [N, d] (float64 NumPy)."""
        with torch.no_grad():
            return self.module(self._tensor(s)).double().cpu().numpy()

    __call__ = mean

    def mean_and_spread(self, s):
        """(mean [N], spread [N]) in kT at ``s`` [N, d], as float64 NumPy arrays."""
        with torch.no_grad():
            m, sd = self.module.mean_and_spread(self._tensor(s))
        return m.double().cpu().numpy(), sd.double().cpu().numpy()

    def grid(self, n: int = 100, ranges: Optional[Sequence[tuple]] = None):
        """Mean and spread on a regular grid of bin centres.

        Returns (centres: list of [n] arrays, mean, spread) with mean/spread shaped [n] * d (axis k =
        coordinate k). Periodic axes span [-pi, pi); others need ``ranges`` (or use :meth:`default_range`).
        """
        ranges = list(ranges) if ranges is not None else [self.default_range(k) for k in range(self.n_cg)]
        centres = []
        for lo, hi in ranges:
            e = np.linspace(lo, hi, n + 1)
            centres.append(0.5 * (e[:-1] + e[1:]))
        mesh = np.meshgrid(*centres, indexing="ij")
        pts = np.stack([m.ravel() for m in mesh], axis=1)
        mean, spread = [], []
        for i in range(0, len(pts), 65536):
            m, sd = self.mean_and_spread(pts[i:i + 65536])
            mean.append(m)
            spread.append(sd)
        shape = [n] * self.n_cg
        return centres, np.concatenate(mean).reshape(shape), np.concatenate(spread).reshape(shape)

    def default_range(self, k: int) -> tuple:
        """Plot/grid range (lo, hi) of coordinate k: the file's ``cg_ranges`` entry when it has one, else
        [-pi, pi) (radians) for periodic coordinates, else (-pi, pi) as a last resort."""
        if self.cg_ranges is not None and k < len(self.cg_ranges):
            return tuple(self.cg_ranges[k])
        return (-math.pi, math.pi)

    def __repr__(self) -> str:
        return (f"PMF(path={self.path!r}, cg_names={self.cg_names}, periodic={self.periodic}, "
                f"temperature={self.temperature} K, cg_atoms={self.cg_atoms})")


def _check_expected(pmf: PMF, expected_cg, where: str) -> None:
    if expected_cg is None:
        return
    if isinstance(expected_cg, (int, np.integer)):
        if int(expected_cg) != pmf.n_cg:
            raise ValueError(f"CG dimension mismatch: {where} has {pmf.n_cg} CG coordinates "
                             f"({', '.join(pmf.cg_names)}) but {int(expected_cg)} were expected")
        return
    expected = list(expected_cg)
    if len(expected) != pmf.n_cg:
        raise ValueError(f"CG dimension mismatch: {where} has {pmf.n_cg} CG coordinates "
                         f"({', '.join(pmf.cg_names)}) but {len(expected)} were expected ({expected})")
    if all(isinstance(e, str) for e in expected):
        if expected != pmf.cg_names:
            raise ValueError(f"CG coordinate mismatch: {where} has {pmf.cg_names}, expected {expected}")
    else:
        quads = [[int(i) for i in q] for q in expected]
        if pmf.cg_atoms and quads != pmf.cg_atoms:
            raise ValueError(f"CG atom mismatch: {where} has dihedrals {pmf.cg_atoms}, expected {quads}")


def check_temperature(pmf: PMF, temperature, where: str = "the PMF") -> None:
    """Raise ValueError if ``temperature`` (K or Quantity; None = no check) differs from the PMF's."""
    if temperature is None:
        return
    t = _kelvin(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive number of kelvin, got {temperature!r}")
    if abs(t - pmf.temperature) > TEMPERATURE_RTOL * pmf.temperature:
        raise ValueError(
            f"temperature mismatch: {where} was computed at {pmf.temperature:g} K (its energies are in kT at that "
            f"temperature) but {t:g} K was requested. A PMF is temperature dependent: learn one at {t:g} K, or "
            f"run at {pmf.temperature:g} K.")


def load_pmf(path: Union[str, os.PathLike, "PMF", torch.nn.Module], expected_cg=None, temperature=None) -> PMF:
    """Load and validate a ``pmf.pt``.

    Args:
        path: file path (or an already loaded :class:`PMF` / TorchScript module following the contract).
        expected_cg: optional check of the CG coordinates: their number (int), their names (list of str)
            or their atom quadruples (list of 4-lists).
        temperature: optional K (number or Quantity) the caller will simulate at; must equal the file's.
    Raises FileNotFoundError for a missing file and ValueError (with the reason) for a file that is not a
    TorchScript PMF, lacks contract attributes or methods, gives wrong shapes/non-finite values, or does
    not match ``expected_cg`` / ``temperature``.
    """
    if isinstance(path, PMF):
        pmf, where = path, (path.path or "the PMF")
    else:
        if isinstance(path, torch.nn.Module):
            module, where, file = path, "the PMF module", None
        else:
            file = os.fspath(path)
            where = f"PMF file {file}"
            if not os.path.exists(file):
                raise FileNotFoundError(f"PMF file not found: {file}")
            if os.path.isdir(file):
                raise ValueError(f"{file} is a directory; give the pmf.pt file inside it")
            try:
                module = torch.jit.load(file, map_location="cpu")
            except Exception as exc:  # torch raises RuntimeError / ValueError / zipfile errors
                raise ValueError(f"{where} could not be loaded as a TorchScript PMF (corrupt, truncated or not a "
                                 f"pmf.pt written by save_pmf): {type(exc).__name__}: {exc}") from exc
        missing = [a for a in _REQUIRED_ATTRIBUTES if not hasattr(module, a)]
        if not hasattr(module, "mean_and_spread"):
            missing.append("mean_and_spread()")
        if missing:
            raise ValueError(f"{where} is not a PMF ensemble per the pmf.pt contract: missing {', '.join(missing)}")
        try:
            pmf = PMF(module, file)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} has malformed metadata attributes: {exc}") from exc
        module.eval()
        if pmf.n_cg < 1 or len(pmf.periodic) != pmf.n_cg:
            raise ValueError(f"{where}: cg_names {pmf.cg_names} and periodic {pmf.periodic} disagree in length")
        if pmf.cg_atoms and (len(pmf.cg_atoms) != pmf.n_cg or any(len(q) != 4 for q in pmf.cg_atoms)):
            raise ValueError(f"{where}: cg_atoms {pmf.cg_atoms} must be one atom quadruple per CG coordinate")
        if not (math.isfinite(pmf.temperature) and pmf.temperature > 0):
            raise ValueError(f"{where}: temperature {pmf.temperature} K is not a positive number")
        if pmf.cg_ranges is not None and (len(pmf.cg_ranges) != pmf.n_cg
                                          or any(not hi > lo for lo, hi in pmf.cg_ranges)):
            raise ValueError(f"{where}: cg_ranges {pmf.cg_ranges} must be one (lo, hi) with hi > lo per CG coordinate")
        try:
            pmf.cgspace
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        probe = torch.zeros(3, pmf.n_cg, dtype=torch.float64)
        try:
            with torch.no_grad():
                out = module(probe)
                m, sd = module.mean_and_spread(probe)
        except Exception as exc:
            raise ValueError(f"{where}: evaluating the PMF on [3, {pmf.n_cg}] inputs failed: {exc}") from exc
        if tuple(out.shape) != (3,) or tuple(m.shape) != (3,) or tuple(sd.shape) != (3,):
            raise ValueError(f"{where}: forward/mean_and_spread must return [N] tensors for [N, d] inputs, got "
                             f"{tuple(out.shape)}, {tuple(m.shape)}, {tuple(sd.shape)}")
        if not (torch.isfinite(out).all() and torch.isfinite(sd).all()):
            raise ValueError(f"{where}: the PMF is not finite at s = 0")
    _check_expected(pmf, expected_cg, where)
    check_temperature(pmf, temperature, where)
    return pmf
