"""Batched OpenMM energies and forces as a differentiable torch function.

:class:`EnergyBridge` sends a batch of configurations, in chunks, to an executor (see
:mod:`openmm_cgflow.executors`): local worker processes by default (one OpenMM Context each; the OpenMM
Python API holds the GIL, so threads would not run in parallel), or a Dask ``distributed`` cluster
(``scheduler=...``). It returns reduced energies u = E / kT and forces F / kT (kT/nm). As a torch
autograd function its gradient is -F / kT from the same call: no second energy evaluation is made for
the backward pass. Every configuration is counted once in :attr:`EnergyBridge.n_evaluations`, after its
batch has come back (a chunk retried after a lost worker or a timeout is not counted twice).
"""

from __future__ import annotations

import numpy as np
import openmm
import torch
from openmm_cgflow_plugin.cgspace import kT_kJmol

from ._openmm_worker import ContextEvaluator
from .executors import BridgeError, ChunkExecutor, LocalProcessExecutor, NoWorkersError

__all__ = ["EnergyBridge", "BridgeError", "NoWorkersError"]


class EnergyBridge:
    """Reduced energies (kT) and forces (kT/nm) of configuration batches through OpenMM.

    Args:
        system: the ``openmm.System`` (kJ/mol, nm).
        temperature: K; energies are returned in units of kT = R T.
        n_workers: local worker processes, each with its own Context. ``None`` uses every core; 0 or 1
            evaluates in this process (no parallelism, no start-up cost). Ignored when ``executor`` or
            ``scheduler`` is given.
        platform: OpenMM platform name; ``"Reference"`` is the fastest for small molecules one
            configuration at a time (measured: ~2-3x the CPU platform for alanine dipeptide).
        properties: OpenMM platform properties.
        min_parallel_batch: batches smaller than this are evaluated in this process.
        executor: an executor (:class:`~openmm_cgflow.executors.ChunkExecutor`) to use instead of local
            worker processes; it is shared, not owned: :meth:`close` leaves it open.
        scheduler: a Dask scheduler address (``"tcp://host:8786"``), ``distributed.Client`` or cluster
            object: evaluate on that cluster (:class:`~openmm_cgflow.dask_executor.DaskExecutor`, needs
            ``openmm-cgflow[dask]``); the executor is owned and closed with the bridge.
        chunk_timeout: seconds after which a chunk that has not come back is evaluated again on another
            worker (None: wait; a dead worker is noticed without it).
        worker_wait: Dask only: seconds a batch waits with no worker in the cluster before
            :class:`~openmm_cgflow.executors.NoWorkersError` (and the limit to reach the scheduler).

    Raises (from :meth:`energy_and_forces`): :class:`~openmm_cgflow.executors.NoWorkersError` when no
    worker is left; nothing of that batch is counted.
    """

    def __init__(
        self,
        system: openmm.System,
        temperature: float,
        n_workers: int | None = None,
        platform: str = "Reference",
        properties: dict | None = None,
        min_parallel_batch: int = 64,
        *,
        executor: ChunkExecutor | None = None,
        scheduler=None,
        chunk_timeout: float | None = None,
        worker_wait: float = 60.0,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive (K), got {temperature}")
        if executor is not None and scheduler is not None:
            raise ValueError("give an executor or a scheduler, not both")
        if chunk_timeout is not None and not chunk_timeout > 0:
            raise ValueError(f"chunk_timeout must be positive (s) or None, got {chunk_timeout}")
        self.kT = kT_kJmol(temperature)
        self.n_atoms = system.getNumParticles()
        self.n_evaluations = 0
        self.min_parallel_batch = min_parallel_batch
        self.chunk_timeout = chunk_timeout
        xml = openmm.XmlSerializer.serialize(system)
        self._local = ContextEvaluator(xml, platform, properties)
        self._executor, self._own_executor = executor, False
        if scheduler is not None:
            from .dask_executor import DaskExecutor

            self._executor, self._own_executor = DaskExecutor(scheduler, worker_wait=worker_wait, connect_timeout=worker_wait), True
        elif executor is None:
            n_workers = (LocalProcessExecutor.default_workers() if n_workers is None else int(n_workers))
            if n_workers > 1:
                self._executor, self._own_executor = LocalProcessExecutor(n_workers), True
        self._key = None
        if self._executor is not None:
            try:
                self._key = self._executor.add_system(xml, platform, properties)
            except Exception:
                self.close()
                raise

    @property
    def n_workers(self) -> int:
        """Workers of the executor now (0: this process evaluates)."""
        return self._executor.n_workers if self._executor is not None else 0

    @property
    def system_key(self) -> str | None:
        """The key of this bridge's System in its executor (None: in-process)."""
        return self._key

    @property
    def executor(self) -> ChunkExecutor | None:
        """The executor behind this bridge (None: in-process)."""
        return self._executor

    def energy_and_forces(self, xyz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Energies and forces of xyz [B, n_atoms, 3] nm.

        Returns (u [B] in kT, forces [B, n_atoms, 3] in kT/nm, finite [B] bool). Non-finite samples have
        u = +inf and zero forces; they are counted as evaluations all the same.
        """
        xyz = np.ascontiguousarray(np.asarray(xyz, dtype=np.float64))
        if xyz.ndim != 3 or xyz.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions have shape {xyz.shape}, expected [batch, {self.n_atoms}, 3]")
        batch = xyz.shape[0]
        if self._executor is None or batch < self.min_parallel_batch:
            energy, forces, finite = self._local.evaluate(xyz)
        else:
            chunks = np.array_split(xyz, self._executor.chunk_count(batch))
            results = self._executor.evaluate_chunks(self._key, chunks, self.chunk_timeout)
            energy = np.concatenate([r[0] for r in results])
            forces = np.concatenate([r[1] for r in results])
            finite = np.concatenate([r[2] for r in results])
        self.n_evaluations += batch
        return energy / self.kT, forces / self.kT, finite

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced energy u [B] (kT) of x [B, n_atoms, 3] nm; differentiable, d u / d x = -F / kT.

        Non-finite configurations get u = +inf and a zero gradient.
        """
        return _BridgeEnergy.apply(x, self)

    def close(self) -> None:
        """Stop the executor if this bridge created it (local worker processes, a Dask client)."""
        executor, self._executor = self._executor, None
        if executor is not None and self._own_executor:
            executor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _BridgeEnergy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bridge):
        u, forces, _ = bridge.energy_and_forces(x.detach().cpu().numpy())
        grad = torch.as_tensor(-forces, dtype=x.dtype, device=x.device)
        ctx.save_for_backward(grad)
        return torch.as_tensor(u, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_u):
        (grad,) = ctx.saved_tensors
        grad_u = torch.where(torch.isfinite(grad_u), grad_u, torch.zeros_like(grad_u))
        return grad * grad_u[:, None, None], None
