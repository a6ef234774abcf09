"""Backmapping to files: an all-atom trajectory plus its importance weights, streamed chunk by chunk.

:func:`backmap_file` runs :func:`openmm_cgflow.backmapping.iter_backmap` and appends each chunk to a
:class:`TrajectoryWriter` (DCD, XTC, HDF5 or PDB through mdtraj), so memory stays bounded for any number
of CG frames (only the per-sample weights, a few tens of bytes each, are kept until the end). Both the
trajectory (temporary name, renamed on success) and the weights ``.npz`` (the plugin's
:func:`~openmm_cgflow_plugin.files.atomic_write`) appear complete or not at all.

Units: positions nm, time ps, log weights natural log (kT units), temperature K.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from openmm_cgflow_plugin.files import AtomicPath, atomic_write

from .backmapping import BackmapOptions, iter_chunks, resolve_inputs
from .cg_input import md_topology

__all__ = ["OUTPUT_FORMATS", "BackmapSummary", "TrajectoryWriter", "backmap_file"]

#: Output formats written by :class:`TrajectoryWriter` (by file extension).
OUTPUT_FORMATS = (".dcd", ".xtc", ".h5", ".pdb")


class TrajectoryWriter:
    """Append frames to a DCD, XTC, HDF5 (.h5, needs PyTables) or multi-model PDB file through mdtraj.

    Written to a temporary file beside ``path`` and renamed to ``path`` by :meth:`close` (a crash never leaves a
    truncated file under the final name). Positions in nm; ``time_ps`` is stored where the format has it
    (HDF5, XTC). Precision: DCD and HDF5 store float32 (CG dihedrals of the written structures within
    ~1e-6 rad of the input s); PDB keeps 0.001 A and XTC 0.001 nm (lossy, ~1e-3 to 1e-2 rad in the
    dihedrals): use DCD or HDF5 where the exact CG coordinates matter.
    """

    def __init__(self, path, topology):
        import mdtraj as md

        self.path = os.fspath(path)
        self.ext = os.path.splitext(self.path)[1].lower()
        if self.ext not in OUTPUT_FORMATS:
            raise ValueError(f"cannot write {self.path!r}: output format must be one of {', '.join(OUTPUT_FORMATS)}")
        if self.ext == ".h5":
            try:
                import tables  # noqa: F401
            except ImportError:
                raise ImportError("writing HDF5 (.h5) trajectories needs PyTables: pip install tables "
                                  "(or write .dcd/.xtc/.pdb)") from None
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"output directory does not exist: {directory}")
        self.topology = topology
        self._target = AtomicPath(self.path)
        self._tmp = self._target.tmp
        self.n_frames = 0
        fmt = md.formats
        if self.ext == ".dcd":
            self._file = fmt.DCDTrajectoryFile(self._tmp, "w", force_overwrite=True)
        elif self.ext == ".xtc":
            self._file = fmt.XTCTrajectoryFile(self._tmp, "w", force_overwrite=True)
        elif self.ext == ".h5":
            self._file = fmt.HDF5TrajectoryFile(self._tmp, "w", force_overwrite=True)
            self._file.topology = topology
        else:
            self._file = fmt.PDBTrajectoryFile(self._tmp, "w", force_overwrite=True)

    def write(self, xyz_nm: np.ndarray, time_ps: np.ndarray | None = None) -> None:
        """Append frames xyz_nm [B, n_atoms, 3] (nm)."""
        xyz = np.asarray(xyz_nm, dtype=np.float32)
        if len(xyz) == 0:
            return
        t = None if time_ps is None else np.asarray(time_ps, dtype=np.float32)
        if self.ext == ".dcd":
            self._file.write(xyz * 10.0)
        elif self.ext == ".xtc":
            self._file.write(xyz, time=t, step=np.arange(self.n_frames, self.n_frames + len(xyz), dtype=np.int32))
        elif self.ext == ".h5":
            self._file.write(coordinates=xyz, time=t)
        else:
            for k, pos in enumerate(xyz):
                self._file.write(pos * 10.0, self.topology, modelIndex=self.n_frames + k + 1)
        self.n_frames += len(xyz)

    def close(self, commit: bool = True) -> None:
        """Close the file; rename it to its final name (``commit``) or delete it."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if commit:
            self._target.commit()
        else:
            self._target.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(commit=exc_type is None)


@dataclass
class BackmapSummary:
    """What :func:`backmap_file` wrote. Paths, counts, ESS statistics and speed (frames/s of CG input)."""

    out_path: str
    weights_path: str
    topology_path: str | None
    n_frames: int
    n_per_frame: int
    n_drawn: int
    n_written: int
    n_wrong_chirality: int
    n_nonfinite: int
    n_empty_frames: int
    mean_frame_ess: float
    wall_s: float
    extra: dict = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return self.n_frames / self.wall_s if self.wall_s > 0 else float("nan")

    def __str__(self) -> str:
        lines = [
            f"backmapped {self.n_frames} CG frames x {self.n_per_frame} samples in {self.wall_s:.1f} s "
            f"({self.frames_per_s:.1f} frames/s)",
            f"wrote {self.n_written} all-atom frames to {self.out_path}",
            f"weights (log_weights normalised per CG frame, index, s) in {self.weights_path}",
        ]
        if self.topology_path:
            lines.append(f"topology (first sample) in {self.topology_path}")
        lines.append(
            f"wrong chirality: {self.n_wrong_chirality} of {self.n_drawn} samples "
            f"({100.0 * self.n_wrong_chirality / max(self.n_drawn, 1):.2f} %, "
            f"{'kept with weight 0' if self.extra.get('keep_wrong_chirality') else 'dropped'}); "
            f"non-finite dropped: {self.n_nonfinite}; frames without a usable sample: {self.n_empty_frames}"
        )
        if self.n_per_frame > 1:
            lines.append(f"mean ESS per CG frame: {self.mean_frame_ess:.2f} of {self.n_per_frame}")
        return "\n".join(lines)


