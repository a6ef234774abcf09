"""The ``pmf.pt`` file: its one writer (:func:`save_pmf`) beside its one reader (:func:`load_pmf`, in
:mod:`openmm_cgflow_plugin.pmf`).

A ``pmf.pt`` is a TorchScript module (the file contract):

* ``forward(s)``: ``s`` [N, d] CG coordinates (radians for dihedrals, IUPAC/mdtraj sign; nm otherwise)
  -> ensemble-mean PMF [N] in kT, same dtype as ``s``;
* ``mean_and_spread(s)`` -> (mean [N], standard deviation over the ensemble [N]), both kT;
* attributes ``cg_names: List[str]``, ``periodic: List[bool]``, ``temperature: float`` (K),
  ``cg_atoms: List[List[int]]`` (0-based atom quadruple per dihedral CG coordinate; empty otherwise),
  ``metadata: str`` (JSON) and ``cg_ranges: List[List[float]]`` ((lo, hi) per coordinate where the PMF was
  learned; [-pi, pi] for dihedrals).

The sampler fits any scriptable model with ``forward`` and ``mean_and_spread`` of that shape and hands
it to :func:`save_pmf` with a :class:`~openmm_cgflow_plugin.cgspace.CGSpace`; the file layout is known
here only. (No ``from __future__ import annotations`` here: TorchScript reads the class annotations.)
"""

import json
import math
import os
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .cgspace import CGSpace
from .files import atomic_write

__all__ = ["PMFModule", "save_pmf", "FORMAT_VERSION"]

#: Version of the pmf.pt layout written by :func:`save_pmf`.
FORMAT_VERSION = 2


class PMFModule(nn.Module):
    """The TorchScript module stored in ``pmf.pt``: a fitted model plus the contract's metadata."""

    cg_names: List[str]
    periodic: List[bool]
    temperature: float
    cg_atoms: List[List[int]]
    cg_ranges: List[List[float]]
    metadata: str

    def __init__(self, model: nn.Module, cgspace: CGSpace, ranges: Sequence[Sequence[float]], metadata: str):
        super().__init__()
        self.model = model
        self.cg_names = list(cgspace.names)
        self.periodic = list(cgspace.periodic)
        self.temperature = float(cgspace.temperature)
        self.cg_atoms = [list(q) for q in cgspace.atoms]
        self.cg_ranges = [[float(lo), float(hi)] for lo, hi in ranges]
        self.metadata = metadata

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Ensemble-mean PMF [N] in kT at s [N, d] (dtype of s)."""
        return self.model.mean_and_spread(s)[0]

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean [N], spread [N]) in kT at s [N, d]."""
        return self.model.mean_and_spread(s)


def save_pmf(model: nn.Module, path, cgspace: CGSpace, ranges: Optional[Sequence[Sequence[float]]] = None,
             metadata: Optional[dict] = None) -> str:
    """Write ``model`` as a TorchScript ``pmf.pt`` at ``path`` (atomically) and return the path.

    Args:
        model: scriptable ``nn.Module`` with ``mean_and_spread(s [N, d]) -> (mean [N], std [N])`` in kT,
            computing in the dtype of ``s``; it is not modified (a float64 copy is stored).
        path: output file.
        cgspace: the CG coordinates (names, periodicity, temperature K, atom quadruples).
        ranges: (lo, hi) per coordinate where the PMF is meaningful (plots, grids); default [-pi, pi]
            for periodic coordinates, and required for the others.
        metadata: JSON-serialisable extras (stored in the ``metadata`` string with the format version).
    Raises ValueError for a model that does not evaluate to [N] finite values at the origin.
    """
    if not isinstance(cgspace, CGSpace):
        raise TypeError(f"cgspace must be a CGSpace, got {type(cgspace).__name__}")
    if ranges is None:
        if not cgspace.all_periodic:
            raise ValueError(f"ranges are required for non-periodic CG coordinates ({cgspace.names})")
        ranges = [(-math.pi, math.pi)] * cgspace.d
    ranges = [(float(lo), float(hi)) for lo, hi in ranges]
    if len(ranges) != cgspace.d or any(not (math.isfinite(lo) and math.isfinite(hi) and hi > lo) for lo, hi in ranges):
        raise ValueError(f"ranges must be one finite (lo, hi) with hi > lo per CG coordinate, got {ranges}")
    import copy

    inner = copy.deepcopy(model).to(torch.float64).eval()
    for p in inner.parameters():
        p.requires_grad_(False)
    meta = dict(metadata or {})
    meta.update({"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "energy_unit": "kT"})
    module = PMFModule(inner, cgspace, ranges, json.dumps(meta))
    with torch.no_grad():
        probe = torch.zeros(2, cgspace.d, dtype=torch.float64)
        mean, spread = module.mean_and_spread(probe)
    if tuple(mean.shape) != (2,) or tuple(spread.shape) != (2,):
        raise ValueError(f"the model's mean_and_spread must return two [N] tensors for [N, d] input, got "
                         f"{tuple(mean.shape)} and {tuple(spread.shape)}")
    scripted = torch.jit.script(module)
    path = os.fspath(path)
    with atomic_write(path) as fh:
        torch.jit.save(scripted, fh)
    return path
