"""PMF ensemble: N small networks fitted to free-energy labels, trained as one batched computation.

The ensemble maps CG coordinates ``s`` [N, d] (radians for dihedrals, nm for Mueller-Brown's s = x - y) to
a PMF in kT. Its mean is the PMF used for dynamics; its spread (standard deviation over the models,
population form: divide by the number of models) is the uncertainty that drives active learning.

Design:

* Inputs: each periodic coordinate (period 2 pi) enters as (cos s, sin s), so every model is exactly
  periodic; every other coordinate is standardised with the labels' mean and standard deviation.
* Targets: standardised internally (weighted mean / std of the labels); outputs are mapped back to kT.
* Models: ``n_models`` MLPs (SiLU, smooth forces) whose weights are stacked along a leading model axis,
  [n_models, n_in, n_out] per layer, and evaluated with one ``torch.baddbmm`` per layer, so training and
  inference are one batched computation, never a Python loop over models.
* Diversity: every model has its own random initialisation and its own bootstrap of the labels
  (``bootstrap="bayesian"``: Dirichlet(1) weights per label, every label seen by every model;
  ``"classic"``: multinomial resampling counts; ``"none"``). Labels are weighted by
  1 / (stderr^2 + stderr_floor^2). :func:`fit_ensemble` always re-initialises and trains on all labels it
  is given (no warm start), so the ensemble never carries memory of an earlier fit.
* Offset: a PMF is defined up to a constant; after fitting, the constant is chosen so that the ensemble
  mean is 0 kT at the lowest training label (the PMF minimum over the sampled region).

:func:`export_pmf` writes the ensemble as a TorchScript ``pmf.pt`` per the file contract
(``design.md``): ``forward(s) -> mean [N]`` kT in the dtype of ``s``, ``mean_and_spread(s)``, attributes
``cg_names``, ``periodic``, ``temperature`` (K), ``cg_atoms`` and a JSON ``metadata`` string.
"""


import json
import math
import os
import tempfile
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["PMFEnsemble", "fit_ensemble", "export_pmf", "FORMAT_VERSION"]

#: Version of the pmf.pt layout written by :func:`export_pmf`.
FORMAT_VERSION = 1
TWO_PI = 2.0 * math.pi


class StackedLinear(nn.Module):
    """``n_models`` independent affine layers: x [n_models, B, n_in] -> [n_models, B, n_out].

    weight [n_models, n_in, n_out], bias [n_models, 1, n_out]; computed in the dtype of ``x``.
    """

    def __init__(self, n_models: int, n_in: int, n_out: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_models, n_in, n_out, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_models, 1, n_out, dtype=dtype))

    def reset(self, generator: torch.Generator) -> None:
        """nn.Linear's default initialisation, independently for every model."""
        n_in = self.weight.shape[1]
        bound = 1.0 / math.sqrt(n_in)
        with torch.no_grad():
            w = torch.rand(self.weight.shape, generator=generator, dtype=torch.float64) * 2 - 1
            b = torch.rand(self.bias.shape, generator=generator, dtype=torch.float64) * 2 - 1
            self.weight.copy_(w * bound)
            self.bias.copy_(b * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.to(x.dtype), x, self.weight.to(x.dtype))


