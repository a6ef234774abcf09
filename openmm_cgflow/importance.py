"""Importance weights of flow samples, and the weighted statistics built on them.

One concept: a sample fine ~ q(. | s) of the conditional flow (or of a widened defensive mixture of it,
:func:`sample_proposal`), mapped to Cartesian positions x = x(fine, s) (nm), carries the log importance
weight

    log w = log p~(fine, s) - log q(fine | s),      log p~ = -u(x) + log_det          (natural log)

with u = E / kT the reduced energy and log_det = log|det dx/d(fine, s)| from the coordinate transform.
:func:`draw` computes it (with autograd when asked: training differentiates the same quantities), and it is
the package's only place that does: free-energy labels (:mod:`openmm_cgflow.free_energy`), training
diagnostics (:mod:`openmm_cgflow.training`) and backmapping (:mod:`openmm_cgflow.backmapping`) all call it.
Samples whose positions, energy or weight are not finite, or that have the wrong chirality (e.g.
D-alanine, ``coordinates.chirality_ok``), get weight zero (log w = -inf) but are counted.

Weighted statistics over samples grouped in CG frames (:func:`weighted_estimate`,
:func:`weighted_histogram` with per-bin standard errors) use the plugin's one Kish ESS
(:func:`openmm_cgflow_plugin.statistics.kish_ess`) and its one weighted histogram
(:func:`openmm_cgflow_plugin.statistics.weighted_histogram`).

Units: positions nm, s radians (dihedrals) or nm, energies and log weights in kT (natural log).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from openmm_cgflow_plugin.statistics import kish_ess, normalised_weights
from openmm_cgflow_plugin.statistics import weighted_histogram as _histogram

__all__ = [
    "FlowSample",
    "WeightedEstimate",
    "draw",
    "ess_fraction",
    "log_normalise",
    "log_weights",
    "sample_proposal",
    "weighted_estimate",
    "weighted_histogram",
]


# ------------------------------------------------------------------------------------------ proposal
def sample_proposal(flow, s: torch.Tensor, generator=None, proposal_scale: float = 1.0, proposal_mix: float = 0.5):
    """(fine [B, n_fine], log q [B]) from the importance proposal at CG points s [B, n_cg].

    ``proposal_scale`` = 1: the flow itself (``flow.sample``). Otherwise a defensive mixture: a fraction
    ``proposal_mix`` of the samples comes from the flow with its Gaussian base dims widened by
    ``proposal_scale`` (circular base dims stay uniform), the rest from the flow, and log q is the mixture
    density. Both components share the flow's transform, so fine = T(z) has q_mix(fine) = [(1 - a) N(z; 0, 1)
    + a N(z; 0, tau^2)] / |det dT/dz|: no extra flow pass. A wider component bounds the weights where the
    flow is narrower than the Boltzmann conditional (reverse-KL training tends to make it so), which removes
    the self-normalisation bias of a few samples per frame at some cost in ESS."""
    if proposal_scale == 1.0 or proposal_mix <= 0.0:
        return flow.sample(s, generator=generator)
    tau, a = float(proposal_scale), min(float(proposal_mix), 1.0)
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"proposal_scale must be a positive number, got {proposal_scale}")
    z = flow.sample_base(s.shape[0], generator)
    nc = ~flow.circular
    src = generator.device if generator is not None else z.device
    pick = (torch.rand(s.shape[0], 1, generator=generator, dtype=z.dtype, device=src) < a).to(z.device)
    z = torch.where(nc & pick, z * tau, z)
    fine, logdet = flow.forward_transform(z, s)
    n_nc = int(nc.sum())
    r2 = (z[:, nc] ** 2).sum(dim=1)
    log_narrow = -0.5 * r2
    log_wide = -0.5 * r2 / tau**2 - n_nc * math.log(tau)
    if a >= 1.0:
        log_mix = log_wide
    else:
        log_mix = torch.logaddexp(log_narrow + math.log1p(-a), log_wide + math.log(a))
    const = -0.5 * math.log(2.0 * math.pi) * n_nc - (flow.n_fine - n_nc) * math.log(2.0 * math.pi)
    return fine, log_mix + const - logdet


# ------------------------------------------------------------------------------------------ log weights
@dataclass
class FlowSample:
    """One proposal sample per CG point, with the terms of its importance weight (float64 tensors [B]).

    fine: [B, n_fine] (flow dtype, carries autograd when drawn with gradients). x: [B, n_atoms, 3] nm,
    non-finite structures replaced by zeros. log_q: log proposal density. log_p: -u(x) + log_det (kT;
    -inf where x is not finite). finite_x: positions finite. chirality_ok: reference handedness.
    """

    fine: torch.Tensor
    x: torch.Tensor
    log_q: torch.Tensor
    log_p: torch.Tensor
    finite_x: torch.Tensor
    chirality_ok: torch.Tensor

    @property
    def log_w(self) -> torch.Tensor:
        """Raw log importance weights log p~ - log q [B] (not masked)."""
        return self.log_p - self.log_q

    @property
    def nonfinite(self) -> torch.Tensor:
        """[B] bool: positions, energy or weight not finite."""
        return ~(self.finite_x & torch.isfinite(self.log_w.detach()))

    @property
    def wrong_chirality(self) -> torch.Tensor:
        """[B] bool: finite samples of the wrong handedness."""
        return ~self.nonfinite & ~self.chirality_ok

    @property
    def usable(self) -> torch.Tensor:
        """[B] bool: finite and of the reference handedness (non-zero weight)."""
        return ~self.nonfinite & self.chirality_ok

    def masked_log_w(self) -> torch.Tensor:
        """log w [B] (detached) with -inf for samples that are not :attr:`usable`."""
        lw = self.log_w.detach()
        return torch.where(self.usable, lw, torch.full_like(lw, -math.inf))


def draw(flow, coordinates, energy, s: torch.Tensor, generator=None, proposal_scale: float = 1.0,
         proposal_mix: float = 0.5) -> FlowSample:
    """Draw one proposal sample per row of s [B, n_cg] and evaluate its importance weight terms.

    ``coordinates``: a coordinate transform or a CGSystem (its ``.coordinates``). ``energy``: an object with
    ``energy(x [B, n_atoms, 3] nm float64) -> u [B] kT`` (an EnergyBridge; differentiable for training).
    The flow samples at ``s`` in its dtype; the transform works in float64. Gradients flow unless called
    under ``torch.no_grad()``. Proposal arguments: :func:`sample_proposal`.
    """
    coords = getattr(coordinates, "coordinates", coordinates)
    device = next(flow.parameters()).device
    s = s.to(device)
    fine, log_q = sample_proposal(flow, s.to(flow.dtype), generator, proposal_scale, proposal_mix)
    x, log_det = coords.to_cartesian(fine.to(torch.float64), s.to(torch.float64))
    finite_x = torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
    # broken geometries never reach OpenMM's gradient path with NaN: substitute a harmless copy
    x_safe = torch.where(finite_x[:, None, None], x, torch.zeros_like(x))
    u = energy.energy(x_safe).to(torch.float64)
    u = torch.where(finite_x, u, torch.full_like(u, math.inf))
    with torch.no_grad():
        chiral = coords.chirality_ok(x_safe.detach()).to(u.device)
    return FlowSample(fine=fine, x=x_safe, log_q=log_q.to(torch.float64), log_p=-u + log_det,
                      finite_x=finite_x, chirality_ok=chiral)


@torch.no_grad()
def log_weights(flow, coordinates, energy, s: torch.Tensor, generator=None, proposal_scale: float = 1.0,
                proposal_mix: float = 0.5):
    """Importance log weights for one proposal sample per row of s [B, n_cg] (no gradients).

    Returns (log_w [B] float64 with -inf for excluded samples, nonfinite [B] bool, wrong_chirality [B] bool).
    """
    smp = draw(flow, coordinates, energy, s, generator, proposal_scale, proposal_mix)
    return smp.masked_log_w(), smp.nonfinite, smp.wrong_chirality


# ------------------------------------------------------------------------------------------ ESS, normalisation
def ess_fraction(log_w) -> torch.Tensor:
    """Kish ESS / N along the last dim of log weights [..., N] (non-finite = weight zero; 0 where all are)
    as a float64 tensor [...]."""
    n = log_w.shape[-1]
    return torch.as_tensor(np.asarray(kish_ess(log_w, axis=-1), dtype=np.float64) / n)


def log_normalise(log_w: np.ndarray):
    """Log weights [F, n] normalised within each row: (log w~ [F, n], has [F] bool).

    Rows whose weights are all zero (-inf) stay -inf and have ``has`` False."""
    lw = np.asarray(log_w, dtype=np.float64)
    m = np.max(lw, axis=1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.log(np.exp(lw - m_safe[:, None]).sum(axis=1)) + m_safe
    has = np.isfinite(lse)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = lw - np.where(has, lse, 0.0)[:, None]
    return out, has


# ------------------------------------------------------------------------------------------ estimates
@dataclass
class WeightedEstimate:
    """A weighted average with its uncertainty (see :func:`weighted_estimate`); arrays of shape [K] for
    K observables, floats for one.

    mean, stderr: the estimate of <g> and its delta-method standard error. std, std_stderr: the weighted
    standard deviation of g and its standard error. ess: Kish effective sample size of the overall
    weights. n_samples, n_frames: samples and CG frames with non-zero weight.
    """

    mean: np.ndarray
    stderr: np.ndarray
    std: np.ndarray
    std_stderr: np.ndarray
    ess: float
    n_samples: int
    n_frames: int


def _global_weights(log_weights, frame=None, log_frame_weights=None):
    """Normalised weights W [N] (sum 1) and group index [N] (0..G-1, in frame order) for the SE.

    With ``frame``: weights are normalised within each frame, then frames get ``log_frame_weights[frame]``
    (default equal); frames without a finite weight drop out. Without: W = softmax(log_weights), each
    sample its own group."""
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    n = len(lw)
    finite = np.isfinite(lw)
    if not finite.any():
        raise ValueError("no sample has a finite log weight")
    if frame is None:
        return normalised_weights(lw), np.arange(n), n
    frame = np.asarray(frame).reshape(-1)
    if len(frame) != n:
        raise ValueError(f"frame has {len(frame)} entries for {n} log weights")
    uniq, inv = np.unique(frame, return_inverse=True)
    m = np.full(len(uniq), -np.inf)
    np.maximum.at(m, inv[finite], lw[finite])
    e = np.where(finite, np.exp(lw - np.where(np.isfinite(m), m, 0.0)[inv]), 0.0)
    tot = np.bincount(inv, e, minlength=len(uniq))
    has = tot > 0
    if log_frame_weights is None:
        lfw = np.zeros(len(uniq))
    else:
        lfw_all = np.asarray(log_frame_weights, dtype=np.float64).reshape(-1)
        if uniq.min() < 0 or uniq.max() >= len(lfw_all):
            raise ValueError(f"log_frame_weights has {len(lfw_all)} entries; frames go up to {uniq.max()}")
        lfw = lfw_all[uniq]
    lfw = np.where(has & np.isfinite(lfw), lfw, -np.inf)
    if not np.isfinite(lfw).any():
        raise ValueError("no frame has a usable sample and a finite frame weight")
    fw = np.exp(lfw - lfw[np.isfinite(lfw)].max())
    fw /= fw.sum()
    w = fw[inv] * np.where(has[inv], e / np.where(has, tot, 1.0)[inv], 0.0)
    return w / w.sum(), inv, len(uniq)


def _block_var(h: np.ndarray, group: np.ndarray, n_groups: int, block_size: int) -> np.ndarray:
    """Variance of sum_i h_i from per-sample influences h [N, K], summing first within groups, then
    within blocks of ``block_size`` consecutive groups (correlated frames), with the n/(n-1) correction."""
    block = group // max(int(block_size), 1)
    n_blocks = int(block.max()) + 1
    hb = np.zeros((n_blocks, h.shape[1]))
    np.add.at(hb, block, h)
    used = np.unique(block)
    nb = len(used)
    corr = nb / (nb - 1) if nb > 1 else np.inf
    return (hb**2).sum(axis=0) * corr


def _kish_ess_of(w: np.ndarray) -> float:
    """Kish ESS of linear weights w [N] >= 0."""
    with np.errstate(divide="ignore"):
        return float(kish_ess(np.log(w)))


def weighted_estimate(values, log_weights, frame=None, log_frame_weights=None, block_size: int = 1) -> WeightedEstimate:
    """Weighted average of an observable over importance samples, with its ESS and standard error.

    Args:
        values: g per sample, [N] or [N, K] (K observables at once). For angles near the +-pi seam pass
            a continuous representation (e.g. cos/sin, or the angle wrapped around its mode).
        log_weights: [N] log importance weights (e.g. ``BackmapResult.log_weights``).
        frame: [N] CG frame of each sample (e.g. ``BackmapResult.index``). Weights are normalised within
            each frame and frames weighted equally, the estimator for CG frames drawn from p(s). None:
            weights normalised over all samples (plain self-normalised importance sampling).
        log_frame_weights: optional log weights of the CG frames, indexed by frame id (e.g. bias - c for
            reweighting metadynamics frames); unnormalised.
        block_size: frames per block for the standard error (consecutive frames of a CG trajectory are
            correlated: use blocks longer than the correlation time).
    Returns a :class:`WeightedEstimate`: mean = sum_i W_i g_i with W the overall normalised weights;
    SE^2 = sum over blocks of (sum_{i in block} W_i (g_i - mean))^2 (delta method for a ratio estimator;
    with one sample per frame and equal weights it is the usual s / sqrt(N)); std = sqrt(sum W (g - mean)^2)
    with SE from the influence W_i ((g_i - mean)^2 - std^2) / (2 std); ess = Kish ESS of W (it ignores
    correlation between frames).
    """
    g = np.asarray(values, dtype=np.float64)
    scalar = g.ndim == 1
    g = g.reshape(g.shape[0], -1)
    w, group, n_groups = _global_weights(log_weights, frame, log_frame_weights)
    if len(w) != g.shape[0]:
        raise ValueError(f"values have {g.shape[0]} rows for {len(w)} log weights")
    nz = w > 0
    g = np.where(nz[:, None], g, 0.0)  # zero-weight samples may carry NaN values
    if not np.all(np.isfinite(g[nz])):
        raise ValueError("values must be finite where the weight is non-zero")
    mean = w @ g
    dev = g - mean
    var_mean = _block_var(w[:, None] * dev, group, n_groups, block_size)
    var = w @ dev**2
    std = np.sqrt(var)
    infl = w[:, None] * (dev**2 - var) / np.where(std > 0, 2.0 * std, np.inf)
    var_std = _block_var(infl, group, n_groups, block_size)
    out = (mean, np.sqrt(var_mean), std, np.sqrt(var_std))
    if scalar:
        out = tuple(float(a[0]) for a in out)
    return WeightedEstimate(*out, ess=_kish_ess_of(w), n_samples=int(nz.sum()),
                            n_frames=int(len(np.unique(group[nz]))))


def weighted_histogram(values, log_weights, frame=None, bins=50, range=None, log_frame_weights=None,
                       block_size: int = 1, density: bool = True):
    """Weighted histogram of one observable with a standard error per bin.

    Args as :func:`weighted_estimate` (``values`` [N]); ``bins`` an int or edges, ``range`` (lo, hi).
    Probabilities are fractions of the total weight (mass outside the range is not redistributed).
    Returns (hist [bins], stderr [bins], edges [bins + 1]); with ``density`` both are divided by the bin
    widths (a probability density), otherwise they are bin probabilities.

    The binning is the plugin's :func:`openmm_cgflow_plugin.statistics.weighted_histogram` (NumPy's
    histogramdd): of the values for the probabilities, and of (block, value) pairs for the per-bin
    standard error, whose influence W_i (1[b_i = bin] - p_bin) is summed per block of frames.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w, group, n_groups = _global_weights(log_weights, frame, log_frame_weights)
    if len(v) != len(w):
        raise ValueError(f"values have {len(v)} entries for {len(w)} log weights")
    nz = w > 0
    edges = np.histogram_bin_edges(v[nz & np.isfinite(v)], bins=bins, range=range)
    nbins = len(edges) - 1
    inside = nz & np.isfinite(v) & (v >= edges[0]) & (v <= edges[-1])
    vi, wi = v[inside], w[inside]
    p = np.zeros(nbins)
    if len(vi):
        p = _histogram(vi, wi, bins=[edges], ranges=[(edges[0], edges[-1])])[0] * wi.sum()
    # SE per bin: sums over the blocks' (block, bin) weights a, from 2-D histograms of (block, value)
    block = group // max(int(block_size), 1)
    n_blocks = int(block.max()) + 1
    s_blk = np.bincount(block, w, minlength=n_blocks)  # total weight per block
    sum_a2, sum_as = np.zeros(nbins), np.zeros(nbins)
    bi = block[inside]
    step = max(1, (1 << 21) // max(nbins, 1))  # blocks per 2-D histogram (bounded memory)
    for b0 in np.arange(0, n_blocks, step):
        b1 = min(n_blocks, b0 + step)
        sel = (bi >= b0) & (bi < b1)
        if not sel.any():
            continue
        block_edges = np.arange(b0, b1 + 1, dtype=np.float64) - 0.5
        h, _ = _histogram(np.stack([bi[sel].astype(np.float64), vi[sel]], axis=1), wi[sel],
                          bins=[block_edges, edges], ranges=[(block_edges[0], block_edges[-1]), (edges[0], edges[-1])])
        a = h * wi[sel].sum()  # weight per (block, bin)
        sum_a2 += (a * a).sum(axis=0)
        sum_as += (a * s_blk[b0:b1, None]).sum(axis=0)
    sum_s2 = float((s_blk**2).sum())
    var = np.clip(sum_a2 - 2.0 * p * sum_as + p * p * sum_s2, 0.0, None)
    nb = len(np.unique(block[nz]))
    var = var * (nb / (nb - 1) if nb > 1 else np.inf)
    se = np.sqrt(var)
    if density:
        width = np.diff(edges)
        return p / width, se / width, edges
    return p, se, edges
