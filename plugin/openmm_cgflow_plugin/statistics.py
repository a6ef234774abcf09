"""Importance weights and weighted statistics: the package's one Kish ESS and one weighted histogram.

Used by the plugin's reweighting and by the sampler (free-energy labels, training diagnostics,
backmapping). Weights are handled in log space (float64) throughout; a non-finite log weight counts as
weight zero. Shapes are given per function.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .cgspace import wrap_angle

__all__ = ["kish_ess", "normalised_weights", "weighted_histogram"]


def kish_ess(log_weights, axis: int = -1):
    """Kish's effective sample size (sum w)^2 / sum w^2 from log weights, along ``axis``.

    ``log_weights``: array [..., N] (NumPy or anything ``np.asarray`` takes; a torch tensor is detached).
    Non-finite entries count as zero weight; where every weight is zero the ESS is 0. Returns a float64
    array [...] (a float for 1-D input). ESS / N is the usual "ESS fraction".
    """
    if hasattr(log_weights, "detach"):
        log_weights = log_weights.detach().cpu().numpy()
    lw = np.asarray(log_weights, dtype=np.float64)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    m = np.max(lw, axis=axis, keepdims=True)
    has = np.isfinite(m)
    w = np.exp(lw - np.where(has, m, 0.0))
    s1 = np.sum(w, axis=axis)
    s2 = np.sum(w * w, axis=axis)
    ess = np.where(s2 > 0, s1 * s1 / np.where(s2 > 0, s2, 1.0), 0.0)
    return float(ess) if ess.ndim == 0 else ess


def normalised_weights(log_weights) -> np.ndarray:
    """Weights [N] summing to 1 from log weights [N] (non-finite -> 0); ValueError if none is finite."""
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    finite = np.isfinite(lw)
    if not finite.any():
        raise ValueError("no sample has a finite log weight")
    w = np.where(finite, np.exp(lw - lw[finite].max()), 0.0)
    return w / w.sum()


def weighted_histogram(values, weights=None, bins=100, ranges: Optional[Sequence[tuple]] = None,
                       periodic: Optional[Sequence[bool]] = None):
    """Normalised d-dimensional histogram of ``values`` [N, d] (or [N]) with linear ``weights`` [N].

    ``ranges``: (lo, hi) per coordinate (default [-pi, pi) for periodic ones, else the data range);
    ``periodic`` (default: all False) coordinates are wrapped into [-pi, pi) first. ``bins``: an int or
    one int / edge array per coordinate. Returns (probabilities with shape [bins] * d summing to 1 over
    the mass inside the ranges, list of d edge arrays).
    """
    x = np.array(values, dtype=np.float64, copy=True)
    if x.ndim == 1:
        x = x[:, None]
    d = x.shape[1]
    periodic = [False] * d if periodic is None else [bool(p) for p in periodic]
    if len(periodic) != d:
        raise ValueError(f"periodic has {len(periodic)} entries for {d} coordinates")
    for k in range(d):
        if periodic[k]:
            x[:, k] = wrap_angle(x[:, k])
    if ranges is None:
        ranges = [(-math.pi, math.pi) if periodic[k] else (float(np.nanmin(x[:, k])), float(np.nanmax(x[:, k])))
                  for k in range(d)]
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w is not None and len(w) != len(x):
        raise ValueError(f"{len(w)} weights for {len(x)} samples")
    h, edges = np.histogramdd(x, bins=bins, range=list(ranges), weights=w)
    total = h.sum()
    return (h / total if total > 0 else h), list(edges)