class PMFEnsemble(nn.Module):
    """Ensemble of ``n_models`` MLPs giving a PMF in kT; TorchScript-compatible (the pmf.pt module).

    Args:
        periodic: per CG coordinate, whether it is a dihedral (period 2 pi, radians).
        n_models: ensemble size.
        hidden: hidden layer widths.
        cg_names, temperature (K), cg_atoms: metadata carried into pmf.pt (see :func:`export_pmf`).
    Shapes: ``s`` [N, d] -> ``forward`` [N]; ``predict_all`` [n_models, N]; ``mean_and_spread`` two [N].
    """

    cg_names: List[str]
    periodic: List[bool]
    temperature: float
    cg_atoms: List[List[int]]
    n_models: int
    n_cg: int
    metadata: str

    def __init__(self, periodic: Sequence[bool], n_models: int = 10, hidden: Sequence[int] = (64, 64),
                 cg_names: Optional[Sequence[str]] = None, temperature: float = 0.0,
                 cg_atoms: Optional[Sequence[Sequence[int]]] = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        periodic = [bool(p) for p in periodic]
        if len(periodic) == 0:
            raise ValueError("at least one CG coordinate is needed")
        if n_models < 1:
            raise ValueError(f"n_models must be >= 1, got {n_models}")
        self.periodic = periodic
        self.n_cg = len(periodic)
        self.n_models = int(n_models)
        self.hidden = [int(h) for h in hidden]
        self.cg_names = list(cg_names) if cg_names is not None else [f"s{k}" for k in range(self.n_cg)]
        self.temperature = float(temperature)
        self.cg_atoms = [[int(i) for i in q] for q in (cg_atoms or [])]
        self.metadata = "{}"
        n_in = sum(2 if p else 1 for p in periodic)
        sizes = [n_in] + self.hidden + [1]
        self.layers = nn.ModuleList(
            [StackedLinear(self.n_models, a, b, dtype) for a, b in zip(sizes[:-1], sizes[1:])])
        # Input standardisation (non-periodic coordinates only), target standardisation, PMF offset (kT).
        self.register_buffer("s_mean", torch.zeros(self.n_cg, dtype=torch.float64))
        self.register_buffer("s_scale", torch.ones(self.n_cg, dtype=torch.float64))
        self.register_buffer("y_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("y_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("offset", torch.zeros((), dtype=torch.float64))

    def reset_parameters(self, generator: torch.Generator) -> None:
        for layer in self.layers:
            layer.reset(generator)

    def features(self, s: torch.Tensor) -> torch.Tensor:
        """Network inputs [N, n_in]: (cos, sin) of periodic coordinates, standardised others."""
        cols: List[torch.Tensor] = []
        mean = self.s_mean.to(s.dtype)
        scale = self.s_scale.to(s.dtype)
        for k in range(self.n_cg):
            x = s[:, k]
            if self.periodic[k]:
                cols.append(torch.cos(x))
                cols.append(torch.sin(x))
            else:
                cols.append((x - mean[k]) / scale[k])
        return torch.stack(cols, dim=1)

    def predict_standardised(self, s: torch.Tensor) -> torch.Tensor:
        """Raw network outputs [n_models, N] (standardised target units)."""
        x = self.features(s)
        h = x.unsqueeze(0).expand(self.n_models, x.shape[0], x.shape[1])
        n_layers = len(self.layers)
        i = 0
        for layer in self.layers:
            h = layer(h)
            if i < n_layers - 1:
                h = torch.nn.functional.silu(h)
            i += 1
        return h.squeeze(-1)

    @torch.jit.export
    def predict_all(self, s: torch.Tensor) -> torch.Tensor:
        """PMF of every model [n_models, N] in kT at s [N, d]."""
        if s.dim() != 2 or s.shape[1] != self.n_cg:
            raise ValueError("s must have shape [N, n_cg]")
        y = self.predict_standardised(s)
        return y * self.y_scale.to(s.dtype) + (self.y_mean - self.offset).to(s.dtype)

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean [N] and standard deviation [N] (population form), both kT, dtype of s."""
        a = self.predict_all(s)
        mean = a.mean(dim=0)
        var = ((a - mean.unsqueeze(0)) ** 2).mean(dim=0)
        return mean, torch.sqrt(var)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Ensemble-mean PMF [N] in kT at s [N, d] (same dtype as s)."""
        return self.predict_all(s).mean(dim=0)


# ------------------------------------------------------------------------------------------ fitting
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
    for k, p in enumerate(periodic):
        if p:
            s[:, k] = np.mod(s[:, k] + math.pi, TWO_PI) - math.pi
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


class _Adam:
    """Plain Adam (Kingma & Ba) on a list of tensors; torch.optim.Adam's first use imports torch._dynamo (~2 s)."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = params
        self.b1, self.b2 = betas
        self.eps = eps
        self.wd = weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads, lr: float) -> None:
        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.wd:
                g = g + self.wd * p
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / c1)


def fit_ensemble(s, A, stderr=None, periodic: Optional[Sequence[bool]] = None, n_models: int = 10,
                 hidden: Sequence[int] = (64, 64), epochs: Optional[int] = None, seed: int = 0,
                 progress: bool = False, steps: int = 3000, batch_size: int = 512, lr: float = 3e-2,
                 lr_final: float = 1e-4, weight_decay: float = 0.0, bootstrap: str = "bayesian",
                 stderr_floor: float = 0.05,
                 cg_names: Optional[Sequence[str]] = None, temperature: float = 0.0,
                 cg_atoms: Optional[Sequence[Sequence[int]]] = None,
                 dtype: torch.dtype = torch.float32) -> PMFEnsemble:
    """Fit a :class:`PMFEnsemble` to free-energy labels, all models at once.

    Args:
        s: CG points [M, d] (radians for dihedrals; nm otherwise).
        A: free-energy labels [M] in kT (any common offset). Labels with A = +inf or NaN (or a
           non-finite s / stderr) are dropped with a ``RuntimeWarning`` and never trained on; if none is
           left a ``ValueError`` is raised.
        stderr: standard errors [M] of A in kT, or None (all labels weighted equally). Weights are
           1 / (stderr^2 + stderr_floor^2).
        periodic: per coordinate, True for dihedrals (period 2 pi).
        n_models, hidden: ensemble size and hidden widths of every MLP.
        epochs: passes over the labels; None (default) gives ``steps`` Adam steps whatever the number of
           labels. Mini-batches of ``batch_size`` labels (full batch when M <= batch_size); learning rate
           decaying as a cosine from ``lr`` to ``lr_final``. The defaults (3,000 steps of <= 512 labels,
           10 x [64, 64]) fit 200 labels to ~0.02 kT in ~4 s and 2,000 labels in ~15-30 s on one core.
        seed: seeds the initialisation and the bootstraps (same seed, same ensemble).
        bootstrap: ``"bayesian"`` (default), ``"classic"`` or ``"none"``; see the module docstring.
        cg_names, temperature, cg_atoms: metadata stored on the ensemble (used by :func:`export_pmf`).
        dtype: training dtype (float32 is ~2x faster on CPU); the returned ensemble is float64.
    Returns the fitted ensemble (float64, eval mode) with ``fit_info`` (a dict: n_labels, n_dropped,
    rmse_kT of the mean on the labels, wall_s).
    """
    t0 = time.perf_counter()
    s_np, A_np, se_np, periodic, n_bad = _clean_labels(s, A, stderr, periodic)
    m, d = s_np.shape
    gen = torch.Generator().manual_seed(int(seed))
    ens = PMFEnsemble(periodic, n_models, hidden, cg_names=cg_names, temperature=temperature, cg_atoms=cg_atoms,
                      dtype=torch.float64)
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
    params = [p for p in ens.parameters()]
    batch_size = m if batch_size is None else max(1, min(int(batch_size), m))
    steps_per_epoch = math.ceil(m / batch_size)
    if epochs is None:
        epochs = max(1, math.ceil(int(steps) / steps_per_epoch))
    elif int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1 (or None for the default number of steps), got {epochs}")
    total = max(1, int(epochs) * steps_per_epoch)
    opt = _Adam(params, weight_decay=weight_decay)

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
    n_layers = len(ens.layers)

    def net(f):
        h = f.unsqueeze(0).expand(ens.n_models, f.shape[0], f.shape[1])
        for i, layer in enumerate(ens.layers):
            h = layer(h)
            if i < n_layers - 1:
                h = torch.nn.functional.silu(h)
        return h.squeeze(-1)

    step = 0
    for _ in it:
        if steps_per_epoch == 1:
            batches = [slice(None)]
        else:
            perm = torch.randperm(m, generator=gen)
            batches = list(perm.tensor_split(steps_per_epoch))
        for b in batches:
            pred = net(feats[b])
            loss = (weights[:, b] * (pred - y[b]) ** 2).mean(dim=1).sum()
            grads = torch.autograd.grad(loss, params)
            opt.step(grads, lr_at(step))
            step += 1

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
                    "epochs": int(epochs), "bootstrap": bootstrap}
    ens.metadata = json.dumps({"format_version": FORMAT_VERSION, "n_models": ens.n_models, "hidden": ens.hidden,
                               "n_labels": int(m), "fit_rmse_kT": rmse, "bootstrap": bootstrap, "seed": int(seed)})
    return ens


# ------------------------------------------------------------------------------------------- export
def _clean_copy(ensemble: PMFEnsemble, cg_names, periodic, temperature, cg_atoms, extra: dict) -> PMFEnsemble:
    periodic = [bool(p) for p in periodic]
    if periodic != list(ensemble.periodic):
        raise ValueError(f"periodic {periodic} does not match the ensemble's {list(ensemble.periodic)}")
    cg_names = [str(n) for n in cg_names]
    if len(cg_names) != ensemble.n_cg:
        raise ValueError(f"{len(cg_names)} cg_names for an ensemble of {ensemble.n_cg} CG coordinates")
    cg_atoms = [[int(i) for i in q] for q in (cg_atoms or [])]
    if cg_atoms:
        if len(cg_atoms) != ensemble.n_cg or any(len(q) != 4 for q in cg_atoms):
            raise ValueError(f"cg_atoms must be one atom quadruple per CG coordinate ({ensemble.n_cg}), got {cg_atoms}")
        if not all(periodic):
            raise ValueError("cg_atoms given but not every CG coordinate is periodic (a dihedral)")
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number of kelvin, got {temperature!r}")
    out = PMFEnsemble(periodic, ensemble.n_models, ensemble.hidden, cg_names=cg_names, temperature=temperature,
                      cg_atoms=cg_atoms, dtype=torch.float64)
    out.load_state_dict({k: v.detach().to(torch.float64) for k, v in ensemble.state_dict().items()})
    for p in out.parameters():
        p.requires_grad_(False)
    meta = {}
    try:
        meta.update(json.loads(ensemble.metadata))
    except (ValueError, TypeError):
        pass
    try:
        from . import __version__
    except ImportError:  # pragma: no cover
        __version__ = "unknown"
    meta.update({"format_version": FORMAT_VERSION, "n_models": ensemble.n_models, "hidden": list(ensemble.hidden),
                 "openmm_cgflow_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "energy_unit": "kT", "spread": "population standard deviation over models"})
    meta.update(extra)
    out.metadata = json.dumps(meta)
    return out.eval()


def export_pmf(ensemble: PMFEnsemble, path, cg_names: Sequence[str], periodic: Sequence[bool], temperature: float,
               cg_atoms: Optional[Sequence[Sequence[int]]] = None, **metadata) -> str:
    """Write the ensemble as a TorchScript ``pmf.pt`` (atomically: temp file in the same folder + rename).

    Args:
        ensemble: a fitted :class:`PMFEnsemble`.
        path: output file.
        cg_names: one name per CG coordinate.
        periodic: per coordinate, True for dihedrals; must match the ensemble.
        temperature: K at which the labels (kT) were computed.
        cg_atoms: atom quadruple (0-based) per dihedral CG coordinate; empty/None for non-dihedral CG.
        **metadata: JSON-serialisable extras stored in the module's ``metadata`` string.
    Returns the path written.
    """
    module = torch.jit.script(_clean_copy(ensemble, cg_names, periodic, temperature, cg_atoms, metadata))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pmf-", suffix=".pt.tmp")
    os.close(fd)
    try:
        torch.jit.save(module, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --------------------------------------------------------------------------------------------- demos
def fit_to_reference(name: str = "alanine-dipeptide", n_labels: int = 2000, noise_kT: float = 0.0, seed: int = 0,
                     **fit_kwargs) -> Tuple[PMFEnsemble, dict]:
    """An ensemble fitted to a packaged reference PMF (a "good PMF" for demos, examples and benchmarks).

    Labels are the reference free energy (kT) at ``n_labels`` random bin centres of its grid (jittered
    within the bin for alanine dipeptide), plus optional Gaussian noise ``noise_kT`` (also used as stderr).
    ``name``: ``"alanine-dipeptide"`` (the well-tempered-metadynamics reference,
    ``openmm_cgflow/data/aldp_reference_pmf.npz``, 300 K) or ``"mueller-brown"`` (exact quadrature,
    1202.7 K). Returns (ensemble, export keyword arguments for :func:`export_pmf`).
    """
    from . import metrics

    rng = np.random.default_rng(seed)
    key = name.lower().replace("_", "-")
    if key in ("alanine-dipeptide", "aldp"):
        ref = metrics.load_reference("alanine-dipeptide")
        F = ref.get("free_energy_kT")
        if F is None:
            F = metrics.probabilities_to_pmf(ref["probabilities"])
        pts = metrics.reference_grid_points(ref)
        idx = rng.choice(len(pts), size=min(n_labels, len(pts)), replace=False)
        width = 2 * math.pi / F.shape[0]
        s = pts[idx] + rng.uniform(-0.5, 0.5, size=(len(idx), 2)) * width
        A = np.asarray(F, dtype=np.float64).ravel()[idx]
        export = dict(cg_names=["phi", "psi"], periodic=[True, True], temperature=300.0,
                      cg_atoms=[[4, 6, 8, 14], [6, 8, 14, 16]], source="aldp_reference_pmf.npz (WT-metaD reference)")
        periodic = [True, True]
    elif key in ("mueller-brown", "mb"):
        from .mueller_brown import TEMPERATURE

        A_ref = metrics.mueller_brown_reference_pmf()
        centres = metrics.mb_bin_centres()
        idx = rng.choice(len(centres), size=min(n_labels, len(centres)), replace=False)
        s = centres[idx][:, None]
        A = A_ref[idx]
        keep = np.isfinite(A)
        s, A = s[keep], A[keep]
        export = dict(cg_names=["s"], periodic=[False], temperature=TEMPERATURE, cg_atoms=[],
                      source="exact Mueller-Brown PMF (quadrature)")
        periodic = [False]
    else:
        raise ValueError(f"unknown reference {name!r}")
    if noise_kT > 0:
        A = A + noise_kT * rng.standard_normal(len(A))
    stderr = np.full(len(A), noise_kT) if noise_kT > 0 else None
    ens = fit_ensemble(s, A, stderr, periodic, seed=seed, **fit_kwargs)
    return ens, export
