"""Training the conditional flow q(fine | s): by energy (reverse KL) at given CG points, or by example.

By energy, at each step CG points s are drawn from the point set, fine ~ q(. | s) is sampled
(reparameterised), mapped to Cartesian x with log_det = log|dx/d(fine, s)|, the reduced energy u(x) (kT)
comes from the :class:`~openmm_cgflow.bridge.EnergyBridge` (its autograd gradient is -F/kT), and

    loss = mean_i [ log q(fine_i | s_i) - ( -u(x_i) + log_det_i ) ]

over the samples that are finite and have the reference chirality (D-alanine is masked out), after
dropping the ``drop_worst`` largest per-sample losses of the batch. The samples and their importance
weights come from :func:`openmm_cgflow.importance.draw`, as for the free-energy labels and backmapping. Stabilisers: linear learning-rate
warm-up, gradient-norm clipping, skipping steps whose gradient is not finite. Every configuration sent to
OpenMM is counted by the bridge (``bridge.n_evaluations``); the trainer reports it.

By example, the flow maximises log q(fine | s) of (x, s) pairs converted by the coordinate transform.

The energy object only needs ``energy(x [B, n_atoms, 3] nm float64) -> u [B] kT`` (differentiable) and
optionally ``n_evaluations``; the coordinates object needs ``to_cartesian``, ``to_internal`` and
``chirality_ok`` (see ``openmm_cgflow.coordinates``). A :class:`~openmm_cgflow.systems.CGSystem` may be
passed for the coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .importance import draw, ess_fraction
from .threads import thread_steps

__all__ = ["Trainer", "reverse_kl_loss", "ess_fraction", "EpochLog"]


def _coordinates(obj):
    return getattr(obj, "coordinates", obj)


def reverse_kl_loss(flow, coordinates, energy, s: torch.Tensor, generator=None, drop_worst: int = 0,
                    forward_weight: float = 0.0, samples_per_point: int | None = None, path_gradient: bool = False):
    """Reverse-KL loss (kT, up to the unknown log partition function) at CG points s [B, n_cg].

    With ``forward_weight`` > 0 (and rows of s grouped in blocks of ``samples_per_point`` equal points) a
    self-normalised importance-sampling estimate of the forward KL, -sum_i w~_i log q(fine_i | s) with
    w~ = softmax(log p~ - log q) per point (detached), is added with that weight: it pulls mass into the
    tails that reverse KL neglects, at no extra energy evaluation (one extra inverse pass of the flow).

    With ``path_gradient`` the reverse-KL term uses the path-wise ("sticking the landing") gradient
    estimator (Roeder et al. 2017; Vaitl et al. 2022): log q is re-evaluated at the sample through an inverse
    pass with the flow's parameters detached, so only the dependence through the sample's position carries
    gradient. Same loss value and expected gradient; the per-sample gradient is exactly zero where q = p, so
    its variance vanishes as training converges and the ESS keeps improving where the plain estimator
    stalls. Costs one inverse pass of the flow (and its backward to the input).

    Returns (loss scalar with autograd, info dict with float64 tensors ``log_w`` [B] = log p~ - log q (-inf
    for excluded samples), ``ok`` [B] bool (finite and right chirality), ``n_dropped`` int,
    ``wrong_chirality`` [B] bool (finite samples of the wrong handedness)).
    log p~(fine, s) = -u(x) + log_det. If no sample is usable the loss is a zero that still depends on the
    parameters (its gradient is zero).
    """
    smp = draw(flow, coordinates, energy, s, generator)
    fine, log_q, log_p, finite_x = smp.fine, smp.log_q, smp.log_p, smp.finite_x
    per = log_q - log_p
    per_loss = per
    if path_gradient:
        params = [q for q in flow.parameters() if q.requires_grad]
        for q in params:
            q.requires_grad_(False)
        try:
            log_q_path = flow.log_prob(fine, s).to(torch.float64)
        finally:
            for q in params:
                q.requires_grad_(True)
        per_loss = log_q_path - log_p
    with torch.no_grad():
        wrong_chirality = finite_x & ~smp.chirality_ok
        ok = smp.usable
        log_w = smp.masked_log_w()
        use = ok.clone()
        n_drop = min(int(drop_worst), max(int(ok.sum()) - 1, 0))
        if n_drop > 0:
            worst = torch.topk(torch.where(ok, per, torch.full_like(per, -math.inf)), n_drop).indices
            use[worst] = False
    if bool(use.any()):
        per_used = torch.where(use, per_loss, torch.zeros_like(per_loss))
        loss = per_used.sum() / use.sum()
    else:
        loss = 0.0 * log_q.sum()
    if forward_weight > 0.0 and bool(ok.any()):
        k = int(samples_per_point or s.shape[0])
        lw = log_w.reshape(-1, k)
        has = torch.isfinite(lw).any(dim=1, keepdim=True)
        w = torch.where(has, torch.softmax(torch.where(has, lw, torch.zeros_like(lw)), dim=1), torch.zeros_like(lw))
        fine_fixed = torch.where(ok[:, None], fine.detach(), torch.zeros_like(fine.detach()))
        lq_fixed = flow.log_prob(fine_fixed, s).to(torch.float64).reshape(-1, k)
        lq_fixed = torch.where(w > 0, lq_fixed, torch.zeros_like(lq_fixed))
        loss = loss - forward_weight * (w * lq_fixed).sum() / has.sum()
    return loss, {"log_w": log_w, "ok": ok, "n_dropped": n_drop, "wrong_chirality": wrong_chirality}


@dataclass
class EpochLog:
    """One epoch of training. ``ess`` is the mean over CG points of the Kish ESS/N of that epoch's samples
    (by energy; NaN by example); ``n_evaluations`` is the bridge's cumulative energy-evaluation count."""

    epoch: int
    loss: float
    ess: float
    n_evaluations: int
    n_bad: int = 0  # excluded samples (non-finite or wrong chirality)
    n_wrong_chirality: int = 0  # finite samples with the wrong chirality (e.g. D-alanine), before any filter
    n_samples: int = 0  # flow samples drawn in the epoch (by energy)
    n_skipped_steps: int = 0
    ess_per_point: np.ndarray | None = field(default=None, repr=False)


