"""The CG-walker reporter (OpenMM's reporter protocol) and the reader of its ``.npz`` files.

:class:`CGReporter` records, every ``reportInterval`` steps, the walkers' CG coordinates and the ensemble
spread there. The file contract: after :meth:`CGReporter.close`, ``np.load(file)`` holds

* ``s`` [frames, walkers, d] (float32 by default; radians for dihedrals, periodic ones in [-pi, pi); nm
  otherwise), ``spread`` [frames, walkers] (kT), ``time_ps`` [frames] (ps), ``step`` [frames];
* ``cg_names`` [d], ``periodic`` [d], ``temperature`` (K) of the PMF.

How it is written (appending, no rewrite of earlier frames): every ``flush_every`` frames the new frames
are *appended* to the zip file as new members, ``s.000001.npy``, ``spread.000001.npy``, ... (chunk
numbers from 1; the metadata members come with the first chunk). Earlier members are never rewritten, so
the I/O is linear in the run length. :meth:`CGReporter.close` consolidates the chunks once into the plain
arrays above (an atomic rewrite of the file). A run that crashed leaves the chunked file: every flushed
frame is in it, and :func:`read_cg_npz` reads both forms. (A crash *during* a flush, which takes
milliseconds, can leave the zip directory incomplete; frames not yet flushed are lost.)
"""

from __future__ import annotations

import os
import zipfile
from typing import Dict

import numpy as np
import openmm.unit as unit

from .files import atomic_write
from .forces import find_pmf_module, walker_cg
from .pmf import PMF, load_pmf

__all__ = ["CGReporter", "read_cg_npz", "FRAME_KEYS"]

#: Per-frame arrays of the file (chunked while a run is going, concatenated along axis 0 on close).
FRAME_KEYS = ("s", "spread", "time_ps", "step")


def read_cg_npz(path) -> Dict[str, np.ndarray]:
    """All arrays of a CG-walker ``.npz`` (closed, or left chunked by a crashed run) as a dict.

    Chunked members ``KEY.NNNNNN`` of the per-frame keys (:data:`FRAME_KEYS`) are concatenated in chunk
    order into ``KEY``; every other member is returned as it is. Any other ``.npz`` is returned whole.
    """
    out, chunks = {}, {}
    with np.load(os.fspath(path), allow_pickle=False) as z:
        for name in z.files:
            key, dot, index = name.rpartition(".")
            if dot and index.isdigit() and key in FRAME_KEYS:
                chunks.setdefault(key, []).append((int(index), name))
            else:
                out[name] = z[name]
        for key, items in chunks.items():
            parts = ([out[key]] if key in out else []) + [z[name] for _, name in sorted(items)]
            out[key] = np.concatenate(parts, axis=0)
    return out


