"""CG frames to backmap: arrays of CG coordinates, CG-reporter files and all-atom trajectories.

Every input becomes a :class:`CGFrames`, one row per (time, walker), with periodic CG coordinates wrapped
into [-pi, pi) by the plugin's one angle wrap (:func:`openmm_cgflow_plugin.cgspace.wrap_periodic`).

Units: s in radians for dihedrals (mdtraj/IUPAC sign), nm otherwise; positions nm; time ps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from openmm_cgflow_plugin.cgspace import wrap_periodic
from openmm_cgflow_plugin.reporter import read_cg_npz

__all__ = ["ARRAY_FORMATS", "CGFrames", "cg_frames", "load_cg", "md_topology", "check_cg_values", "OutsideDomainError"]

#: Extensions read as arrays of CG coordinates by :func:`load_cg` (anything else goes to mdtraj).
ARRAY_FORMATS = (".npz", ".npy", ".txt", ".dat", ".csv")
#: Periodic CG values with |s| above 2 pi + this (radians) are taken for degrees (radians in [0, 2 pi) are
#: accepted and wrapped; degrees of any real dihedral trajectory exceed 2 pi somewhere).
DEGREES_TOLERANCE = 1e-3


class OutsideDomainError(ValueError):
    """CG values outside the domain a PMF / flow was trained on (non-periodic coordinates)."""


def check_cg_values(s, periodic, domain=None, names=None, what: str = "CG coordinates") -> None:
    """Refuse CG values that would be silently wrong: degrees given for periodic (radian) coordinates, and
    values of non-periodic coordinates outside ``domain``.

    Args:
        s: [F, d] CG values (radians for periodic coordinates, nm otherwise).
        periodic: [d] bools.
        domain: None, or one (lo, hi) pair per *non-periodic* coordinate, in order (as
            ``LearnerSettings.domain``), or one pair per coordinate (entries of periodic ones are ignored).
        names: optional [d] coordinate names for the messages.
    Raises ValueError naming the coordinate, the offending value and the fix (``np.radians``), or
    :class:`OutsideDomainError` for values outside the domain.
    """
    s = np.asarray(s, dtype=np.float64).reshape(-1, len(periodic))
    names = list(names) if names is not None else [f"coordinate {k}" for k in range(len(periodic))]
    for k, per in enumerate(periodic):
        if per and len(s):
            big = np.abs(s[:, k])
            if big.max() > 2 * np.pi + DEGREES_TOLERANCE:
                row = int(np.argmax(big))
                raise ValueError(
                    f"{what}: {names[k]} reaches {s[row, k]:.4g} (row {row}), beyond 2 pi: it looks like degrees, "
                    "but periodic CG coordinates are in radians; convert with np.radians(...)")
    if domain is None or not len(s):
        return
    pairs = list(domain)
    free = [k for k, per in enumerate(periodic) if not per]
    if len(pairs) == len(periodic) and len(pairs) != len(free):
        pairs = [pairs[k] for k in free]
    for k, (lo, hi) in zip(free, pairs):
        lo, hi = float(lo), float(hi)
        tol = 1e-9 * max(1.0, abs(lo), abs(hi))
        out = (s[:, k] < lo - tol) | (s[:, k] > hi + tol)
        if out.any():
            row = int(np.argmax(out))
            raise OutsideDomainError(
                f"{what}: {names[k]} = {s[row, k]:.6g} (row {row}; {int(out.sum())} value(s) in all) lies outside "
                f"the domain [{lo:g}, {hi:g}] of this CG coordinate")


@dataclass
class CGFrames:
    """CG frames to backmap, flattened to one row per (time, walker).

    s: [F, n_cg] float64 (radians for periodic dims, wrapped to [-pi, pi); nm otherwise).
    frame: [F] time index of each row in the input. walker: [F] walker index (0 for a single trajectory).
    time_ps: [F] simulation time of each row (ps) or None when the input has none.
    """

    s: np.ndarray
    frame: np.ndarray
    walker: np.ndarray
    time_ps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.s)


def md_topology(cgsystem):
    """The system's topology as an ``mdtraj.Topology``."""
    import mdtraj as md

    return md.Topology.from_openmm(cgsystem.topology)


