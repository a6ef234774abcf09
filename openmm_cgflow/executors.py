"""Where the energy bridge evaluates its configurations: the executor seam and the local worker processes.

An *executor* is any object with this small protocol (:class:`ChunkExecutor`):

* ``add_system(system_xml, platform="Reference", properties=None) -> key``: register an OpenMM System
  (serialised once as XML); every worker keeps one Context per System, built once (local workers when
  the System is added, Dask workers on its first chunk), never per chunk.
* ``n_workers``: how many chunks it can evaluate at the same time now.
* ``chunk_count(batch) -> int``: how many chunks a batch of ``batch`` configurations is split into.
* ``submit(key, xyz) -> future`` with ``future.result(timeout=None)``: one chunk ``xyz`` [b, n_atoms, 3] nm.
* ``evaluate_chunks(key, chunks, timeout=None) -> list``: every chunk, results in the order of the chunks,
  each ``(energy [b] kJ/mol, forces [b, n_atoms, 3] kJ/mol/nm, finite [b] bool)``. A chunk whose worker
  dies, or that has not come back after ``timeout`` seconds, is evaluated again on another worker; the
  numbers are those of a run without the fault. If no worker is left it raises :class:`NoWorkersError`.
* ``close()``.

Executors evaluate and retry; they count nothing. The bridge counts each configuration once, after its
batch has come back, so a retried chunk is never counted twice.

Two executors ship with the package: :class:`LocalProcessExecutor` (worker processes on this machine over
pipes, no extra dependency; the default) and :class:`openmm_cgflow.dask_executor.DaskExecutor` (a Dask
``distributed`` cluster; optional extra ``openmm-cgflow[dask]``).

This module imports neither torch nor distributed.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import select
import subprocess
import sys
import time
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "BridgeError",
    "NoWorkersError",
    "WorkerLostError",
    "ChunkExecutor",
    "LocalProcessExecutor",
    "system_key",
]


class BridgeError(RuntimeError):
    """The energy bridge could not evaluate a batch (a worker error, an unreachable scheduler, ...)."""


class NoWorkersError(BridgeError):
    """No worker is left (or none joined in time) to evaluate a batch: the run cannot go on.

    Raised within a bounded time (the executor's ``worker_wait``); nothing of the batch has been counted.
    A caller that holds state (the learner) should write its checkpoint and stop."""


class WorkerLostError(BridgeError):
    """A worker died (or was stopped after a timeout) with a chunk in hand; the chunk is retried elsewhere."""


def system_key(system_xml: str, platform: str = "Reference", properties: dict | None = None) -> str:
    """A short stable key of a System (its XML) and the Context options it is evaluated with."""
    h = hashlib.sha256(system_xml.encode())
    h.update(repr((platform, sorted((properties or {}).items()))).encode())
    return h.hexdigest()[:20]


@runtime_checkable
class ChunkExecutor(Protocol):
    """The executor seam of :class:`~openmm_cgflow.bridge.EnergyBridge` (see the module docstring)."""

    @property
    def n_workers(self) -> int: ...

    def add_system(self, system_xml: str, platform: str = "Reference", properties: dict | None = None) -> str: ...

    def chunk_count(self, batch: int) -> int: ...

    def submit(self, key: str, xyz: np.ndarray): ...

    def evaluate_chunks(self, key: str, chunks: Sequence[np.ndarray], timeout: float | None = None) -> list: ...

    def close(self) -> None: ...


#: The worker runs its file by absolute path as ``__main__``, not ``-m openmm_cgflow._openmm_worker``: that
#: would import the package (and with it torch) first, ~1.5 s of start-up per worker for nothing. ``-P``
#: (Python >= 3.11) keeps the working directory and the script's folder off ``sys.path``, so a folder
#: named like a module in the user's working directory (``openmm/``, ``numpy/``, ``openmm_cgflow/``) is
#: never imported by a worker; the worker also drops such entries itself (older Pythons, PYTHONPATH=.).
_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_openmm_worker.py")


def worker_command() -> list[str]:
    """The command line of a local energy worker process."""
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *flags, _WORKER_FILE]


class _PipeFuture:
    """Result of one chunk sent to a local worker process; read from its pipe when asked for."""

    def __init__(self, executor: "LocalProcessExecutor", worker: "_Worker"):
        self._executor, self.worker = executor, worker
        self._done, self._value, self._exc = False, None, None

    def done(self) -> bool:
        return self._done

    def _set(self, value=None, exc: BaseException | None = None) -> None:
        self._done, self._value, self._exc = True, value, exc

    def result(self, timeout: float | None = None):
        """(energy kJ/mol, forces kJ/mol/nm, finite); TimeoutError after ``timeout`` s (the chunk stays
        pending); WorkerLostError if the worker died."""
        if not self._done:
            self._executor._resolve(self, timeout)
        if self._exc is not None:
            raise self._exc
        return self._value


class _Worker:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pending: collections.deque[_PipeFuture] = collections.deque()
        self.alive = True
        os.set_blocking(proc.stdin.fileno(), False)  # sends are bounded by a deadline (see _send)


class LocalProcessExecutor:
    """Worker processes on this machine, one OpenMM Context per System in each, fed over pipes.

    Plain subprocesses running ``openmm_cgflow/_openmm_worker.py`` by absolute path (not multiprocessing):
    they work from any user script, no ``__main__`` guard needed, import only openmm and numpy (not the
    package), and nothing from the working directory (:func:`worker_command`). The OpenMM Python API holds
    the GIL, so processes, not threads, give parallel evaluations.

    Args:
        n_workers: worker processes (>= 1); ``None`` uses every core.

    A worker that dies, or that does not answer within the ``timeout`` given to :meth:`evaluate_chunks`
    (it is then killed), leaves the pool; its chunk goes to another worker. Dead workers are not
    replaced: when none is left, :class:`NoWorkersError`.
    """

    def __init__(self, n_workers: int | None = None):
        n_workers = self.default_workers() if n_workers is None else int(n_workers)
        if n_workers < 1:
            raise ValueError(f"LocalProcessExecutor needs at least one worker, got n_workers={n_workers}")
        self._systems: dict[str, tuple] = {}
        self._workers: list[_Worker] = []
        self._next = 0
        #: chunks sent again to another worker after theirs died or timed out (diagnostics; the bridge
        #: counts evaluations, once).
        self.n_retries = 0
        for _ in range(n_workers):
            proc = subprocess.Popen(
                worker_command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            self._workers.append(_Worker(proc))

    @staticmethod
    def default_workers() -> int:
        """One worker per core."""
        return os.cpu_count() or 1

    # --- the seam
    @property
    def n_workers(self) -> int:
        return sum(w.alive for w in self._workers)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.proc.pid for w in self._workers if w.alive]

    def chunk_count(self, batch: int) -> int:
        """One chunk per live worker (at most one per configuration)."""
        return max(1, min(self.n_workers, batch))

    def add_system(self, system_xml: str, platform: str = "Reference", properties: dict | None = None) -> str:
        """Register a System on every worker; each builds its Context now. Returns the System's key."""
        key = system_key(system_xml, platform, properties)
        if key in self._systems:
            return key
        message = ("system", key, system_xml, platform, properties)
        futures = []
        for worker in self._live():
            try:
                futures.append(self._send_to(worker, message, None))
            except WorkerLostError:
                pass
        for future in futures:
            try:
                future.result()
            except WorkerLostError:
                pass
        if not self.n_workers:
            raise NoWorkersError("no local energy worker process is left (all died)")
        self._systems[key] = message
        return key

    def submit(self, key: str, xyz: np.ndarray, timeout: float | None = None) -> _PipeFuture:
        """Send one chunk to a live worker (an idle one if any); ``timeout`` bounds the send (s)."""
        if key not in self._systems:
            raise KeyError(f"unknown system key {key!r}: call add_system first")
        while True:
            try:
                worker = self._pick(timeout)
            except TimeoutError:  # every worker is busy and the one to wait for is hung
                continue
            try:
                return self._send_to(worker, ("evaluate", key, xyz), timeout)
            except (WorkerLostError, TimeoutError):
                self._stop(worker)
                self.n_retries += 1

    def evaluate_chunks(self, key: str, chunks: Sequence[np.ndarray], timeout: float | None = None) -> list:
        """Every chunk through the workers, results in order; see the module docstring."""
        futures = [self.submit(key, c, timeout) for c in chunks]
        results = []
        for i, future in enumerate(futures):
            while True:
                try:
                    results.append(future.result(timeout))
                    break
                except TimeoutError:
                    self._stop(future.worker)  # hung: stop it; its chunks are retried elsewhere
                except WorkerLostError:
                    pass
                self.n_retries += 1
                future = self.submit(key, chunks[i], timeout)
        return results

    def close(self) -> None:
        """Stop the worker processes."""
        for worker in self._workers:
            proc = worker.proc
            if worker.alive:
                try:
                    os.set_blocking(proc.stdin.fileno(), True)
                    pickle.dump(None, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                    proc.stdin.flush()
                except (OSError, ValueError):
                    pass
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- pipes
    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.alive]

    def _pick(self, timeout: float | None = None) -> _Worker:
        live = self._live()
        if not live:
            raise NoWorkersError("no local energy worker process is left (all died or were stopped)")
        n = len(live)
        order = [live[(self._next + i) % n] for i in range(n)]
        self._next = (self._next + 1) % n
        idle = [w for w in order if not w.pending]
        if idle:
            return idle[0]
        worker = min(order, key=lambda w: len(w.pending))
        # A worker answers in order and only reads its next message after writing its answer: collect the
        # answers it owes before sending it more (otherwise both sides could block on full pipes).
        try:
            self._resolve(worker.pending[-1], timeout)
        except TimeoutError:
            self._stop(worker)  # hung; its chunks are retried when their results are asked for
            raise
        return worker if worker.alive else self._pick(timeout)

    def _send_to(self, worker: _Worker, message, timeout: float | None) -> _PipeFuture:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        fd = worker.proc.stdin.fileno()
        view = memoryview(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while view:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                _, writable, _ = select.select([], [fd], [], remaining)
                if not writable:
                    raise TimeoutError(f"energy worker {worker.proc.pid} took no input for {timeout} s")
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            self._lost(worker)
            raise WorkerLostError(f"energy worker process {worker.proc.pid} died (exit code {worker.proc.poll()})") from None
        future = _PipeFuture(self, worker)
        worker.pending.append(future)
        return future

    def _resolve(self, future: _PipeFuture, timeout: float | None) -> None:
        """Read answers of the future's worker, in order, until the future has its own."""
        worker = future.worker
        deadline = None if timeout is None else time.monotonic() + timeout
        while not future.done():
            if not worker.alive:  # pragma: no cover - pending futures are failed when a worker is lost
                future._set(exc=WorkerLostError(f"energy worker process {worker.proc.pid} is gone"))
                break
            if deadline is not None:
                ready, _, _ = select.select([worker.proc.stdout.fileno()], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"energy worker {worker.proc.pid} did not answer within {timeout} s")
            try:
                status, value = pickle.load(worker.proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                self._lost(worker)
                break
            head = worker.pending.popleft()
            if status == "ok":
                head._set(value)
            else:
                head._set(exc=BridgeError(f"energy worker process {worker.proc.pid}: {value}"))

    def _lost(self, worker: _Worker) -> None:
        worker.alive = False
        exc = WorkerLostError(f"energy worker process {worker.proc.pid} died (exit code {worker.proc.poll()})")
        while worker.pending:
            worker.pending.popleft()._set(exc=exc)

    def _stop(self, worker: _Worker) -> None:
        """Kill a worker (hung or broken) and fail the chunks it holds."""
        if worker.proc.poll() is None:
            worker.proc.kill()
        try:
            worker.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self._lost(worker)