class Trainer:
    """Optimiser state and settings for training a :class:`~openmm_cgflow.flow.ConditionalFlow`.

    Args:
        flow: the flow (its dtype is used for sampling; energies are float64).
        coordinates: coordinate transform, or a CGSystem (its ``.coordinates``).
        energy: an EnergyBridge (or any object with ``energy(x) -> u`` in kT); needed for ``train_by_energy``.
        lr: peak Adam learning rate.
        warmup_steps: steps of linear learning-rate warm-up from lr / warmup_steps.
        warmup_each_call: warm up again at the start of every :meth:`train_by_energy` call (training that
            resumes on new points: Adam's second-moment estimates lag a sudden change of the gradients' scale,
            and full-size first steps can derail a trained flow), not only at the first.
        clip: gradient-norm clip.
        drop_worst: largest per-sample losses dropped from each batch.
        forward_weight: weight of the importance-weighted forward-KL term (see :func:`reverse_kl_loss`).
        samples_per_point: flow samples per CG point per epoch (by energy).
        points_per_batch: CG points per optimiser step (by energy).
        seed: seeds the point shuffling and the flow's samples.
        progress: show a tqdm progress bar.
        path_gradient: path-wise gradient estimator for the reverse-KL term (see :func:`reverse_kl_loss`).
        threads: a :class:`~openmm_cgflow.threads.ThreadTuner` that chooses torch's thread count per step by
            measurement (None: torch's threads are left alone).

    The optimiser persists across calls, so training can continue on new points.
    """

    def __init__(
        self,
        flow,
        coordinates,
        energy=None,
        lr: float = 1e-3,
        warmup_steps: int = 50,
        warmup_each_call: bool = False,
        clip: float = 100.0,
        drop_worst: int = 0,
        forward_weight: float = 0.0,
        samples_per_point: int = 16,
        points_per_batch: int = 64,
        weight_decay: float = 0.0,
        seed: int = 0,
        progress: bool = True,
        path_gradient: bool = False,
        threads=None,
    ):
        self.flow = flow
        self.threads = threads
        self.coordinates = _coordinates(coordinates)
        self.energy = energy
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)
        self.warmup_each_call = bool(warmup_each_call)
        self._call_start = 0
        self.clip = float(clip)
        self.drop_worst = int(drop_worst)
        self.forward_weight = float(forward_weight)
        self.samples_per_point = int(samples_per_point)
        self.points_per_batch = int(points_per_batch)
        self.path_gradient = bool(path_gradient)
        self.progress = progress
        # foreach: one call per step for all parameter tensors, the same numbers as the per-tensor loop
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=self.lr, weight_decay=weight_decay, foreach=True)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step_count = 0
        self._lr_now = self.lr
        self.history: list[EpochLog] = []

    @property
    def device(self) -> torch.device:
        """The device of the flow's parameters (samples are drawn with a CPU generator and moved there)."""
        return next(self.flow.parameters()).device

    @property
    def n_evaluations(self) -> int:
        """Energy evaluations so far, as counted by the energy object (0 if it has no counter)."""
        return int(getattr(self.energy, "n_evaluations", 0))

    def _set_lr(self):
        done = self.step_count - (self._call_start if self.warmup_each_call else 0)
        frac = min(1.0, (done + 1) / max(self.warmup_steps, 1))
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_now * frac

    def _anneal(self, epoch: int, epochs: int, lr_final: float | None):
        """Learning rate of this epoch: geometric from ``lr`` to ``lr_final`` over the call's epochs."""
        if lr_final is None or epochs <= 1:
            self._lr_now = self.lr
        else:
            self._lr_now = self.lr * (lr_final / self.lr) ** (epoch / (epochs - 1))

    def _step(self, loss) -> bool:
        """One optimiser step; returns False (and skips it) if the gradient is not finite."""
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.flow.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.step_count += 1
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        return True

    def train_by_energy(self, s_points, epochs: int, lr_final: float | None = None, *, lr: float | None = None,
                        generator: torch.Generator | None = None, energy=None,
                        warmup_steps: int | None = None) -> list[EpochLog]:
        """Reverse-KL training at CG points s_points [M, n_cg] (radians / nm) for ``epochs`` epochs.

        An epoch visits every point ``samples_per_point`` times, ``points_per_batch`` points per step.
        With ``lr_final`` the learning rate decays geometrically from ``lr`` to it over these epochs.
        ``lr`` (peak learning rate), ``generator`` (point shuffling and flow samples) and ``energy`` (the
        energy object, u in kT), when given, replace the trainer's settings from this call on (None keeps
        the current one), exactly as assigning ``trainer.lr`` / ``.generator`` / ``.energy`` would.
        ``warmup_steps``, when given, replaces the trainer's learning-rate warm-up for this call only.
        Returns the epochs' logs (also appended to ``self.history``).
        """
        if lr is not None:
            self.lr = float(lr)
        if generator is not None:
            self.generator = generator
        if energy is not None:
            self.energy = energy
        if self.energy is None:
            raise ValueError("train_by_energy needs an energy object (EnergyBridge)")
        s_points = torch.as_tensor(np.asarray(s_points, dtype=np.float64)).reshape(len(s_points), -1)
        self._call_start = self.step_count
        warmup = self.warmup_steps
        if warmup_steps is not None:
            self.warmup_steps = int(warmup_steps)
        try:
            return self._epochs_by_energy(s_points, epochs, lr_final)
        finally:
            self.warmup_steps = warmup

    def _epochs_by_energy(self, s_points: torch.Tensor, epochs: int, lr_final: float | None) -> list[EpochLog]:
        m = s_points.shape[0]
        k = self.samples_per_point
        ppb = max(1, min(self.points_per_batch, m))
        logs = []
        bar = tqdm(range(epochs), desc="flow by energy", disable=not self.progress, leave=False)
        for epoch in bar:
            self._anneal(epoch, epochs, lr_final)
            order = torch.randperm(m, generator=self.generator)
            log_w_all = torch.full((m, k), -math.inf, dtype=torch.float64)
            losses, n_bad, n_skip, n_wrong, n_samp = [], 0, 0, 0, 0
            for start in range(0, m, ppb):
                idx = order[start : start + ppb]
                s = s_points[idx].repeat_interleave(k, dim=0).to(device=self.device, dtype=self.flow.dtype)
                with thread_steps(self.threads, work=s.shape[0]):
                    loss, info = reverse_kl_loss(
                        self.flow, self.coordinates, self.energy, s, self.generator, self.drop_worst,
                        forward_weight=self.forward_weight, samples_per_point=k, path_gradient=self.path_gradient,
                    )
                    if not self._step(loss):
                        n_skip += 1
                losses.append(float(loss.detach()))
                log_w_all[idx] = info["log_w"].reshape(-1, k).cpu()
                n_bad += int((~info["ok"]).sum())
                n_wrong += int(info["wrong_chirality"].sum())
                n_samp += int(s.shape[0])
            ess = ess_fraction(log_w_all)
            log = EpochLog(
                epoch=len(self.history), loss=float(np.mean(losses)), ess=float(ess.mean()),
                n_evaluations=self.n_evaluations, n_bad=n_bad, n_skipped_steps=n_skip, ess_per_point=ess.numpy(),
                n_wrong_chirality=n_wrong, n_samples=n_samp,
            )
            self.history.append(log)
            logs.append(log)
            bar.set_postfix(loss=f"{log.loss:.3f}", ess=f"{log.ess:.3f}", evals=log.n_evaluations)
        return logs

    def train_by_example(self, x, epochs: int, batch_size: int = 256, lr_final: float | None = None) -> list[EpochLog]:
        """Maximum likelihood on configurations x [N, n_atoms, 3] nm (their CG coordinates come from the
        transform). Returns the epochs' logs (loss = mean negative log-likelihood of fine given s).
        ``lr_final``: as in :meth:`train_by_energy`."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float64)) if not isinstance(x, torch.Tensor) else x.to(torch.float64)
        fine, s, _ = self.coordinates.to_internal(x)
        fine, s = fine.detach().to(self.device, self.flow.dtype), s.detach().to(self.device, self.flow.dtype)
        n = fine.shape[0]
        logs = []
        bar = tqdm(range(epochs), desc="flow by example", disable=not self.progress, leave=False)
        for epoch in bar:
            self._anneal(epoch, epochs, lr_final)
            order = torch.randperm(n, generator=self.generator)
            losses, n_skip = [], 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = -self.flow.log_prob(fine[idx], s[idx]).mean()
                if not self._step(loss):
                    n_skip += 1
                losses.append(float(loss.detach()))
            log = EpochLog(epoch=len(self.history), loss=float(np.mean(losses)), ess=float("nan"),
                           n_evaluations=self.n_evaluations, n_skipped_steps=n_skip)
            self.history.append(log)
            logs.append(log)
            bar.set_postfix(nll=f"{log.loss:.3f}")
        return logs
