"""Marginal free energies of a d-dimensional PMF, and the forward KL divergence of marginals.

For a PMF A(s) in kT on d CG coordinates and a subset ``axes`` (one or two coordinates, e.g. a residue's
(phi_i, psi_i)), the marginal free energy is F(s_a) = -ln integral exp(-A(s_a, s_rest)) ds_rest (kT, shifted
to minimum 0). It is obtained

* from samples distributed as exp(-A) (e.g. CG-walker frames, optionally reweighted): the histogram of the
  projection ``s[:, axes]`` (:func:`marginal_histogram`, the one
  :func:`~openmm_cgflow_plugin.statistics.weighted_histogram`), F = -ln p;
* from the PMF itself (:func:`marginal_free_energy`): the integral over the other d - k coordinates by a
  midpoint-rule quadrature (small d; spectrally accurate for smooth periodic A) or by Monte Carlo with
  uniform points common to all bins (any d). The same integral weights the ensemble spread: the marginal
  spread is the exp(-A)-weighted mean of the spread over the other coordinates (kT);
* from importance samples of exp(-A) (:func:`importance_samples`, ``method="importance"``): a two-stage
  adaptive proposal (uniform pilot points, then a defensive mixture of Gaussians around pilot points drawn by
  their weight exp(-A)). For d >= 4 and a PMF whose mass sits in a small part of CG space (a peptide's
  Ramachandran basins: ~1 % of the 6-torus for three residues), uniform quadrature or Monte Carlo points
  waste nearly all evaluations; the adaptive proposal puts them where exp(-A) is, and its weights keep the
  estimate exact in the limit (the uniform component keeps every region reachable). Written here because the
  estimator must take the project's pmf.pt contract and periodic CG coordinates; no field library offers
  that for a TorchScript PMF.

The divergence is the project's metric, forward KL D(p_ref || p_est) on bins (:func:`forward_kld`), with
sample histograms smoothed by a Gaussian of one bin (periodic where the axis is) plus a floor of 1e-12
(:func:`smoothed_probabilities`), exactly as ``openmm_cgflow.metrics`` defines it; :func:`marginal_kld`
and :func:`pmf_marginal_kld` apply it to marginals. Units: radians for periodic coordinates (wrapped into
[-pi, pi)), nm otherwise; free energies and spreads in kT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .pmf import PMF, load_pmf
from .statistics import weighted_histogram

__all__ = ["Marginal", "marginal_histogram", "marginal_free_energy_from_samples", "marginal_free_energy",
           "residue_pairs", "pair_marginals", "smoothed_probabilities", "forward_kld", "marginal_kld",
           "pmf_marginal_kld", "importance_samples", "ImportanceSamples", "HISTOGRAM_FLOOR", "QUADRATURE_BUDGET"]

#: Floor added to smoothed sample histograms before normalising (the metric's definition).
HISTOGRAM_FLOOR = 1e-12
#: Largest number of PMF evaluations :func:`marginal_free_energy` spends on quadrature with ``method="auto"``.
QUADRATURE_BUDGET = 4_000_000
_CHUNK = 65536


def _axes(axes, d: int) -> List[int]:
    axes = [int(axes)] if np.isscalar(axes) else [int(a) for a in axes]
    if not axes or len(set(axes)) != len(axes) or any(a < 0 or a >= d for a in axes):
        raise ValueError(f"axes {axes} must be distinct CG coordinate indices in 0..{d - 1}")
    return axes


def _bins(bins, k: int) -> List[int]:
    bins = [int(bins)] * k if np.isscalar(bins) else [int(b) for b in bins]
    if len(bins) != k or any(b < 1 for b in bins):
        raise ValueError(f"bins must be a positive int or one per axis ({k}), got {bins}")
    return bins


def _free_energy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        f = -np.log(p)
    finite = np.isfinite(f)
    return f - f[finite].min() if finite.any() else f


def marginal_histogram(s, axes, bins=100, ranges: Optional[Sequence[tuple]] = None,
                       periodic: Optional[Sequence[bool]] = None, weights=None):
    """Normalised histogram of the projection of samples ``s`` [N, d] (or [..., d], e.g. walker frames
    [F, W, d]) on ``axes`` (k indices): (p [bins] * k summing to 1 inside the ranges, k edge arrays).

    ``periodic`` [d] (default all False) wraps those coordinates into [-pi, pi) (and defaults their range to
    it); ``ranges`` (lo, hi) per selected axis; ``weights`` [N] linear (e.g. reweighting factors)."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim < 2:
        raise ValueError(f"samples must be [N, d], got shape {s.shape}")
    s = s.reshape(-1, s.shape[-1])
    d = s.shape[1]
    axes = _axes(axes, d)
    periodic = [False] * d if periodic is None else [bool(p) for p in periodic]
    if len(periodic) != d:
        raise ValueError(f"periodic has {len(periodic)} entries for {d} CG coordinates")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    return weighted_histogram(s[:, axes], w, _bins(bins, len(axes)), ranges, [periodic[a] for a in axes])


