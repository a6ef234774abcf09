"""Batched OpenMM energies and forces as a differentiable torch function.

:class:`EnergyBridge` sends a batch of configurations to OpenMM Contexts, one per worker process (the
OpenMM Python API holds the GIL, so threads would not run in parallel), and returns reduced energies
u = E / kT. As a torch autograd function its gradient is -F / kT from the same call: no second energy
evaluation is made for the backward pass. Every configuration sent to OpenMM is counted in
:attr:`EnergyBridge.n_evaluations`.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import openmm
import openmm.unit as unit
import torch

from ._openmm_worker import ContextEvaluator

_R = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)


class EnergyBridge:
    """Reduced energies (kT) and forces of configuration batches through OpenMM.

    Args:
        system: the ``openmm.System`` (kJ/mol, nm).
        temperature: K; energies are returned in units of kT = R T.
        n_workers: worker processes, each with its own Context. ``None`` uses every core; 0 evaluates
            in this process (no parallelism, no start-up cost).
        platform: OpenMM platform name; ``"Reference"`` is the fastest for small molecules one
            configuration at a time (measured: ~2-3x the CPU platform for alanine dipeptide).
        min_parallel_batch: batches smaller than this are evaluated in-process.
    """

    def __init__(
        self,
        system: openmm.System,
        temperature: float,
        n_workers: int | None = None,
        platform: str = "Reference",
        properties: dict | None = None,
        min_parallel_batch: int = 64,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive (K), got {temperature}")
        self.kT = _R * float(temperature)
        self.n_atoms = system.getNumParticles()
        self.n_evaluations = 0
        self.min_parallel_batch = min_parallel_batch
        xml = openmm.XmlSerializer.serialize(system)
        self._local = ContextEvaluator(xml, platform, properties)
        n_workers = (os.cpu_count() or 1) if n_workers is None else int(n_workers)
        self._workers = []
        if n_workers > 1:
            # Plain subprocesses (not multiprocessing): they work from any user script, no __main__ guard needed.
            for _ in range(n_workers):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "openmm_cgflow._openmm_worker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                self._workers.append(proc)
                self._send(proc, (xml, platform, properties))
            for proc in self._workers:
                status, message = self._receive(proc)
                if status != "ready":
                    self.close()
                    raise RuntimeError(f"energy worker failed to create an OpenMM Context: {message}")

    @property
    def n_workers(self) -> int:
        return len(self._workers)

    def energy_and_forces(self, xyz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Energies and forces of xyz [B, n_atoms, 3] nm.

        Returns (u [B] in kT, forces [B, n_atoms, 3] in kT/nm, finite [B] bool). Non-finite samples have
        u = +inf and zero forces; they are counted as evaluations all the same.
        """
        xyz = np.ascontiguousarray(np.asarray(xyz, dtype=np.float64))
        if xyz.ndim != 3 or xyz.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions have shape {xyz.shape}, expected [batch, {self.n_atoms}, 3]")
        batch = xyz.shape[0]
        self.n_evaluations += batch
        if not self._workers or batch < self.min_parallel_batch:
            energy, forces, finite = self._local.evaluate(xyz)
        else:
            chunks = np.array_split(xyz, len(self._workers))
            for proc, chunk in zip(self._workers, chunks):
                self._send(proc, chunk)
            results = [self._receive(proc) for proc in self._workers]
            energy = np.concatenate([r[0] for r in results])
            forces = np.concatenate([r[1] for r in results])
            finite = np.concatenate([r[2] for r in results])
        return energy / self.kT, forces / self.kT, finite

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced energy u [B] (kT) of x [B, n_atoms, 3] nm; differentiable, d u / d x = -F / kT.

        Non-finite configurations get u = +inf and a zero gradient.
        """
        return _BridgeEnergy.apply(x, self)

    @staticmethod
    def _send(proc, obj) -> None:
        pickle.dump(obj, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.flush()

    @staticmethod
    def _receive(proc):
        try:
            return pickle.load(proc.stdout)
        except EOFError:
            raise RuntimeError(f"energy worker process {proc.pid} died (exit code {proc.poll()})") from None

    def close(self) -> None:
        """Stop the worker processes."""
        for proc in self._workers:
            try:
                self._send(proc, None)
                proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()
        self._workers = []

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