def _cg_of_positions(cgsystem, xyz_nm: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """CG coordinates [B, n_cg] of positions [B, n_atoms, 3] nm, in chunks."""
    out = [cgsystem.cg_of(xyz_nm[i : i + chunk]) for i in range(0, len(xyz_nm), chunk)]
    return np.concatenate(out) if out else np.zeros((0, cgsystem.n_cg))


def _single_trajectory(s: np.ndarray, cgsystem, time_ps=None) -> CGFrames:
    return CGFrames(wrap_periodic(s, cgsystem.cg_periodic), np.arange(len(s)), np.zeros(len(s), np.int64), time_ps)


def cg_frames(cg, cgsystem, time_ps=None) -> CGFrames:
    """CG frames from an array of s ([F, n_cg], [F, walkers, n_cg], or [F] when n_cg = 1), an
    ``mdtraj.Trajectory`` of the whole molecule (its s is computed), a :class:`CGFrames`, or a file path
    (see :func:`load_cg`). ``time_ps`` [F]: optional time of each input frame (ps). Raises ValueError for
    wrong shapes, non-finite values and periodic values that look like degrees (|s| > 2 pi; see
    :func:`check_cg_values`); values in [0, 2 pi) are taken as radians and wrapped."""
    if isinstance(cg, CGFrames):
        return cg
    if isinstance(cg, (str, os.PathLike)):
        return load_cg(cg, cgsystem)
    try:
        import mdtraj as md

        if isinstance(cg, md.Trajectory):
            if cg.n_atoms != cgsystem.n_atoms:
                raise ValueError(f"the trajectory has {cg.n_atoms} atoms, the model's system {cgsystem.n_atoms}")
            s = _cg_of_positions(cgsystem, cg.xyz.astype(np.float64))
            t = None if cg.time is None else np.asarray(cg.time, dtype=np.float64)
            return _single_trajectory(s, cgsystem, t)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cg, torch.Tensor):
        cg = cg.detach().cpu().numpy()
    s = np.asarray(cg, dtype=np.float64)
    d = cgsystem.n_cg
    if s.ndim == 1:
        s = s.reshape(-1, 1) if d == 1 else s.reshape(1, -1)
    if s.ndim == 2:
        n_t, n_w = s.shape[0], 1
    elif s.ndim == 3:
        n_t, n_w = s.shape[0], s.shape[1]
    else:
        raise ValueError(f"CG coordinates must have shape [frames, {d}] or [frames, walkers, {d}], got {s.shape}")
    if s.shape[-1] != d:
        raise ValueError(
            f"CG coordinates have {s.shape[-1]} components per frame but the model has {d} "
            f"({', '.join(cgsystem.cg_names)}); expected shape [frames, {d}] or [frames, walkers, {d}]"
        )
    s = s.reshape(-1, d)
    bad = ~np.isfinite(s).all(axis=1)
    if bad.any():
        raise ValueError(f"CG coordinates contain NaN or inf in {int(bad.sum())} frame(s), e.g. row {int(np.argmax(bad))}")
    check_cg_values(s, cgsystem.cg_periodic, names=cgsystem.cg_names)  # degrees given for radians
    frame = np.repeat(np.arange(n_t), n_w)
    walker = np.tile(np.arange(n_w), n_t)
    t = None
    if time_ps is not None:
        time_ps = np.asarray(time_ps, dtype=np.float64).reshape(-1)
        if len(time_ps) != n_t:
            raise ValueError(f"time_ps has {len(time_ps)} entries for {n_t} frames")
        t = time_ps[frame]
    return CGFrames(wrap_periodic(s, cgsystem.cg_periodic), frame, walker, t)


def _read_npz(path: str):
    """(s, time_ps or None) from a CG-reporter ``.npz`` (closed, or left chunked by a crashed run: the
    plugin's :func:`~openmm_cgflow_plugin.reporter.read_cg_npz` reads both)."""
    data = read_cg_npz(path)
    if "s" not in data:
        raise ValueError(f"{path} has no array 's' of CG coordinates (keys: {sorted(data.keys())})")
    return data["s"], data.get("time_ps")


def load_cg(path, cgsystem, chunk: int = 10000) -> CGFrames:
    """CG frames from a file.

    * ``.npz``: key ``s`` ([frames, walkers, d] from the plugin's CG reporter, also a chunked file left by a
      crashed run, or [frames, d]); ``time_ps`` [frames] is used when present.
    * ``.npy``, ``.txt``/``.dat``/``.csv`` (whitespace or comma separated): an array of s [frames, d].
    * anything else: an all-atom trajectory read by mdtraj (DCD, XTC, HDF5, PDB, ...), chunk by chunk; the
      model's topology is used for formats without one. Its CG coordinates are computed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CG file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        s, t = _read_npz(path)
        if t is not None and (s.ndim < 2 or len(np.asarray(t).reshape(-1)) != s.shape[0]):
            t = None
        return cg_frames(s, cgsystem, time_ps=t)
    if ext == ".npy":
        return cg_frames(np.load(path, allow_pickle=False), cgsystem)
    if ext in (".txt", ".dat", ".csv"):
        try:
            s = np.loadtxt(path, delimiter="," if ext == ".csv" else None, ndmin=2)
        except ValueError as exc:
            raise ValueError(f"could not read CG coordinates from {path}: {exc}") from exc
        if cgsystem.n_cg == 1 and s.shape[1] != 1 and s.shape[0] == 1:
            s = s.T
        return cg_frames(s, cgsystem)
    import mdtraj as md

    top = md_topology(cgsystem)
    needs_top = ext not in (".pdb", ".h5", ".pdb.gz", ".cif", ".mol2", ".gro")
    s_parts, t_parts = [], []
    try:
        it = md.iterload(path, top=top, chunk=chunk) if needs_top else md.iterload(path, chunk=chunk)
        for traj in it:
            if traj.n_atoms != cgsystem.n_atoms:
                raise ValueError(f"{path} has {traj.n_atoms} atoms; the model's system has {cgsystem.n_atoms}")
            s_parts.append(_cg_of_positions(cgsystem, traj.xyz.astype(np.float64)))
            t_parts.append(np.asarray(traj.time, dtype=np.float64))
    except (OSError, IOError, TypeError, KeyError) as exc:
        raise ValueError(f"could not read {path} as a CG array (.npz/.npy/.txt) or an all-atom trajectory: {exc}") from exc
    s = np.concatenate(s_parts) if s_parts else np.zeros((0, cgsystem.n_cg))
    t = np.concatenate(t_parts) if t_parts else None
    return _single_trajectory(s, cgsystem, t)