def marginal_free_energy_from_samples(s, axes, bins=100, ranges: Optional[Sequence[tuple]] = None,
                                      periodic: Optional[Sequence[bool]] = None, weights=None):
    """Marginal free energy (kT, minimum 0, +inf in empty bins) [bins] * k of samples ``s`` [N, d] distributed
    as exp(-A) on ``axes``, with the bin edges: (F, edges). Arguments as in :func:`marginal_histogram`."""
    p, edges = marginal_histogram(s, axes, bins, ranges, periodic, weights)
    return _free_energy(p), edges


@dataclass
class Marginal:
    """A marginal of a PMF on a grid of bin centres.

    axes: the k CG coordinate indices; centres: k arrays [n_j] (radians / nm); free_energy: [n_0, ...] kT,
    minimum 0; spread: same shape, exp(-A)-weighted mean ensemble spread (kT); probabilities: exp(-F)
    normalised over the grid; method: "quadrature", "mc" or "importance"; n_points: evaluation points per bin
    (for "importance": the importance samples in all, shared by the bins)."""

    axes: List[int]
    centres: List[np.ndarray]
    free_energy: np.ndarray
    spread: np.ndarray
    method: str
    n_points: int

    @property
    def probabilities(self) -> np.ndarray:
        p = np.exp(-self.free_energy)
        return p / p.sum()

    @property
    def edges(self) -> List[np.ndarray]:
        out = []
        for c in self.centres:
            h = c[1] - c[0] if len(c) > 1 else 1.0
            out.append(np.concatenate([c - 0.5 * h, c[-1:] + 0.5 * h]))
        return out


@dataclass
class ImportanceSamples:
    """Weighted samples of exp(-A): s [N, d] (radians / nm), log_w [N] (log weights, unnormalised; -inf for
    samples outside non-periodic ranges), mean [N] and spread [N] (the PMF's mean A and ensemble spread at s,
    kT). ``weights`` are the normalised linear weights; ``ess`` Kish's effective sample size."""

    s: np.ndarray
    log_w: np.ndarray
    mean: np.ndarray
    spread: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        w = np.exp(self.log_w - np.max(self.log_w))
        return w / w.sum()

    @property
    def ess(self) -> float:
        w = self.weights
        return float(1.0 / np.sum(w * w))


def _evaluate(pmf: PMF, s: np.ndarray):
    """:meth:`PMF.mean_and_spread` at s [N, d] in chunks (bounded memory for large N)."""
    parts = [pmf.mean_and_spread(s[i:i + _CHUNK]) for i in range(0, len(s), _CHUNK)]
    return np.concatenate([m for m, _ in parts]), np.concatenate([sd for _, sd in parts])


