"""Conditional normalizing flow q(fine | s) over fine internal coordinates given CG coordinates s.

The flow maps base samples z to fine coordinates through a stack of coupling layers of rational-quadratic
(RQ) splines (Durkan et al. 2019):

* circular fine dims (angles, domain [-pi, pi)) use *circular* splines on [-pi, pi] whose end-point
  derivatives are equal (Rezende et al. 2020), with a fixed random periodic shift of every circular dim
  after each layer (the shifts sum to zero, so the flow is exactly the identity at init); their base is uniform on [-pi, pi);
* non-circular fine dims (already standardised by the coordinate transform) use splines on
  [-tail_bound, tail_bound] with identity (linear) tails outside; their base is a standard normal;
* with a single fine dim (Mueller-Brown's s_perp), a coupling split is impossible: every layer then
  transforms all fine dims with spline parameters that are a function of the context alone, i.e. a
  stack of conditional splines q(s_perp | s), which can be multimodal (an affine flow cannot).

The context fed to every conditioner is (cos s, sin s) for periodic CG dims and (s - loc) / scale for the
others. A first conditional affine layer (loc and scale functions of s only) moves and scales the
non-circular base dims before the splines, which then shape them inside the fixed domain
[-tail_bound, tail_bound] of the fine coordinates (so a narrowing scale cannot cut off the tails). The last layer of every conditioner is zero, so the flow is the identity at initialisation
(fine = z with z from the base).

Written by hand (not zuko): the coupling layer and the spline. zuko's ``NCSF`` measured ~180 samples/s with
log-prob and backward for alanine-dipeptide sizes on one core (``torch.searchsorted`` bin finding, one
``MonotonicRQSTransform`` per dim group, per-layer overheads); this module finds bins by comparison
against the K-1 inner knots (no searchsorted), evaluates one fused conditioner per layer that outputs all
spline parameters, and treats circular and bounded dims in one vectorised spline call.
See benchmarks/flow_throughput.py and benchmarks/RESULTS.md for the measured throughput.

Shapes: s [B, n_cg] (radians for periodic dims), fine [B, n_fine], log densities [B] (natural log, per unit
volume of the fine coordinates).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from openmm_cgflow_plugin.cgspace import wrap_angle
from torch import nn

__all__ = ["ConditionalFlow", "flow_for", "rq_spline"]

_PI = math.pi
_TWO_PI = 2.0 * math.pi


def rq_spline(
    x: torch.Tensor,
    raw: torch.Tensor,
    bound: torch.Tensor,
    circular: torch.Tensor,
    inverse: bool = False,
    min_width: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise rational-quadratic spline on [-bound, bound], vectorised over dims of both kinds.

    Args:
        x: inputs [B, D].
        raw: unconstrained parameters [B, D, 3K+1]: K widths, K heights, K+1 knot derivatives.
        bound: half-width of the spline domain per dim [D] (pi for circular dims).
        circular: bool [D]. Circular dims get equal end derivatives (d_K := d_0) and no tails; the others
            get end derivatives 1 and identity tails outside [-bound, bound].
        inverse: evaluate the inverse spline instead.

    Returns:
        (y [B, D], log|dy/dx| [B, D]) for the direction evaluated.
    With raw = 0 the spline is the identity.
    """
    K = (raw.shape[-1] - 1) // 3
    w_raw, h_raw, d_raw = torch.split(raw, [K, K, K + 1], dim=-1)
    width = bound[:, None] * 2.0
    scale = (1.0 - min_width * K) * width
    widths = min_width * width + scale * _softmax(w_raw)
    heights = min_width * width + scale * _softmax(h_raw)
    shift = math.log(math.expm1(1.0 - min_derivative))
    derivs = min_derivative + nn.functional.softplus(d_raw + shift)
    # end derivatives: circular -> d_K = d_0 ; bounded -> d_0 = d_K = 1 (matching identity tails)
    d_end = torch.where(circular[:, None], derivs[..., :1], torch.ones_like(derivs[..., :1]))
    derivs = torch.cat([d_end, derivs[..., 1:K], d_end], dim=-1)

    lo = -bound[:, None]
    # knot positions [B, D, K+1]; first and last fixed exactly at the domain ends
    edge_lo = lo.expand_as(widths[..., :1])
    xk = torch.cat([edge_lo, lo + torch.cumsum(widths[..., :-1], dim=-1), -edge_lo], dim=-1)
    yk = torch.cat([edge_lo, lo + torch.cumsum(heights[..., :-1], dim=-1), -edge_lo], dim=-1)

    b = bound
    bounded = not bool(circular.all())
    xc = torch.clamp(x, -b, b) if bounded else x
    knots = yk if inverse else xk
    idx = (xc[..., None] >= knots[..., 1:K]).sum(dim=-1, keepdim=True)  # bin index [B, D, 1] in [0, K-1]
    # one gather for the knots on both sides of the bin: [B, D, 3, 2] -> (x, y, d) at (k, k+1)
    table = torch.stack([xk, yk, derivs], dim=-2)
    both = torch.cat([idx, idx + 1], dim=-1)[..., None, :].expand(*idx.shape[:-1], 3, 2)
    g = torch.gather(table, -1, both)
    x_k, y_k, d_k = g[..., 0, 0], g[..., 1, 0], g[..., 2, 0]
    w_k, h_k, d_k1 = g[..., 0, 1] - x_k, g[..., 1, 1] - y_k, g[..., 2, 1]
    slope = h_k / w_k
    dsum = d_k1 + d_k - 2.0 * slope
    if not inverse:
        xi = (xc - x_k) / w_k
        xi1 = xi * (1.0 - xi)
        den = slope + dsum * xi1
        y = y_k + h_k * (slope * xi * xi + d_k * xi1) / den
    else:
        dy = xc - y_k
        qa = h_k * (slope - d_k) + dy * dsum
        qb = h_k * d_k - dy * dsum
        qc = -slope * dy
        disc = torch.clamp(qb * qb - 4.0 * qa * qc, min=0.0)
        xi = (2.0 * qc) / (-qb - torch.sqrt(disc))
        xi = torch.clamp(xi, 0.0, 1.0)
        xi1 = xi * (1.0 - xi)
        den = slope + dsum * xi1
        y = xi * w_k + x_k
    logdet = (
        2.0 * torch.log(slope)
        + torch.log(d_k1 * xi * xi + 2.0 * slope * xi1 + d_k * (1.0 - xi) ** 2)
        - 2.0 * torch.log(den)
    )
    if inverse:
        logdet = -logdet
    if bounded:
        inside = (x >= -b) & (x <= b)
        y = torch.where(inside, y, x)
        logdet = torch.where(inside, logdet, torch.zeros_like(logdet))
    return y, logdet


