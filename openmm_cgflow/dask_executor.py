"""The energy bridge on a Dask ``distributed`` cluster (optional extra: ``pip install openmm-cgflow[dask]``).

:class:`DaskExecutor` follows the executor seam of :mod:`openmm_cgflow.executors`:

* each System is serialised once (XML) and registered as a worker plugin: the scheduler hands it to every
  worker, also to workers that join later (an adaptive or SLURM cluster); each worker builds one OpenMM
  Context per System on its first chunk of it and keeps it (not one per chunk);
* each worker runs one small Dask *actor* that evaluates chunks; a chunk is an actor call: it goes from
  the client to the worker and back without a scheduler round trip, ~1-2 ms of latency against ~10-20 ms
  for a Dask task (measured on 2 cores; a task pays the scheduler and Dask's message batching twice).
  The actor evaluates in one plain OpenMM process of its own (see :class:`_ChunkEvaluator`). Results
  come back in the order of the chunks;
* faults are handled here, by resubmission: a chunk whose worker dies (the call fails, or the worker
  leaves the cluster) or that has not come back ``timeout`` seconds after it was sent (the worker is then
  left out while it stays in the cluster) is sent to another worker. The numbers are those of a run
  without the fault, and the bridge counts each configuration once;
* no worker for ``worker_wait`` seconds while a batch waits: :class:`~openmm_cgflow.executors.NoWorkersError`.

Dask workers should run one thread each (``dask worker --nthreads 1``, one worker per core): each worker
evaluates one chunk at a time. Workers need ``openmm-cgflow`` installed (they import this module; their
evaluation processes import only openmm and numpy).
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Sequence

import numpy as np

from .executors import BridgeError, LocalProcessExecutor, NoWorkersError, system_key

try:
    import distributed
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    distributed = None
    WorkerPlugin = object
    _IMPORT_ERROR = _exc

__all__ = ["DaskExecutor"]

_PLUGIN_PREFIX = "openmm-cgflow-system-"


class _SystemPlugin(WorkerPlugin):
    """Worker plugin holding one System (XML and Context options); sent once to each worker."""

    def __init__(self, key: str, system_xml: str, platform: str, properties: dict | None):
        self.key, self.system_xml, self.platform, self.properties = key, system_xml, platform, properties


class _ChunkEvaluator:
    """The actor on each worker: evaluates chunks of its worker's Systems (plugins).

    The evaluation runs in one plain worker process owned by this actor (the local bridge's
    ``openmm_cgflow._openmm_worker``, one Context per System, built when the System's first chunk comes):
    in a Dask worker's own thread, next to its event loop, the same evaluation costs 12-19 % more CPU
    (measured for 2048 alanine-dipeptide configurations: 88-92 ms against 74-80 ms). The actor thread
    only waits on the pipe.
    """

    def __init__(self):
        self._worker = distributed.get_worker()
        self._pool: LocalProcessExecutor | None = None
        self._keys: dict[str, str] = {}  # plugin name -> system key in the pool

    def evaluate(self, plugin_name: str, xyz: np.ndarray):
        """(energy [b] kJ/mol, forces [b, n_atoms, 3] kJ/mol/nm, finite [b]) of xyz [b, n_atoms, 3] nm."""
        plugin = self._worker.plugins.get(plugin_name)
        if plugin is None:
            raise BridgeError(f"Dask worker {self._worker.address} has no System {plugin_name!r} (unregistered?)")
        for attempt in range(2):
            if self._pool is None:
                self._pool, self._keys = LocalProcessExecutor(1), {}
            try:
                if plugin_name not in self._keys:
                    self._keys[plugin_name] = self._pool.add_system(plugin.system_xml, plugin.platform, plugin.properties)
                return self._pool.evaluate_chunks(self._keys[plugin_name], [xyz])[0]
            except NoWorkersError:  # the evaluation process died: start another one, once
                self.close()
        raise BridgeError(f"the OpenMM process of Dask worker {self._worker.address} died twice on one chunk")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class DaskExecutor:
    """Chunks of configurations evaluated on a Dask ``distributed`` cluster.

    Args:
        scheduler: a scheduler address (``"tcp://host:8786"``), a ``distributed.Client`` (used, not closed
            by :meth:`close`), or a cluster object (``LocalCluster``, dask-jobqueue's ``SLURMCluster``, ...;
            a Client to it is opened and closed here).
        worker_wait: seconds a batch may wait with no (usable) worker in the cluster before
            :class:`~openmm_cgflow.executors.NoWorkersError`.
        connect_timeout: seconds to reach the scheduler.
        min_chunk: fewest configurations per chunk.
        chunks_per_worker: chunks per worker when the batch is large enough (measured on 2 cores at
            batch 4096: 1 and 2 are equally fast; more chunks mean less work to redo after a fault).
        poll: seconds between checks for lost workers and late chunks while a batch waits.
    """

    def __init__(self, scheduler, *, worker_wait: float = 60.0, connect_timeout: float = 30.0,
                 min_chunk: int = 32, chunks_per_worker: int = 1, poll: float = 0.5):
        if distributed is None:  # pragma: no cover
            raise ImportError("the Dask executor needs the optional dependency 'distributed': "
                              "pip install 'openmm-cgflow[dask]'") from _IMPORT_ERROR
        if isinstance(scheduler, distributed.Client):
            self.client, self._own_client = scheduler, False
        else:
            address = scheduler if isinstance(scheduler, str) else getattr(scheduler, "scheduler_address", None)
            if address is None:
                raise TypeError(f"scheduler must be an address, a distributed.Client or a cluster, got {scheduler!r}")
            try:
                self.client = distributed.Client(address, timeout=connect_timeout, set_as_default=False)
            except OSError as exc:
                raise BridgeError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
            self._own_client = True
        self.worker_wait, self.min_chunk, self.poll = float(worker_wait), max(1, int(min_chunk)), float(poll)
        self.chunks_per_worker = max(1, int(chunks_per_worker))
        self._plugins: dict[str, str] = {}
        self._actors: dict[str, object] = {}  # worker address -> actor proxy
        self._actor_futures: dict[str, object] = {}  # worker address -> the future that holds its actor
        self._starting: dict[str, tuple] = {}  # worker address -> (actor future, start time)
        self._left_out: set[str] = set()  # workers that timed out; used again once they leave and rejoin
        self._round_robin = itertools.count()
        #: chunks sent again to another worker after theirs died or timed out (diagnostics; the bridge
        #: counts evaluations, once).
        self.n_retries = 0

    # --- the seam
    @property
    def n_workers(self) -> int:
        """Workers of the cluster that take chunks now (waits up to 2 s for workers that just joined)."""
        return len(self._refresh(wait=2.0))

    def chunk_count(self, batch: int) -> int:
        """``chunks_per_worker`` chunks per worker, at least ``min_chunk`` configurations each (at least
        one chunk)."""
        return max(1, min(self.chunks_per_worker * self.n_workers, batch // self.min_chunk))

    def add_system(self, system_xml: str, platform: str = "Reference", properties: dict | None = None) -> str:
        """Register a System as a worker plugin (sent once to each worker, now and when one joins)."""
        key = system_key(system_xml, platform, properties)
        if key not in self._plugins:
            name = _PLUGIN_PREFIX + key
            self.client.register_plugin(_SystemPlugin(key, system_xml, platform, properties), name=name)
            self._plugins[key] = name
        return key

    def submit(self, key: str, xyz: np.ndarray):
        """Send one chunk to a worker (round robin); returns a future with ``result(timeout=None)``."""
        return self._send(key, xyz, ())[1]

    def evaluate_chunks(self, key: str, chunks: Sequence[np.ndarray], timeout: float | None = None) -> list:
        """Every chunk on the cluster, results in order; see the module docstring."""
        n = len(chunks)
        workers = self._refresh(wait=2.0) or self._wait_for_workers(())
        sent = [(workers[i % len(workers)], self._actors[workers[i % len(workers)]].evaluate(self._plugins[key], c),
                 time.monotonic()) for i, c in enumerate(chunks)]
        rounds = -(-n // len(workers))  # a worker evaluates its chunks one after the other
        results = [None] * n
        for i in range(n):
            while True:
                worker, future, t0 = sent[i]
                try:
                    results[i] = future.result(timeout=self.poll)
                    break
                except TimeoutError:
                    if worker not in self._refresh():
                        pass  # the worker left the cluster: send the chunk elsewhere
                    elif timeout is not None and time.monotonic() - t0 > timeout * rounds:
                        self._leave_out(worker)
                    else:
                        continue
                except OSError:  # the call could not reach the worker, or its connection broke: it died
                    self._drop(worker)
                # chunks still out on that worker go elsewhere too
                for j in range(i, n):
                    if sent[j][0] == worker and results[j] is None:
                        w, f = self._send(key, chunks[j], {worker})
                        sent[j] = (w, f, time.monotonic())
                        self.n_retries += 1
        return results

    def close(self) -> None:
        """Release the actors, unregister this executor's Systems from the workers (they drop their
        Contexts); close an own Client."""
        if getattr(self, "client", None) is None:
            return
        for worker in list(self._actors):
            self._drop(worker)
        for future, _ in self._starting.values():
            future.cancel()
        self._starting = {}
        try:
            if self.client.status == "running":
                for name in self._plugins.values():
                    try:
                        self.client.unregister_worker_plugin(name)
                    except Exception:
                        pass
        finally:
            self._plugins = {}
            if self._own_client:
                self.client.close()
            self.client = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- workers and their actors
    def _send(self, key: str, xyz: np.ndarray, exclude) -> tuple:
        """One chunk to a worker not in ``exclude`` (round robin): (worker, actor future)."""
        workers = [w for w in self._refresh() if w not in exclude] or self._wait_for_workers(exclude)
        worker = workers[next(self._round_robin) % len(workers)]
        return worker, self._actors[worker].evaluate(self._plugins[key], xyz)

    def _refresh(self, wait: float = 0.0) -> list[str]:
        """Workers that take chunks now. Starts an actor on each worker that joined and waits up to
        ``wait`` seconds for actors being started (a worker that does not start one within
        ``worker_wait`` is left out)."""
        try:
            present = set(self.client.nthreads())
        except OSError:  # the scheduler is unreachable: as good as no worker
            present = set()
        for worker in list(self._actors):
            if worker not in present:
                self._drop(worker)
        for worker in list(self._starting):
            if worker not in present:
                self._starting.pop(worker)[0].cancel()
        self._left_out &= present
        new = sorted(present - set(self._actors) - set(self._starting) - self._left_out)
        for worker in new:
            future = self.client.submit(_ChunkEvaluator, workers=[worker], allow_other_workers=False, actor=True,
                                        pure=False, key=f"cgflow-evaluator-{uuid.uuid4().hex[:12]}")
            self._starting[worker] = (future, time.monotonic())
        deadline = time.monotonic() + wait
        while self._starting:
            for worker, (future, t0) in list(self._starting.items()):
                if future.done():
                    del self._starting[worker]
                    try:
                        with self.client.as_current():  # the actor proxy binds to this client
                            self._actors[worker] = future.result()
                        self._actor_futures[worker] = future
                    except Exception:
                        self._left_out.add(worker)
                elif time.monotonic() - t0 > self.worker_wait:  # the worker hangs: leave it out
                    del self._starting[worker]
                    self._left_out.add(worker)
                    future.cancel()
            if not self._starting or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        return sorted(self._actors)

    def _wait_for_workers(self, exclude) -> list[str]:
        deadline = time.monotonic() + self.worker_wait
        while True:
            workers = [w for w in self._refresh() if w not in exclude]
            if workers:
                return workers
            if time.monotonic() >= deadline:
                address = getattr(self.client.scheduler, "address", "?")
                raise NoWorkersError(f"no Dask worker in the cluster at {address} for {self.worker_wait:.0f} s "
                                     "(none joined, all died, or the rest timed out)")
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))

    def _drop(self, worker: str) -> None:
        self._actors.pop(worker, None)
        future = self._actor_futures.pop(worker, None)
        if future is not None:  # release the actor now (its proxy may linger in a reference cycle)
            try:
                self.client.cancel([future])
            except Exception:
                pass

    def _leave_out(self, worker: str) -> None:
        self._drop(worker)
        self._left_out.add(worker)