def backmap_file(run_dir_or_model_path, cg_file, out_path, options: BackmapOptions | None = None, *,
                 bridge=None, **settings) -> BackmapSummary:
    """Backmap a CG file to an all-atom trajectory file, streaming chunk by chunk (bounded memory).

    Args:
        run_dir_or_model_path: a run directory (its ``flow.pt``), a model file written by
            :func:`openmm_cgflow.model_io.save_model`, or a ``(flow, cgsystem)`` pair.
        cg_file: CG frames (see :func:`openmm_cgflow.cg_input.load_cg`): ``.npz`` with ``s``
            [frames, walkers, d] from the CG reporter, ``.npy``/``.txt`` arrays of s [frames, d], or an
            all-atom trajectory mdtraj reads (the model's topology is used where the format has none). An
            array is accepted too.
        out_path: ``.dcd``, ``.xtc``, ``.h5`` or ``.pdb`` (by extension). Samples of one CG frame are
            consecutive, frames in input order (rows of [frames, walkers] flattened time-major).
        options / settings: a :class:`~openmm_cgflow.backmapping.BackmapOptions` and overrides of its
            fields (``n_per_frame``, ``seed``, ``keep_wrong_chirality``, ``n_workers``, ``batch_size``,
            ``align``, ``proposal_scale``, ``proposal_mix``, ``allow_outside_domain``, ``progress``; here
            ``progress`` defaults to True).
        bridge: energy evaluation (default: an EnergyBridge with ``n_workers`` workers).
    Writes ``out_path`` and ``out_path + '.weights.npz'`` with, per written sample, ``log_weights``
    (normalised within its CG frame), ``log_weights_raw``, ``index`` (input row), ``frame`` (time index),
    ``walker``, ``s`` [N, d], ``wrong_chirality``, and per CG frame ``frame_ess``; for DCD and XTC (no
    topology) also ``<out stem>.top.pdb`` with the first sample. Returns a :class:`BackmapSummary`.
    """
    t0 = time.perf_counter()
    opts = BackmapOptions.build(options if options is not None else BackmapOptions(progress=True), **settings)
    inputs = resolve_inputs(cg_file, run_dir_or_model_path, allow_outside_domain=opts.allow_outside_domain)
    cgsystem, frames = inputs.cgsystem, inputs.frames
    out_path = os.fspath(out_path)
    top = md_topology(cgsystem)
    writer = TrajectoryWriter(out_path, top)
    weights_path = out_path + ".weights.npz"
    topology_path = None
    keys = ("log_weights", "log_weights_raw", "index", "wrong_chirality")
    acc = {k: [] for k in keys}
    frame_ess = np.zeros(len(frames))
    counts = dict(n_drawn=0, n_wrong_chirality=0, n_nonfinite=0)
    first = None
    try:
        for chunk in iter_chunks(inputs, opts, bridge):
            t = (frames.time_ps if frames.time_ps is not None else frames.frame.astype(np.float64))[chunk.index]
            writer.write(chunk.xyz, t)
            if first is None and len(chunk.xyz):
                first = chunk.xyz[:1].copy()
            for k in keys:
                acc[k].append(getattr(chunk, k))
            frame_ess[chunk.first_index : chunk.first_index + len(chunk.frame_ess)] = chunk.frame_ess
            for k in counts:
                counts[k] += getattr(chunk, k)
    except BaseException:
        writer.close(commit=False)
        raise
    writer.close(commit=True)
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in acc.items()}
    index = out["index"].astype(np.int64)
    arrays = dict(
        log_weights=out["log_weights"].astype(np.float64),
        log_weights_raw=out["log_weights_raw"].astype(np.float64),
        index=index,
        frame=frames.frame[index],
        walker=frames.walker[index],
        s=frames.s[index],
        wrong_chirality=out["wrong_chirality"].astype(bool),
        frame_ess=frame_ess,
        n_per_frame=np.int64(opts.n_per_frame),
        n_frames=np.int64(len(frames)),
        n_drawn=np.int64(counts["n_drawn"]),
        n_wrong_chirality=np.int64(counts["n_wrong_chirality"]),
        n_nonfinite=np.int64(counts["n_nonfinite"]),
        temperature_K=np.float64(cgsystem.temperature),
        cg_names=np.array(list(cgsystem.cg_names)),
        seed=np.int64(opts.seed if opts.seed is not None else -1),
    )
    if frames.time_ps is not None:
        arrays["time_ps"] = frames.time_ps[index]
    with atomic_write(weights_path) as fh:
        np.savez(fh, **arrays)
    if writer.ext in (".dcd", ".xtc") and first is not None:
        import mdtraj as md

        topology_path = os.path.splitext(out_path)[0] + ".top.pdb"
        md.Trajectory(first, top).save_pdb(topology_path)
    return BackmapSummary(
        out_path=out_path,
        weights_path=weights_path,
        topology_path=topology_path,
        n_frames=len(frames),
        n_per_frame=int(opts.n_per_frame),
        n_drawn=counts["n_drawn"],
        n_written=writer.n_frames,
        n_wrong_chirality=counts["n_wrong_chirality"],
        n_nonfinite=counts["n_nonfinite"],
        n_empty_frames=int((frame_ess == 0).sum()),
        mean_frame_ess=float(frame_ess.mean()) if len(frame_ess) else float("nan"),
        wall_s=time.perf_counter() - t0,
        extra={"model_path": inputs.model_path, "keep_wrong_chirality": bool(opts.keep_wrong_chirality)},
    )