class CGReporter:
    """OpenMM reporter recording the walkers' CG coordinates and the ensemble spread there to ``.npz``.

    Args:
        file: output path (.npz); frames are appended every ``flush_every`` reports, and the file is
            consolidated on :meth:`close` (also on context-manager exit and garbage collection).
        reportInterval: steps between frames.
        pmf: the ``pmf.pt`` (path, PMF or module) to evaluate the spread with; default: the PMF inside
            the Simulation's CG-walker force (either backend).
        flush_every: frames kept in memory before they are appended to the file.
        dtype: storage dtype of ``s`` and ``spread`` (float32 by default).
    Usage: ``simulation.reporters.append(CGReporter("walkers.npz", 100))`` ... ``reporter.close()``;
    read with ``np.load`` after close, or :func:`read_cg_npz` at any time.
    """

    def __init__(self, file, reportInterval: int, pmf=None, flush_every: int = 100, dtype=np.float32):
        self.file = os.fspath(file)
        self.reportInterval = int(reportInterval)
        if self.reportInterval < 1:
            raise ValueError("reportInterval must be >= 1")
        self.flush_every = max(1, int(flush_every))
        self.dtype = dtype
        self._pmf = None if pmf is None else load_pmf(pmf)
        self._pending = {k: [] for k in FRAME_KEYS}
        self._n_chunks = 0
        self._n_flushed = 0
        self._closed = False

    def describeNextReport(self, simulation) -> dict:
        """OpenMM's dict form: the steps to the next report, positions only (wrapped by the reporter itself)."""
        steps = self.reportInterval - simulation.currentStep % self.reportInterval
        return {"steps": steps, "periodic": None, "include": ["positions"]}

    def _resolve(self, simulation):
        if self._pmf is not None:
            return
        module = find_pmf_module(simulation.system)
        if module is None:
            raise ValueError("CGReporter: the Simulation has no CG-walker force of openmm_cgflow_plugin; pass pmf=")
        self._pmf = PMF(module)

    def report(self, simulation, state) -> None:
        if self._closed:
            raise RuntimeError("CGReporter.report() after close()")
        self._resolve(simulation)
        pos = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        s = walker_cg(pos, self._pmf.periodic)  # [walkers, d] (ceil(d/3) particles per walker)
        self._pending["s"].append(s.astype(self.dtype))
        self._pending["spread"].append(self._pmf.mean_and_spread(s)[1].astype(self.dtype))
        self._pending["time_ps"].append(state.getTime().value_in_unit(unit.picosecond))
        self._pending["step"].append(simulation.currentStep)
        if len(self._pending["step"]) >= self.flush_every:
            self.flush()

    @property
    def n_frames(self) -> int:
        return self._n_flushed + len(self._pending["step"])

    def _metadata(self) -> dict:
        if self._pmf is None:
            return {}
        return {"cg_names": np.asarray(self._pmf.cg_names), "periodic": np.asarray(self._pmf.periodic),
                "temperature": np.float64(self._pmf.temperature)}

    def _pending_arrays(self) -> dict:
        d = self._pmf.n_cg if self._pmf is not None else 0
        p = self._pending
        return {"s": np.stack(p["s"]) if p["s"] else np.zeros((0, 0, d), dtype=self.dtype),
                "spread": np.stack(p["spread"]) if p["spread"] else np.zeros((0, 0), dtype=self.dtype),
                "time_ps": np.asarray(p["time_ps"], dtype=np.float64),
                "step": np.asarray(p["step"], dtype=np.int64)}

    def arrays(self) -> dict:
        """Everything recorded so far (file content plus frames not yet flushed) as a dict of arrays."""
        if self._n_chunks == 0 and not self._closed:
            return {**self._pending_arrays(), **self._metadata()}
        out = read_cg_npz(self.file)
        if self._pending["step"]:
            for key, value in self._pending_arrays().items():
                out[key] = np.concatenate([out[key], value]) if key in out else value
        return out

    def flush(self) -> None:
        """Append the frames recorded since the last flush to the file as one new chunk."""
        if not self._pending["step"]:
            return
        chunk = self._n_chunks + 1
        if chunk == 1:
            os.makedirs(os.path.dirname(os.path.abspath(self.file)), exist_ok=True)
        members = {f"{k}.{chunk:06d}": v for k, v in self._pending_arrays().items()}
        if chunk == 1:
            members.update(self._metadata())
        with zipfile.ZipFile(self.file, "w" if chunk == 1 else "a", compression=zipfile.ZIP_STORED,
                             allowZip64=True) as zf:
            for name, value in members.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
        self._n_flushed += len(self._pending["step"])
        self._pending = {k: [] for k in FRAME_KEYS}
        self._n_chunks = chunk

    def close(self) -> None:
        """Flush, then consolidate the chunks into the plain arrays of the file contract (atomic rewrite)."""
        if self._closed:
            return
        self.flush()
        data = read_cg_npz(self.file) if self._n_chunks else {**self._pending_arrays(), **self._metadata()}
        with atomic_write(self.file) as fh:
            np.savez(fh, **data)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if not self._closed and (self._n_chunks or self._pending["step"]):
                self.close()
        except Exception:
            pass
