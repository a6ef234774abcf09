"""Fitting a :class:`~openmm_cgflow.ensemble.PMFEnsemble` to free-energy labels, all models at once.

* Diversity: every model has its own random initialisation and its own bootstrap of the labels
  (``bootstrap="bayesian"``: Dirichlet(1) weights per label, every label seen by every model;
  ``"classic"``: multinomial resampling counts; ``"none"``). Labels are weighted by
  1 / (stderr^2 + stderr_floor^2) (kT). :func:`fit_ensemble` always re-initialises and trains on all labels
  it is given (no warm start), so the ensemble never carries memory of an earlier fit.
* Standardisation: inputs (non-periodic coordinates) by the labels' mean and standard deviation, targets
  by the weighted mean and standard deviation of the labels.
* Loss (``loss``): ``"squared"``, the weighted squared error in A; or ``"exp"``, for labels that are
  importance-sampling estimates A = -log Z_hat with Z_hat an unbiased estimate of exp(-A): the exp-linear loss
  e^r - r - 1 of the residual r = A_fit - A_label (kT), the deviance of a Gamma model with a log link. Its
  minimiser over labels at one point is -log of their weighted mean of Z_hat (an average in exp(-A), where the
  estimates are unbiased), where the squared loss gives the mean of -log Z_hat, biased upward by the Jensen
  gap, which grows as the flow's ESS falls (about +0.2 kT at ESS/N 0.05 of 256 samples,
  benchmarks/relabel_bias.py). For stability the first ``exp_start`` of the steps use the squared loss and the
  exponential is continued linearly above ``exp_cap_kT``.
* Optimiser: ``torch.optim.Adam`` with a cosine learning-rate decay from ``lr`` to ``lr_final``.
* Speed (:class:`_FlatStackedTraining`): networks this small (10 x [32, 32] on a few hundred labels) are
  bound by per-operation overhead on a CPU, not by arithmetic: autograd's graph and Adam's loop over one
  tensor per weight and bias cost more than the matrix products. During the fit every weight and bias is
  therefore a view of one flat parameter (Adam updates one tensor; its update is elementwise, so the numbers
  are the same), and the backward pass through the stacked layers is written out with the kernels autograd
  itself runs for them (``bmm``, ``sum``, ``silu_backward``); autograd still differentiates the loss. The
  gradients equal autograd's bit for bit (tests/test_ensemble.py), so a fit gives the same ensemble as through
  autograd, in less time (benchmarks/fit_speed.py: ~0.8x at Mueller-Brown's size, ~0.9x at alanine
  dipeptide's). No library offers this for stacked (batched) MLPs on the CPU without a compiler
  whose start-up (tens of seconds) exceeds a whole fit.
* Offset: a PMF is defined up to a constant; after fitting, the constant is chosen so that the ensemble
  mean is 0 kT at the lowest training label (the PMF minimum over the sampled region).

The training hyperparameters are grouped in :class:`EnsembleFitSettings`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from openmm_cgflow_plugin.cgspace import wrap_periodic

from .ensemble import PMFEnsemble

__all__ = ["EnsembleFitSettings", "fit_ensemble", "LOSSES"]


@dataclass
class EnsembleFitSettings:
    """Hyperparameters of :func:`fit_ensemble`.

    ``n_models`` networks with ``hidden`` widths; ``epochs`` passes over the labels, or None for ``steps``
    Adam steps whatever the number of labels; mini-batches of ``batch_size`` labels (full batch when
    M <= batch_size); learning rate decaying as a cosine from ``lr`` to ``lr_final``; ``weight_decay``
    (Adam's L2 term); ``bootstrap`` ("bayesian", "classic" or "none"); ``stderr_floor`` (kT) added in
    quadrature to every label's standard error; ``loss`` ("squared" or "exp", see the module docstring) with
    ``exp_start`` (fraction of the steps fitted with the squared loss first) and ``exp_cap_kT`` (residual, kT,
    above which the exp-linear loss continues linearly); training ``dtype`` (float32 is ~2x faster on CPU; the
    returned ensemble is float64). The defaults (3,000 steps of <= 512 labels, 10 x [64, 64]) fit 200
    labels to ~0.02 kT in ~4 s and 2,000 labels in ~15-30 s on one core.
    """

    n_models: int = 10
    hidden: Sequence[int] = (64, 64)
    epochs: Optional[int] = None
    steps: int = 3000
    batch_size: Optional[int] = 512
    lr: float = 3e-2
    lr_final: float = 1e-4
    weight_decay: float = 0.0
    bootstrap: str = "bayesian"
    stderr_floor: float = 0.05
    dtype: torch.dtype = torch.float32
    loss: str = "squared"
    exp_start: float = 0.3
    exp_cap_kT: float = 4.0


#: The losses :func:`fit_ensemble` knows.
LOSSES = ("squared", "exp")


def _exp_linear(r: torch.Tensor, cap: float) -> torch.Tensor:
    """e^r - r - 1 for residuals r (kT) up to ``cap``, continued linearly (with its slope there) above it."""
    rc = torch.clamp(r, max=cap)
    return torch.exp(rc) - rc - 1.0 + (math.exp(cap) - 1.0) * (r - rc)


def _clean_labels(s, A, stderr, periodic):
    s = np.asarray(s, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64).reshape(-1)
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[0] != A.shape[0]:
        raise ValueError(f"s must be [M, d] and A [M]; got s {s.shape} and A {A.shape}")
    if periodic is None:
        raise ValueError("periodic (one bool per CG coordinate) is required")
    periodic = [bool(p) for p in periodic]
    if len(periodic) != s.shape[1]:
        raise ValueError(f"periodic has {len(periodic)} entries but s has {s.shape[1]} CG coordinates")
    if stderr is None:
        se = np.zeros_like(A)
    else:
        se = np.asarray(stderr, dtype=np.float64).reshape(-1)
        if se.shape != A.shape:
            raise ValueError(f"stderr has shape {se.shape}, expected {A.shape}")
        if np.any(se < 0):
            raise ValueError("stderr must be non-negative")
    good = np.isfinite(A) & np.all(np.isfinite(s), axis=1) & np.isfinite(se)
    n_bad = int((~good).sum())
    if n_bad:
        warnings.warn(f"fit_ensemble: dropped {n_bad} of {len(A)} labels with non-finite A, s or stderr "
                      "(A = +inf marks CG points without usable samples); they are not trained on",
                      RuntimeWarning, stacklevel=3)
    s, A, se = s[good], A[good], se[good]
    if len(A) == 0:
        raise ValueError("fit_ensemble: no finite labels to fit (every A is NaN or infinite)")
    s = wrap_periodic(s, periodic)
    return s, A, se, periodic, n_bad


def _bootstrap_weights(n_models: int, m: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Per-model label weights [n_models, m] with mean 1 per model."""
    if kind == "none":
        return torch.ones(n_models, m, dtype=torch.float64)
    if kind == "bayesian":
        w = -torch.log(torch.rand(n_models, m, generator=gen, dtype=torch.float64).clamp_min(1e-300))
    elif kind == "classic":
        idx = torch.randint(0, m, (n_models, m), generator=gen)
        w = torch.zeros(n_models, m, dtype=torch.float64)
        w.scatter_add_(1, idx, torch.ones(n_models, m, dtype=torch.float64))
    else:
        raise ValueError(f"bootstrap must be 'bayesian', 'classic' or 'none', got {kind!r}")
    return w / w.mean(dim=1, keepdim=True)


def _squared_loss_grad(pred: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The gradient in pred of the weighted squared loss sum_models mean_labels w (pred - y)^2 of outputs pred
    [n_models, B] against targets y [B] with weights w [n_models, B], computed with the operations (and so the
    roundings) of autograd's backward pass for that expression."""
    ones = torch.ones((), dtype=pred.dtype).expand(pred.shape[0])
    grad = ones.unsqueeze(1).expand(pred.shape) / pred.shape[1]   # backward of sum, then of mean
    return (grad * w) * (2.0 * (pred - y).pow(1.0))              # of the product, then of the power


def _autograd_loss_grad(loss_of, pred: torch.Tensor) -> torch.Tensor:
    """The gradient of loss_of(pred) in pred, by autograd (for losses without a written-out gradient)."""
    pred = pred.detach().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_of(pred), pred)
    return grad


class _FlatStackedTraining:
    """The layers of a :class:`PMFEnsemble` as views of one flat parameter ``flat``, with a written-out backward
    pass (see the module docstring). ``backward(x, loss_grad)`` fills ``flat.grad`` for features x [B, n_in];
    ``write_back(ens)`` copies the trained values into the ensemble's own parameters."""

    def __init__(self, ens: PMFEnsemble):
        self.n_models = ens.n_models
        tensors = [t for layer in ens.layers for t in (layer.weight, layer.bias)]
        self.flat = torch.nn.Parameter(torch.cat([t.detach().reshape(-1) for t in tensors]))
        self.flat.grad = torch.zeros_like(self.flat)
        values, grads, start = [], [], 0
        for t in tensors:
            values.append(self.flat.detach()[start:start + t.numel()].view(t.shape))
            grads.append(self.flat.grad[start:start + t.numel()].view(t.shape))
            start += t.numel()
        self.weights, self.biases = values[0::2], values[1::2]
        self.weight_grads, self.bias_grads = grads[0::2], grads[1::2]

    def backward(self, x: torch.Tensor, loss_grad) -> None:
        """The gradient of a loss into ``flat.grad``, with the kernels autograd runs for ``PMFEnsemble.networks``.
        ``loss_grad(pred)`` gives the loss's gradient in the networks' outputs pred [n_models, B] at features
        x [B, n_in]."""
        n_layers = len(self.weights)
        with torch.no_grad():
            h = x.unsqueeze(0).expand(self.n_models, x.shape[0], x.shape[1])
            inputs, pre = [], []
            for k in range(n_layers):
                inputs.append(h)
                z = torch.baddbmm(self.biases[k], h, self.weights[k])
                pre.append(z)
                h = torch.nn.functional.silu(z) if k < n_layers - 1 else z
            g = loss_grad(h.squeeze(-1)).unsqueeze(-1)
            for k in range(n_layers - 1, -1, -1):
                if k < n_layers - 1:
                    g = torch.ops.aten.silu_backward(g, pre[k])
                torch.sum(g, dim=1, keepdim=True, out=self.bias_grads[k])
                torch.bmm(inputs[k].transpose(1, 2), g, out=self.weight_grads[k])
                if k > 0:
                    g = g.bmm(self.weights[k].transpose(1, 2))

    def write_back(self, ens: PMFEnsemble) -> None:
        with torch.no_grad():
            for layer, w, b in zip(ens.layers, self.weights, self.biases):
                layer.weight.copy_(w)
                layer.bias.copy_(b)


def fit_ensemble(s, A, stderr=None, periodic: Optional[Sequence[bool]] = None,
                 settings: Optional[EnsembleFitSettings] = None, seed: int = 0, progress: bool = False,
                 **overrides) -> PMFEnsemble:
    """Fit a :class:`PMFEnsemble` to free-energy labels, all models at once.

    Args:
        s: CG points [M, d] (radians for dihedrals; nm otherwise).
        A: free-energy labels [M] in kT (any common offset). Labels with A = +inf or NaN (or a
           non-finite s / stderr) are dropped with a ``RuntimeWarning`` and never trained on; if none is
           left a ``ValueError`` is raised.
        stderr: standard errors [M] of A in kT, or None (all labels weighted equally). Weights are
           1 / (stderr^2 + stderr_floor^2).
        periodic: per coordinate, True for dihedrals (period 2 pi).
        settings: :class:`EnsembleFitSettings` (default: its defaults); ``overrides`` replace single fields,
           e.g. ``fit_ensemble(s, A, None, [True, True], n_models=4, steps=300)``.
        seed: seeds the initialisation, the bootstraps and the mini-batches (same seed, same ensemble).
        progress: show a progress bar.
    Returns the fitted ensemble (float64, eval mode) with ``fit_info`` (a dict: n_labels, n_dropped,
    rmse_kT of the mean on the labels, wall_s, epochs, bootstrap, seed).
    """
    t0 = time.perf_counter()
    cfg = dataclasses.replace(settings or EnsembleFitSettings(), **overrides)
    n_models, hidden, epochs, steps = cfg.n_models, cfg.hidden, cfg.epochs, cfg.steps
    batch_size, lr, lr_final, weight_decay = cfg.batch_size, cfg.lr, cfg.lr_final, cfg.weight_decay
    bootstrap, stderr_floor, dtype = cfg.bootstrap, cfg.stderr_floor, cfg.dtype
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if not 0.0 <= float(cfg.exp_start) < 1.0:
        raise ValueError(f"exp_start must be in [0, 1) (a fraction of the steps), got {cfg.exp_start}")
    if not float(cfg.exp_cap_kT) > 0.0:
        raise ValueError(f"exp_cap_kT must be positive (kT), got {cfg.exp_cap_kT}")
    s_np, A_np, se_np, periodic, n_bad = _clean_labels(s, A, stderr, periodic)
    m, d = s_np.shape
    gen = torch.Generator().manual_seed(int(seed))
    ens = PMFEnsemble(periodic, n_models, hidden, dtype=torch.float64)
    ens.reset_parameters(gen)

    w_label = 1.0 / (se_np ** 2 + float(stderr_floor) ** 2) if (stderr is not None or stderr_floor > 0) else np.ones(m)
    w_label = w_label / w_label.mean()
    # Standardisation from the (weighted) labels.
    wn = w_label / w_label.sum()
    y_mean = float(np.sum(wn * A_np))
    y_scale = float(np.sqrt(np.sum(wn * (A_np - y_mean) ** 2)))
    if not np.isfinite(y_scale) or y_scale < 1e-8:
        y_scale = 1.0
    s_mean = np.where(periodic, 0.0, s_np.mean(axis=0))
    s_scale = np.where(periodic, 1.0, s_np.std(axis=0))
    s_scale = np.where(s_scale > 1e-8, s_scale, 1.0)
    with torch.no_grad():
        ens.s_mean.copy_(torch.as_tensor(s_mean))
        ens.s_scale.copy_(torch.as_tensor(s_scale))
        ens.y_mean.fill_(y_mean)
        ens.y_scale.fill_(y_scale)

    boot = _bootstrap_weights(ens.n_models, m, bootstrap, gen)
    weights = (boot * torch.as_tensor(w_label)[None, :]).to(dtype)  # [n_models, m]
    x = torch.as_tensor(s_np, dtype=dtype)
    y = torch.as_tensor((A_np - y_mean) / y_scale, dtype=dtype)

    ens.to(dtype)
    ens.train()
    training = _FlatStackedTraining(ens)
    batch_size = m if batch_size is None else max(1, min(int(batch_size), m))
    steps_per_epoch = math.ceil(m / batch_size)
    if epochs is None:
        epochs = max(1, math.ceil(int(steps) / steps_per_epoch))
    elif int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1 (or None for the default number of steps), got {epochs}")
    total = max(1, int(epochs) * steps_per_epoch)
    opt = torch.optim.Adam([training.flat], lr=lr, weight_decay=weight_decay, foreach=True)

    def lr_at(i: int) -> float:  # cosine decay lr -> lr_final
        return lr_final + (lr - lr_final) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    # Features do not change during training: compute them once.
    with torch.no_grad():
        feats = ens.features(x)
    it = range(int(epochs))
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(it, desc="fit_ensemble", leave=False)
        except ImportError:  # pragma: no cover
            pass
    step = 0
    for _ in it:
        if steps_per_epoch == 1:
            batches = [slice(None)]
        else:
            perm = torch.randperm(m, generator=gen)
            batches = list(perm.tensor_split(steps_per_epoch))
        for b in batches:
            yb, wb = y[b], weights[:, b]
            if cfg.loss == "exp" and step >= cfg.exp_start * total:
                def exp_loss(pred, yb=yb, wb=wb):
                    return (wb * _exp_linear((pred - yb) * y_scale, float(cfg.exp_cap_kT))).mean(dim=1).sum()

                training.backward(feats[b], lambda pred: _autograd_loss_grad(exp_loss, pred))
            else:
                training.backward(feats[b], lambda pred: _squared_loss_grad(pred, yb, wb))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.step()
            step += 1
    training.write_back(ens)

    ens.to(torch.float64)
    ens.eval()
    for p in ens.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        st = torch.as_tensor(s_np)
        mean = ens(st)
        ens.offset.fill_(float(mean[int(np.argmin(A_np))]))
        mean = ens(st).numpy()
    c = np.sum(wn * (A_np - mean))
    rmse = float(np.sqrt(np.mean((mean + c - A_np) ** 2)))
    ens.fit_info = {"n_labels": int(m), "n_dropped": n_bad, "rmse_kT": rmse, "wall_s": time.perf_counter() - t0,
                    "epochs": int(epochs), "bootstrap": bootstrap, "seed": int(seed), "loss": cfg.loss}
    return ens
