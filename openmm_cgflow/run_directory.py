"""The run directory of an active-learning run: every file it holds, every write to it, its lock.

Layout (the ``cgflow run --out DIR`` contract)::

    DIR/run.json            marks the folder as an openmm-cgflow run (format, system), written when the run starts
    DIR/.lock               held (``fcntl.flock``) by the live run; the OS releases it when the process ends
    DIR/pmf.pt              the latest exported ensemble (TorchScript; openmm_cgflow_plugin.load_pmf)
    DIR/flow.pt             the latest flow with its system (openmm_cgflow.model_io.load_model), for backmapping
    DIR/checkpoint.pt       everything needed to resume after the last finished iteration
    DIR/iterations.jsonl    one JSON object per finished iteration
    DIR/pmfs/pmf_NNN.pt     the ensemble exported in iteration NNN
    DIR/plots/*.png         plots (openmm_cgflow.reporting.PlotReporter)

Every write goes through :func:`openmm_cgflow_plugin.files.atomic_write` (temporary file in the same folder,
fsync, rename), so a crash leaves the previous version of a file or the new one, never a mixture.

**One iteration commits as one set** (:meth:`RunDirectory.commit_iteration`): the iteration's ensemble is
first written as ``pmfs/pmf_NNN.pt``; then ``checkpoint.pt`` is written (the commit point): it holds the
whole state and names the SHA-256 of the ``pmf.pt``, ``flow.pt`` and ``iterations.jsonl`` of its
iteration; only then are those three published. A crash before the checkpoint leaves the previous
iteration's set (the new snapshot is discarded on resume); a crash after it is repaired on resume
(:meth:`RunDirectory.reconcile`: ``pmf.pt`` from the snapshot, ``iterations.jsonl`` from the checkpoint's
history, ``flow.pt`` from its flow state). Stray temporary files (``TEMP_PREFIX``) are removed.

**Safety**: a run takes only a folder that is empty, or marked by ``run.json`` as a run of the same
system, or holds a checkpoint to resume (:meth:`RunDirectory.claim`); anything else is refused with a
message listing what is there, unless ``overwrite=True``, which *deletes* the run's own file names
(never other files). ``checkpoint.pt`` holds tensors, numeric arrays and plain data only and is read with
``torch.load(weights_only=True)`` (:mod:`openmm_cgflow.safe_files`): a crafted file runs nothing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import time

import torch
from openmm_cgflow_plugin.files import TEMP_PREFIX, atomic_write

from .safe_files import check_plain, load_plain, to_plain

__all__ = ["RunDirectory", "json_ready", "RunDirectoryError", "RunLockedError", "CHECKPOINT_FORMAT", "RUN_FORMAT",
           "encode_records", "sha256_file"]

#: Format tag of checkpoint.pt (tensors, numeric arrays and plain data, with the committed files' hashes).
CHECKPOINT_FORMAT = "openmm-cgflow-checkpoint/2"
#: Older checkpoints (after conversion with ``python -m openmm_cgflow.safe_files``) are read too.
_READABLE_CHECKPOINTS = (CHECKPOINT_FORMAT, "openmm-cgflow-checkpoint/1")
#: Format tag of run.json.
RUN_FORMAT = "openmm-cgflow-run/1"

#: The files of a finished iteration (what a folder of another run holds).
RESULT_FILES = ("pmf.pt", "flow.pt", "iterations.jsonl", "checkpoint.pt")
_SNAPSHOT = re.compile(r"pmf_(\d+)\.pt$")
_PLOT = re.compile(r"(pmf_\d+|kld)\.png$")


class RunDirectoryError(ValueError):
    """The output directory cannot be used for this run (someone else's files, another system, ...)."""


class RunLockedError(RunDirectoryError):
    """Another live process holds the run directory's lock."""


def sha256_file(path) -> str | None:
    """SHA-256 (hex) of a file's bytes; None if it does not exist."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def encode_records(records) -> bytes:
    """``iterations.jsonl``: one JSON object per record (strict JSON: non-finite numbers are refused)."""
    return "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()


class RunDirectory:
    """The files of one run in the folder ``path`` (created; must be writable, else ValueError).

    Creating the object reads and writes nothing else; :meth:`claim` takes the folder for a run (lock +
    checks), :meth:`release` lets it go.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create output directory {self.path}: {exc}") from exc
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ValueError(f"output directory {self.path} is not writable")
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDirectory({self.path!r})"

    # ------------------------------------------------------------------ paths
    @property
    def pmf_path(self) -> str:
        """The latest exported ensemble."""
        return os.path.join(self.path, "pmf.pt")

    @property
    def flow_path(self) -> str:
        """The latest flow with its system."""
        return os.path.join(self.path, "flow.pt")

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.path, "checkpoint.pt")

    @property
    def iterations_path(self) -> str:
        return os.path.join(self.path, "iterations.jsonl")

    @property
    def marker_path(self) -> str:
        """``run.json``: marks the folder as a run."""
        return os.path.join(self.path, "run.json")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.path, ".lock")

    @property
    def plots_dir(self) -> str:
        return os.path.join(self.path, "plots")

    @property
    def snapshots_dir(self) -> str:
        return os.path.join(self.path, "pmfs")

    def snapshot_path(self, iteration: int) -> str:
        """``pmfs/pmf_NNN.pt``: the ensemble exported in ``iteration``."""
        return os.path.join(self.snapshots_dir, f"pmf_{int(iteration):03d}.pt")

    def plot_path(self, name: str) -> str:
        """``plots/NAME`` (the folder is created)."""
        os.makedirs(self.plots_dir, exist_ok=True)
        return os.path.join(self.plots_dir, name)

    # ------------------------------------------------------------------ lock
    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_fd is not None

    def lock(self) -> None:
        """Take ``DIR/.lock`` (``fcntl.flock``, released by the OS if the process dies); idempotent.

        Raises :class:`RunLockedError` naming the holder's PID while another live process (or another
        learner in this one) holds it."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self._lock_holder()
            raise RunLockedError(
                f"{self.path} is in use by another live run ({holder}): two runs on one directory would "
                "overwrite each other's files; wait for it to finish (or stop it), or choose another output "
                "directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        self._lock_fd = fd

    def _lock_holder(self) -> str:
        try:
            with open(self.lock_path) as fh:
                info = json.loads(fh.read() or "{}")
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return "PID unknown"
        mine = " = this process: close() the other PMFLearner of this directory first" if pid == os.getpid() else ""
        return f"PID {pid}{mine}, since {info.get('since', '?')}"

    def __del__(self):
        try:
            self.release()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def release(self) -> None:
        """Let go of the lock (the file stays; an unlocked ``.lock`` means nothing)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ claiming the folder
    def read_marker(self) -> dict | None:
        """The content of ``run.json`` (None if there is none)."""
        if not os.path.exists(self.marker_path):
            return None
        try:
            with open(self.marker_path) as fh:
                marker = json.load(fh)
        except (OSError, ValueError) as exc:
            raise RunDirectoryError(f"{self.marker_path} is unreadable ({exc}); if the folder's run files are "
                                    "not needed, start afresh with overwrite=True (cgflow run --overwrite)") from exc
        if not isinstance(marker, dict) or marker.get("format") != RUN_FORMAT:
            raise RunDirectoryError(f"{self.marker_path} is not an openmm-cgflow run marker")
        return marker

    def mark(self, system: str) -> None:
        """Write ``run.json`` (format, system, creation time) if there is none."""
        if os.path.exists(self.marker_path):
            return
        marker = {"format": RUN_FORMAT, "system": system, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with atomic_write(self.marker_path, "w") as fh:
            fh.write(json.dumps(marker, indent=1) + "\n")

    def contents(self) -> list[str]:
        """What the folder holds, for messages (the lock and temporary files left out)."""
        return sorted(n for n in os.listdir(self.path) if n != ".lock" and not n.startswith(TEMP_PREFIX))

    def claim(self, system: str, overwrite: bool = False) -> None:
        """Take the folder for a run of ``system`` (a system's name): lock it, then check what it holds.

        Accepted: an empty folder; one marked by ``run.json`` as a run of ``system`` (resumed from its
        checkpoint, or started afresh if none had finished an iteration); one holding a ``checkpoint.pt``
        (the learner checks its system and settings). Refused (:class:`RunDirectoryError`, listing what is
        there): anything else, e.g. another run's pmf.pt/flow.pt/iterations.jsonl without a checkpoint, or
        files that are not a run's. ``overwrite=True`` deletes the run's own file names (run.json,
        checkpoint.pt, pmf.pt, flow.pt, iterations.jsonl, pmfs/pmf_NNN.pt, plots/pmf_NNN.png,
        plots/kld.png, temporary files) and starts afresh; other files are left alone.
        """
        self.lock()
        try:
            if overwrite:
                self.remove_run_files()
                return
            marker = self.read_marker()
            present = self.contents()
            has_checkpoint = "checkpoint.pt" in present
            if marker is not None and marker.get("system") != system:
                raise RunDirectoryError(
                    f"{self.path} holds a run of system {marker.get('system')!r} (run.json), not {system!r}: "
                    f"choose another output directory, or pass overwrite=True (cgflow run --overwrite) to delete "
                    f"that run's files")
            if has_checkpoint:
                return
            results = [n for n in RESULT_FILES if n in present]
            if marker is None and present:
                what = ", ".join(present[:12]) + (f" and {len(present) - 12} more" if len(present) > 12 else "")
                kind = ("another run's results without a checkpoint.pt to resume from" if results
                        else "files that are not an openmm-cgflow run's")
                raise RunDirectoryError(
                    f"{self.path} was not created by this run and is not empty: it holds {what} ({kind}); "
                    f"choose another output directory, or pass overwrite=True (cgflow run --overwrite) to delete "
                    f"the run files ({', '.join(RESULT_FILES)}, pmfs/, plots/) and start afresh")
            if results:
                raise RunDirectoryError(
                    f"{self.path} holds results ({', '.join(results)}) but no checkpoint.pt to resume from "
                    f"(deleted?): starting again would overwrite them; move them away, choose another output "
                    f"directory, or pass overwrite=True (cgflow run --overwrite) to delete them")
        except BaseException:
            self.release()
            raise

    def remove_run_files(self) -> list[str]:
        """Delete the run's own files (see :meth:`claim`); returns the names removed."""
        removed = self.remove_temp_files()
        for name in RESULT_FILES + ("run.json",):
            if os.path.exists(os.path.join(self.path, name)):
                os.remove(os.path.join(self.path, name))
                removed.append(name)
        for folder, pattern in ((self.snapshots_dir, _SNAPSHOT), (self.plots_dir, _PLOT)):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if pattern.match(name):
                        os.remove(os.path.join(folder, name))
                        removed.append(os.path.join(os.path.basename(folder), name))
                if not os.listdir(folder):
                    os.rmdir(folder)
        return removed

    def remove_temp_files(self) -> list[str]:
        """Delete temporary files a crash left behind (``TEMP_PREFIX*`` in the folder, pmfs/ and plots/)."""
        removed = []
        for folder in (self.path, self.snapshots_dir, self.plots_dir):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(TEMP_PREFIX):
                        os.remove(os.path.join(folder, name))
                        removed.append(os.path.relpath(os.path.join(folder, name), self.path))
        return removed

    def discard_snapshots_from(self, iteration: int) -> list[str]:
        """Delete ``pmfs/pmf_NNN.pt`` with NNN >= ``iteration`` (written by an iteration that never committed)."""
        removed = []
        if os.path.isdir(self.snapshots_dir):
            for name in os.listdir(self.snapshots_dir):
                m = _SNAPSHOT.match(name)
                if m and int(m.group(1)) >= iteration:
                    os.remove(os.path.join(self.snapshots_dir, name))
                    removed.append(f"pmfs/{name}")
        return removed

    # ------------------------------------------------------------------ writes
    def write_bytes(self, path: str, write) -> None:
        """Write the file ``path`` (inside the run directory) atomically: ``write(fh)`` fills a binary handle."""
        with atomic_write(path, "wb") as fh:
            write(fh)

    def save_checkpoint(self, payload: dict) -> None:
        """Write ``checkpoint.pt`` (``payload`` as tensors, numeric arrays and plain data, plus the format tag)
        atomically.

        Raises TypeError (and writes nothing) for a payload that would not load with ``weights_only=True``."""
        data = to_plain(dict(payload), "checkpoint")
        data["format"] = CHECKPOINT_FORMAT
        buf = io.BytesIO()
        torch.save(data, buf)
        check_plain(buf.getvalue(), "checkpoint payload")
        self.write_bytes(self.checkpoint_path, lambda fh: fh.write(buf.getvalue()))

    def save_flow(self, flow, cgsystem, **extra) -> str:
        """Write ``flow.pt`` (the flow and its system; see :func:`openmm_cgflow.model_io.save_model`)."""
        from .model_io import save_model

        return save_model(self.flow_path, flow, cgsystem, **extra)

    def _copy(self, src: str, dst: str) -> None:
        with open(src, "rb") as fh:
            self.write_bytes(dst, lambda out: shutil.copyfileobj(fh, out))

    def write_iterations(self, records) -> None:
        """Rewrite ``iterations.jsonl`` with one JSON object per record (atomically, strict JSON)."""
        data = encode_records(records)
        self.write_bytes(self.iterations_path, lambda fh: fh.write(data))

    def commit_iteration(self, iteration: int, state: dict, flow_bytes: bytes, records) -> None:
        """Commit iteration ``iteration`` as one set (see the module docstring).

        ``pmfs/pmf_NNN.pt`` must already hold the iteration's ensemble; ``state`` is the checkpoint's
        payload, ``flow_bytes`` the new ``flow.pt`` (:func:`openmm_cgflow.model_io.model_bytes`),
        ``records`` all iteration records (the new ``iterations.jsonl``)."""
        snapshot = self.snapshot_path(iteration)
        jsonl = encode_records(records)
        files = {"pmf.pt": sha256_file(snapshot), "flow.pt": hashlib.sha256(flow_bytes).hexdigest(),
                 "iterations.jsonl": hashlib.sha256(jsonl).hexdigest()}
        if files["pmf.pt"] is None:
            raise FileNotFoundError(f"{snapshot} (the iteration's ensemble) was not written")
        state = dict(state, files=files, snapshot=os.path.relpath(snapshot, self.path))
        self.save_checkpoint(state)  # the commit point
        self._copy(snapshot, self.pmf_path)
        self.write_bytes(self.flow_path, lambda fh: fh.write(flow_bytes))
        self.write_bytes(self.iterations_path, lambda fh: fh.write(jsonl))

    def reconcile(self, checkpoint: dict | None, write_flow) -> list[str]:
        """Bring the folder to the set of the checkpoint's iteration after a crash; returns what was repaired.

        Removes temporary files and the snapshots of iterations that never committed; restores
        ``pmf.pt`` from the committed snapshot, rewrites ``iterations.jsonl`` from the checkpoint's
        history and ``flow.pt`` with ``write_flow()`` (the restored flow) where their hashes differ from
        the checkpoint's. ``checkpoint=None``: nothing committed yet (a crash inside the first iteration)."""
        repaired = [f"removed {n}" for n in self.remove_temp_files()]
        done = 0 if checkpoint is None else int(checkpoint["iteration"])
        repaired += [f"removed {n}" for n in self.discard_snapshots_from(done)]
        files = None if checkpoint is None else checkpoint.get("files")
        if not files:
            return repaired
        if sha256_file(self.pmf_path) != files["pmf.pt"]:
            snapshot = os.path.join(self.path, checkpoint["snapshot"])
            if sha256_file(snapshot) != files["pmf.pt"]:
                raise RunDirectoryError(
                    f"{self.pmf_path} and {snapshot} do not hold the ensemble that {self.checkpoint_path} "
                    f"committed (iteration {done - 1}); restore them from a copy, or start afresh with "
                    "overwrite=True")
            self._copy(snapshot, self.pmf_path)
            repaired.append("restored pmf.pt")
        if sha256_file(self.iterations_path) != files["iterations.jsonl"]:
            self.write_iterations(checkpoint["history"])
            repaired.append("restored iterations.jsonl")
        if sha256_file(self.flow_path) != files["flow.pt"]:
            write_flow()
            repaired.append("restored flow.pt")
        return repaired

    # ------------------------------------------------------------------ reads
    def has_checkpoint(self) -> bool:
        return os.path.exists(self.checkpoint_path)

    def load_checkpoint(self, require=()) -> dict:
        """The checkpoint's payload; FileNotFoundError if there is none, ValueError if it is unreadable, holds
        more than tensors, numeric arrays and plain data (:class:`~openmm_cgflow.safe_files.UnsafeFileError`: nothing in it
        is run), is not a checkpoint, or lacks one of the keys ``require``."""
        path = self.checkpoint_path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        ck = load_plain(path, "checkpoint")
        if not isinstance(ck, dict) or ck.get("format") not in _READABLE_CHECKPOINTS:
            raise ValueError(f"{path} is not an openmm-cgflow checkpoint")
        missing = [k for k in require if k not in ck]
        if missing:
            raise ValueError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}): it cannot be resumed; "
                             "restore a good copy, or start afresh with overwrite=True (cgflow run --overwrite)")
        return ck

    def read_iterations(self) -> list[dict]:
        """The records of ``iterations.jsonl`` (empty if there is none yet)."""
        if not os.path.exists(self.iterations_path):
            return []
        with open(self.iterations_path) as fh:
            return [json.loads(line) for line in fh if line.strip()]


def json_ready(record: dict) -> dict:
    """The record with every non-finite number replaced by None and flagged (``"<key>_nonfinite": "inf"``),
    so iterations.jsonl stays strict JSON (e.g. an infinite KLD)."""
    out = {}
    for key, val in record.items():
        if isinstance(val, float) and not math.isfinite(val):
            out[key] = None
            out[f"{key}_nonfinite"] = str(val)
        else:
            out[key] = val
    return out