def importance_samples(pmf, n_samples: int = 400_000, ranges: Optional[Sequence[tuple]] = None,
                       n_pilot: int = 200_000, n_centres: int = 2000, bandwidth: float = 0.3,
                       uniform_fraction: float = 0.2, seed: int = 0) -> ImportanceSamples:
    """Importance samples of exp(-A) over the CG ranges, for marginals of a PMF in any d.

    Stage 1 draws ``n_pilot`` uniform points and picks ``n_centres`` of them with probability ~ exp(-A).
    Stage 2 draws ``n_samples`` from the mixture q = ``uniform_fraction`` * uniform + (1 - ``uniform_fraction``)
    * mean over centres of an isotropic Gaussian of width ``bandwidth`` (rad / nm; minimum-image on periodic
    coordinates, exact for bandwidth << period), and weights them by exp(-A) / q. Cost: n_pilot + n_samples
    PMF evaluations and n_samples * n_centres kernel terms. ``ranges`` as in :func:`marginal_free_energy`.
    """
    pmf = load_pmf(pmf) if not isinstance(pmf, PMF) else pmf
    d = pmf.n_cg
    ranges = [pmf.default_range(k) for k in range(d)] if ranges is None else [tuple(map(float, r)) for r in ranges]
    if len(ranges) != d or any(not hi > lo for lo, hi in ranges):
        raise ValueError(f"ranges must be one (lo, hi) with hi > lo per CG coordinate ({d}), got {ranges}")
    if not 0.0 < uniform_fraction <= 1.0 or not bandwidth > 0.0 or min(n_samples, n_pilot, n_centres) < 1:
        raise ValueError("need 0 < uniform_fraction <= 1, bandwidth > 0 and positive sample counts")
    lo = np.array([r[0] for r in ranges])
    hi = np.array([r[1] for r in ranges])
    width = hi - lo
    periodic = np.array(pmf.periodic, dtype=bool)
    rng = np.random.default_rng(seed)
    pilot = lo + width * rng.random((int(n_pilot), d))
    a_pilot, _ = _evaluate(pmf, pilot)
    p = np.exp(-(a_pilot - a_pilot.min()))
    centres = pilot[rng.choice(len(pilot), int(n_centres), p=p / p.sum())]
    n_uniform = int(rng.binomial(int(n_samples), uniform_fraction))
    s = np.concatenate([lo + width * rng.random((n_uniform, d)),
                        centres[rng.integers(len(centres), size=int(n_samples) - n_uniform)]
                        + bandwidth * rng.standard_normal((int(n_samples) - n_uniform, d))])
    s[:, periodic] = lo[periodic] + np.mod(s[:, periodic] - lo[periodic], width[periodic])
    inside = np.all((s >= lo) & (s < hi), axis=1)
    # log q(s): the uniform density plus the Gaussian mixture, minimum-image differences on periodic axes
    c = torch.as_tensor(centres)
    half = torch.as_tensor(np.where(periodic, width, np.inf))
    log_kernel_norm = -0.5 * d * math.log(2.0 * math.pi * bandwidth ** 2) - math.log(len(centres))
    log_mix = np.empty(len(s))
    step = max(1, (1 << 22) // (len(centres) * d))
    for i in range(0, len(s), step):
        diff = torch.as_tensor(s[i:i + step])[:, None, :] - c[None, :, :]
        diff = torch.where(torch.isfinite(half), torch.remainder(diff + 0.5 * half, half) - 0.5 * half, diff)
        log_mix[i:i + step] = (torch.logsumexp(-0.5 * (diff * diff).sum(-1) / bandwidth ** 2, dim=1)
                               + log_kernel_norm).numpy()
    log_q = np.logaddexp(math.log(uniform_fraction) - np.sum(np.log(width)),
                         math.log1p(-uniform_fraction) + log_mix) if uniform_fraction < 1.0 else \
        np.full(len(s), -np.sum(np.log(width)))
    a, spread = _evaluate(pmf, s)
    log_w = np.where(inside, -a - log_q, -np.inf)
    return ImportanceSamples(s, log_w, a, spread)


def _centres(lo: float, hi: float, n: int) -> np.ndarray:
    e = np.linspace(lo, hi, n + 1)
    return 0.5 * (e[:-1] + e[1:])


def marginal_free_energy(pmf, axes, bins=100, ranges: Optional[Sequence[tuple]] = None, method: str = "auto",
                         n_quadrature: int = 12, n_mc: int = 2000, seed: int = 0,
                         samples: Optional[ImportanceSamples] = None) -> Marginal:
    """Marginal free energy and spread of a PMF on ``axes``, integrating exp(-A) over the other coordinates.

    Args:
        pmf: a ``pmf.pt`` path, :class:`~openmm_cgflow_plugin.pmf.PMF` or module of the contract.
        axes: k coordinate indices (1 or 2 for plots; any k < d works).
        bins: bins per selected axis (int or one per axis); the marginal is evaluated at the bin centres.
        ranges: (lo, hi) of every coordinate (d pairs; default :meth:`PMF.default_range`, [-pi, pi) for
            periodic ones): the selected axes' grid and the integration domain of the others.
        method: "quadrature" (midpoint rule, ``n_quadrature`` points per other axis), "mc" (``n_mc``
            uniform points of the other coordinates, the same for every bin, from ``seed``), or "auto"
            (quadrature when it costs at most :data:`QUADRATURE_BUDGET` PMF evaluations, else MC), or
            "importance": the weighted histogram of :func:`importance_samples` (``samples``, or drawn with
            ``seed``), smoothed as the metric smooths sample histograms (any d; the choice for d >= 4).
    Returns a :class:`Marginal`. Cost: prod(bins) * n_points evaluations of the PMF (float64, chunked).
    """
    pmf = load_pmf(pmf) if not isinstance(pmf, PMF) else pmf
    d = pmf.n_cg
    axes = _axes(axes, d)
    bins = _bins(bins, len(axes))
    ranges = [pmf.default_range(k) for k in range(d)] if ranges is None else [tuple(map(float, r)) for r in ranges]
    if len(ranges) != d or any(not hi > lo for lo, hi in ranges):
        raise ValueError(f"ranges must be one (lo, hi) with hi > lo per CG coordinate ({d}), got {ranges}")
    rest = [k for k in range(d) if k not in axes]
    n_grid = int(np.prod(bins))
    if method == "importance":
        smp = samples if samples is not None else importance_samples(pmf, ranges=ranges, seed=seed)
        sel = [pmf.periodic[a] for a in axes]
        w = smp.weights
        h, edges = weighted_histogram(smp.s[:, axes], w, bins, [ranges[a] for a in axes], sel)
        hs, _ = weighted_histogram(smp.s[:, axes], w * smp.spread, bins, [ranges[a] for a in axes], sel)
        with np.errstate(invalid="ignore", divide="ignore"):
            spread_bins = np.where(h > 0, hs * np.sum(w * smp.spread) / np.maximum(h, 1e-300), np.nan)
        centres = [0.5 * (e[:-1] + e[1:]) for e in edges]
        return Marginal(axes, centres, _free_energy(smoothed_probabilities(h, sel)), spread_bins, "importance",
                        len(smp.s))
    if method == "auto":
        method = "quadrature" if n_grid * int(n_quadrature) ** len(rest) <= QUADRATURE_BUDGET else "mc"
    if method == "quadrature":
        nodes = [_centres(*ranges[k], int(n_quadrature)) for k in rest]
        inner = np.stack([m.ravel() for m in np.meshgrid(*nodes, indexing="ij")], axis=1) if rest else np.zeros((1, 0))
    elif method == "mc":
        rng = np.random.default_rng(seed)
        lo = np.array([ranges[k][0] for k in rest])
        hi = np.array([ranges[k][1] for k in rest])
        inner = lo + (hi - lo) * rng.random((int(n_mc), len(rest)))
    else:
        raise ValueError(f"method must be 'auto', 'quadrature', 'mc' or 'importance', got {method!r}")
    centres = [_centres(*ranges[a], b) for a, b in zip(axes, bins)]
    outer = np.stack([m.ravel() for m in np.meshgrid(*centres, indexing="ij")], axis=1)
    r = len(inner)
    per_chunk = max(1, _CHUNK // r)
    logz = np.empty(n_grid)
    spread = np.empty(n_grid)
    pts = np.empty((min(per_chunk, n_grid) * r, d))
    for i in range(0, n_grid, per_chunk):
        g = outer[i:i + per_chunk]
        n = len(g) * r
        pts[:n, axes] = np.repeat(g, r, axis=0)
        pts[:n, rest] = np.tile(inner, (len(g), 1))
        with torch.no_grad():
            m, sd = pmf.module.mean_and_spread(torch.as_tensor(pts[:n]))
        a = -m.double().numpy().reshape(len(g), r)
        sd = sd.double().numpy().reshape(len(g), r)
        top = a.max(axis=1, keepdims=True)
        w = np.exp(a - top)
        logz[i:i + len(g)] = top[:, 0] + np.log(w.sum(axis=1))
        spread[i:i + len(g)] = (w * sd).sum(axis=1) / w.sum(axis=1)
    f = logz.max() - logz
    return Marginal(axes, centres, f.reshape(bins), spread.reshape(bins), method, r)


def residue_pairs(d: int) -> List[Tuple[int, int]]:
    """Default (phi_i, psi_i) pairs of d CG coordinates ordered phi_1, psi_1, phi_2, ...: (0, 1), (2, 3), ...;
    for odd d the last coordinate is paired with the one before it. ValueError for d < 2."""
    d = int(d)
    if d < 2:
        raise ValueError(f"pairs of CG coordinates need d >= 2, got {d}")
    pairs = [(2 * i, 2 * i + 1) for i in range(d // 2)]
    if d % 2:
        pairs.append((d - 2, d - 1))
    return pairs


def _smooth_axis(h: np.ndarray, axis: int, periodic: bool, sigma_bins: float = 1.0) -> np.ndarray:
    """Convolve ``h`` along ``axis`` with a Gaussian of ``sigma_bins`` bins truncated at 4 sigma; periodic axes
    wrap around, others are zero-padded (the caller renormalises)."""
    half = int(np.ceil(4 * sigma_bins))
    offsets = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (offsets / sigma_bins) ** 2)
    kernel /= kernel.sum()
    out = np.zeros_like(h)
    n = h.shape[axis]
    for k, o in zip(kernel, offsets):
        if periodic:
            out += k * np.roll(h, o, axis=axis)
        else:
            shifted = np.zeros_like(h)
            src = [slice(None)] * h.ndim
            dst = [slice(None)] * h.ndim
            if o >= 0:
                src[axis], dst[axis] = slice(0, n - o), slice(o, n)
            else:
                src[axis], dst[axis] = slice(-o, n), slice(0, n + o)
            shifted[tuple(dst)] = h[tuple(src)]
            out += k * shifted
    return out


def smoothed_probabilities(h, periodic: Sequence[bool]) -> np.ndarray:
    """Histogram ``h`` (any k axes) smoothed by a Gaussian of one bin per axis (periodic where ``periodic`` [k]
    says), normalised, plus :data:`HISTOGRAM_FLOOR`, normalised again: the metric's sample estimate."""
    h = np.asarray(h, dtype=np.float64)
    if len(periodic) != h.ndim:
        raise ValueError(f"periodic has {len(periodic)} entries for a {h.ndim}-axis histogram")
    if not h.sum() > 0:
        raise ValueError("no samples inside the histogram range")
    for k in range(h.ndim):
        h = _smooth_axis(h, k, bool(periodic[k]))
    h = h / h.sum() + HISTOGRAM_FLOOR
    return h / h.sum()


def forward_kld(p_ref, p_est) -> float:
    """Forward KL divergence D(p_ref || p_est) = sum p_ref ln(p_ref / p_est) in nats over bins (any shape).

    Both are normalised here; bins with p_ref == 0 are skipped; inf where p_est == 0 < p_ref."""
    p = np.asarray(p_ref, dtype=np.float64)
    q = np.asarray(p_est, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch: p_ref {p.shape} vs p_est {q.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
        raise ValueError("probabilities must be finite")
    if np.any(p < 0) or np.any(q < 0):
        raise ValueError("probabilities must be non-negative")
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return float("inf")
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def marginal_kld(s, axes, p_ref, ranges: Optional[Sequence[tuple]] = None, periodic: Optional[Sequence[bool]] = None,
                 weights=None, smooth: bool = True) -> float:
    """Forward KLD D(p_ref || p_samples) of the marginal of samples ``s`` [..., d] on ``axes`` against reference
    bin probabilities ``p_ref`` (shape = bins of the selected axes, on ``ranges``: default [-pi, pi) for
    periodic axes). ``smooth``: the metric's one-bin Gaussian smoothing and floor (False: raw histogram)."""
    p_ref = np.asarray(p_ref, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    d = s.shape[-1]
    axes = _axes(axes, d)
    periodic = [False] * d if periodic is None else [bool(p) for p in periodic]
    if p_ref.ndim != len(axes):
        raise ValueError(f"p_ref has {p_ref.ndim} axes for {len(axes)} selected CG coordinates {axes}")
    if ranges is None:
        if not all(periodic[a] for a in axes):
            raise ValueError("ranges are required for non-periodic axes")
        ranges = [(-math.pi, math.pi)] * len(axes)
    h, _ = marginal_histogram(s, axes, list(p_ref.shape), ranges, periodic, weights)
    q = smoothed_probabilities(h, [periodic[a] for a in axes]) if smooth else h
    return forward_kld(p_ref, q)


def pmf_marginal_kld(pmf, axes, p_ref, ranges: Optional[Sequence[tuple]] = None, **kwargs) -> float:
    """Forward KLD D(p_ref || exp(-F)) of the PMF's marginal (:func:`marginal_free_energy` on the bin centres
    of ``p_ref``'s grid, ``ranges`` d pairs as there; ``kwargs`` its method options)."""
    p_ref = np.asarray(p_ref, dtype=np.float64)
    m = marginal_free_energy(pmf, axes, list(p_ref.shape), ranges, **kwargs)
    return forward_kld(p_ref, m.probabilities)


def pair_marginals(pmf, pairs: Optional[Sequence[Tuple[int, int]]] = None, bins=100, **kwargs) -> Dict[tuple, Marginal]:
    """{(i, j): :class:`Marginal`} for each pair (default :func:`residue_pairs`) of a PMF."""
    pmf = load_pmf(pmf) if not isinstance(pmf, PMF) else pmf
    pairs = residue_pairs(pmf.n_cg) if pairs is None else [tuple(int(a) for a in p) for p in pairs]
    return {p: marginal_free_energy(pmf, p, bins, **kwargs) for p in pairs}