def _softmax(a: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (short) dim; faster than torch.softmax for K ~ 8 on CPU."""
    e = torch.exp(a - a.detach().amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


class _MLP(nn.Module):
    """Plain MLP with SiLU activations; the last layer is zero-initialised (identity flow at init)."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int):
        super().__init__()
        layers = []
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.SiLU()]
            n_in = h
        last = nn.Linear(n_in, n_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _SplineCoupling(nn.Module):
    """One coupling layer: dims ``transformed`` get an RQ spline whose parameters are a function of the
    identity dims (circular ones encoded as cos/sin) and of the context; with no identity dims the
    parameters depend on the context only."""

    def __init__(self, circular, transformed, n_context, hidden, n_bins, tail_bound):
        super().__init__()
        n_fine = circular.numel()
        mask = torch.zeros(n_fine, dtype=torch.bool)
        mask[transformed] = True
        t_idx = torch.nonzero(mask).flatten()
        i_idx = torch.nonzero(~mask).flatten()
        self.register_buffer("t_idx", t_idx)
        self.register_buffer("i_idx", i_idx)
        self.register_buffer("perm_inv", torch.argsort(torch.cat([i_idx, t_idx])))
        self.register_buffer("t_circ", circular[t_idx].clone())
        self.register_buffer("i_circ", circular[i_idx].clone())
        self.register_buffer("t_bound", torch.where(circular[t_idx], _PI, float(tail_bound)).double())
        self.n_bins = n_bins
        n_in = int(i_idx.numel() + self.i_circ.sum()) + n_context
        self.conditioner = _MLP(n_in, hidden, t_idx.numel() * (3 * n_bins + 1))

    def _params(self, x_id, ctx):
        if x_id.shape[1]:
            circ = self.i_circ
            if circ.any():
                feats = [x_id[:, ~circ], torch.cos(x_id[:, circ]), torch.sin(x_id[:, circ]), ctx]
            else:
                feats = [x_id, ctx]
            h = torch.cat(feats, dim=1)
        else:
            h = ctx
        return self.conditioner(h).view(h.shape[0], self.t_idx.numel(), 3 * self.n_bins + 1)

    def forward(self, x, ctx, inverse=False):
        x_id = x[:, self.i_idx]
        x_t = x[:, self.t_idx]
        raw = self._params(x_id, ctx)
        y_t, ld = rq_spline(x_t, raw, self.t_bound.to(x.dtype), self.t_circ, inverse=inverse)
        if self.t_circ.any():
            # guard against round-off reaching +pi exactly
            y_t = torch.where(self.t_circ & (y_t >= _PI), y_t - _TWO_PI, y_t)
        out = torch.cat([x_id, y_t], dim=1)[:, self.perm_inv]
        return out, ld.sum(dim=1)


class _ConditionalAffine(nn.Module):
    """fine = loc(ctx) + exp(log_scale(ctx)) * y on the non-circular dims; zero-initialised (identity)."""

    def __init__(self, circular, n_context, hidden):
        super().__init__()
        self.register_buffer("idx", torch.nonzero(~circular).flatten())
        self.net = _MLP(n_context, hidden, 2 * int(self.idx.numel()))

    def forward(self, x, ctx, inverse=False):
        loc, log_scale = self.net(ctx).chunk(2, dim=1)
        x_nc = x[:, self.idx]
        y = (x_nc - loc) * torch.exp(-log_scale) if inverse else loc + torch.exp(log_scale) * x_nc
        out = x.index_copy(1, self.idx, y)
        ld = log_scale.sum(dim=1)
        return out, (-ld if inverse else ld)


class ConditionalFlow(nn.Module):
    """Conditional normalizing flow q(fine | s) with RQ-spline coupling layers.

    Args:
        n_fine: number of fine coordinates.
        circular: bool [n_fine], which fine dims are angles on [-pi, pi).
        n_cg: number of CG coordinates.
        cg_periodic: per CG dim, whether it is periodic (encoded as cos, sin).
        n_layers: coupling layers (pairs of complementary random masks).
        hidden: conditioner hidden widths.
        affine_hidden: hidden widths of a first conditional affine layer on the non-circular dims,
            y = loc(s) + scale(s) * z, before the splines (None: no such layer).
        affine_last: put the conditional affine layer after the splines instead (fine = loc(s) + scale(s) * y
            with y from the splines): the splines then shape a standardised variable, so their bins resolve
            conditionals much narrower than the spline domain (Mueller-Brown's s_perp in nm has conditional
            widths 0.1-0.5 against a domain of +-5; measured min ESS/N at 64 points 0.23 -> see flow_for).
        n_bins: spline bins K.
        tail_bound: half-width of the spline domain of non-circular dims (identity tails outside).
        cg_loc, cg_scale: standardisation of non-periodic CG dims, context = (s - loc) / scale
            (sequences of length n_cg, entries of periodic dims are ignored; default 0 and 1).
        dtype: parameter dtype (float64 by default; float32 trains faster).
        seed: seed for the masks and periodic shifts, and for the initial weights unless ``init_seed`` is
            given. Construction never changes torch's global RNG state: the same seeds give the same flow.
        init_seed: seed of the initial weights (default: ``seed``).

    Methods ``sample`` and ``log_prob`` return densities of the fine coordinates given s.
    """

    def __init__(
        self,
        n_fine: int,
        circular,
        n_cg: int,
        cg_periodic: Sequence[bool],
        n_layers: int = 8,
        hidden: Sequence[int] = (192, 192),
        affine_hidden: Sequence[int] | None = (64,),
        affine_last: bool = False,
        n_bins: int = 8,
        tail_bound: float = 5.0,
        cg_loc: Sequence[float] | None = None,
        cg_scale: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
        init_seed: int | None = None,
    ):
        super().__init__()
        circular = torch.as_tensor(circular, dtype=torch.bool).flatten()
        if circular.numel() != n_fine:
            raise ValueError(f"circular has {circular.numel()} entries, expected n_fine = {n_fine}")
        if len(cg_periodic) != n_cg:
            raise ValueError(f"cg_periodic has {len(cg_periodic)} entries, expected n_cg = {n_cg}")
        self.n_fine, self.n_cg = int(n_fine), int(n_cg)
        self.register_buffer("circular", circular)
        self.register_buffer("cg_periodic_mask", torch.as_tensor(list(cg_periodic), dtype=torch.bool))
        self.cg_periodic = [bool(p) for p in cg_periodic]
        loc = torch.zeros(n_cg, dtype=torch.float64) if cg_loc is None else torch.as_tensor(cg_loc, dtype=torch.float64)
        scale = torch.ones(n_cg, dtype=torch.float64) if cg_scale is None else torch.as_tensor(cg_scale, dtype=torch.float64)
        self.register_buffer("cg_loc", loc.clone())
        self.register_buffer("cg_scale", scale.clone())
        self.n_context = 2 * int(self.cg_periodic_mask.sum()) + int((~self.cg_periodic_mask).sum())
        self.hparams = dict(
            n_fine=n_fine, circular=circular.tolist(), n_cg=n_cg, cg_periodic=self.cg_periodic,
            n_layers=n_layers, hidden=list(hidden),
            affine_hidden=None if affine_hidden is None else list(affine_hidden), affine_last=bool(affine_last), n_bins=n_bins, tail_bound=tail_bound,
            cg_loc=loc.tolist(), cg_scale=scale.tolist(), seed=seed,
        )

        g = torch.Generator().manual_seed(seed)
        # nn.Linear draws its initial weights from torch's default CPU generator: seed it with init_seed
        # inside fork_rng, which restores the caller's RNG state afterwards (no global RNG change)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed if init_seed is None else init_seed))
            layers, shifts = [], []
            mask = None
            for i in range(n_layers):
                if n_fine == 1:
                    transformed = torch.tensor([0])
                else:
                    if i % 2 == 0:
                        perm = torch.randperm(n_fine, generator=g)
                        mask = torch.zeros(n_fine, dtype=torch.bool)
                        mask[perm[: n_fine // 2]] = True
                    else:
                        mask = ~mask
                    transformed = torch.nonzero(mask).flatten()
                layers.append(_SplineCoupling(circular, transformed, self.n_context, hidden, n_bins, tail_bound))
                shifts.append(torch.where(circular, (torch.rand(n_fine, generator=g, dtype=torch.float64) * 2 - 1) * _PI, 0.0))
            affine = None
            if affine_hidden is not None and bool((~circular).any()):
                affine = _ConditionalAffine(circular, self.n_context, affine_hidden)
        if shifts:
            # the last shift undoes the others, so that the flow with identity splines is exactly the identity
            shifts[-1] = torch.where(circular, wrap_angle(-torch.stack(shifts[:-1]).sum(0)), 0.0) if len(shifts) > 1 else torch.zeros(n_fine, dtype=torch.float64)
        self.layers = nn.ModuleList(layers)
        self.affine = affine
        self.affine_last = bool(affine_last)
        self.register_buffer("shifts", torch.stack(shifts) if shifts else torch.zeros(0, n_fine, dtype=torch.float64))
        self.to(dtype)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.cg_loc.dtype

    def context(self, s: torch.Tensor) -> torch.Tensor:
        """Conditioner input [B, n_context] from CG coordinates s [B, n_cg]."""
        s = s.to(self.dtype)
        per = self.cg_periodic_mask
        parts = []
        if per.any():
            parts += [torch.cos(s[:, per]), torch.sin(s[:, per])]
        if (~per).any():
            parts.append((s[:, ~per] - self.cg_loc[~per]) / self.cg_scale[~per])
        return torch.cat(parts, dim=1)

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p_z(z) [B]: uniform on [-pi, pi) for circular dims, standard normal otherwise."""
        circ = self.circular
        n_circ = int(circ.sum())
        lp = -0.5 * (z[:, ~circ] ** 2).sum(dim=1) - 0.5 * math.log(_TWO_PI) * (self.n_fine - n_circ)
        return lp - n_circ * math.log(_TWO_PI)

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Base samples z [n, n_fine]."""
        dev = self.cg_loc.device
        # Draw where the generator lives (a CPU generator gives the same numbers whatever the flow's device).
        src = generator.device if generator is not None else dev
        z = torch.randn(n, self.n_fine, generator=generator, dtype=self.dtype, device=src).to(dev)
        u = (torch.rand(n, self.n_fine, generator=generator, dtype=self.dtype, device=src).to(dev) * 2.0 - 1.0) * _PI
        return torch.where(self.circular, u, z)

    @property
    def device(self) -> torch.device:
        """The device of the flow's parameters."""
        return self.cg_loc.device

    def _shift(self, x, i, sign):
        if not self.circular.any():
            return x
        return torch.where(self.circular, wrap_angle(x + sign * self.shifts[i].to(x.dtype)), x)

    # ------------------------------------------------------------------ transforms
    def forward_transform(self, z: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base -> fine: (fine [B, n_fine], log|det d fine / d z| [B])."""
        ctx = self.context(s)
        x = z.to(self.dtype)
        logdet = torch.zeros(x.shape[0], dtype=self.dtype, device=x.device)
        if self.affine is not None and not self.affine_last:
            x, logdet = self.affine(x, ctx)
        for i, layer in enumerate(self.layers):
            x, ld = layer(x, ctx)
            logdet = logdet + ld
            x = self._shift(x, i, +1.0)
        if self.affine is not None and self.affine_last:
            x, ld = self.affine(x, ctx)
            logdet = logdet + ld
        return x, logdet

    def inverse_transform(self, fine: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine -> base: (z [B, n_fine], log|det d z / d fine| [B])."""
        ctx = self.context(s)
        x = fine.to(self.dtype)
        if self.circular.any():
            x = torch.where(self.circular, wrap_angle(x), x)
        logdet = torch.zeros(x.shape[0], dtype=self.dtype, device=x.device)
        if self.affine is not None and self.affine_last:
            x, logdet = self.affine(x, ctx, inverse=True)
        for i in reversed(range(len(self.layers))):
            x = self._shift(x, i, -1.0)
            x, ld = self.layers[i](x, ctx, inverse=True)
            logdet = logdet + ld
        if self.affine is not None and not self.affine_last:
            x, ld = self.affine(x, ctx, inverse=True)
            logdet = logdet + ld
        return x, logdet

    # ------------------------------------------------------------------ public API
    def sample(self, s: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One reparameterised sample per row of s [B, n_cg]: (fine [B, n_fine], log q(fine | s) [B])."""
        z = self.sample_base(s.shape[0], generator)
        fine, logdet = self.forward_transform(z, s)
        return fine, self.base_log_prob(z) - logdet

    def log_prob(self, fine: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log q(fine | s) [B] for fine [B, n_fine] and s [B, n_cg]."""
        z, logdet = self.inverse_transform(fine, s)
        return self.base_log_prob(z) + logdet


def resolve_device(device=None) -> torch.device:
    """``torch.device`` for the flow from a name ("cpu", "cuda", "cuda:1") or None (CPU).

    Raises ValueError naming the problem when the device does not exist here (e.g. "cuda" without a GPU
    or without a CUDA build of torch). Energies always run on CPU (OpenMM workers); only the flow moves.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device name such as 'cpu' or 'cuda': {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available to torch here "
                             f"(torch {torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use 'cpu' or 'cuda'")
    return dev


def flow_for(cgsystem, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> ConditionalFlow:
    """A :class:`ConditionalFlow` with the package's default size for ``cgsystem`` (a CGSystem).

    The constructor's defaults (molecules: 8 coupling layers of width 192), updated by the flow keyword
    arguments of the system's registry entry (:mod:`openmm_cgflow.registry`; e.g. Mueller-Brown's small
    flow), then by ``overrides``.
    """
    from .registry import entry_for

    coords = cgsystem.coordinates
    circular = getattr(coords, "circular", None)
    n_fine = int(coords.n_fine)
    if circular is None:
        circular = [False] * n_fine
    kwargs = dict(dtype=dtype, seed=seed, init_seed=seed)
    item = entry_for(cgsystem)
    if item is not None:
        kwargs.update(item.flow)
    kwargs.update(overrides)
    return ConditionalFlow(n_fine, circular, cgsystem.n_cg, cgsystem.cg_periodic, **kwargs)
