"""Reweighting of biased all-atom runs back to the unbiased ensemble.

With a bias V(x) = factor * kT * A(s(x)) added to the potential (:func:`~openmm_cgflow_plugin.forces.add_pmf_bias`),
frames are distributed as p_b(x) ~ exp(-beta (U(x) + V(x))). The unbiased average of any observable O is

    <O> = sum_t w_t O(x_t) / sum_t w_t,   w_t = exp(+beta V(x_t)) = exp(factor * A(s_t))   (A in kT),

so with ``factor = -1`` (flattening) frames in low-PMF regions get the large weights. The statistical
quality is summarised by Kish's effective sample size ESS = (sum w)^2 / sum w^2.

Shapes: s [F, d] (radians), weights [F]. All functions take NumPy arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .cgspace import kT_kJmol, wrap_periodic
from .pmf import load_pmf
from .statistics import kish_ess, normalised_weights, weighted_histogram

__all__ = ["Reweighting", "reweight", "effective_sample_size", "reweighted_histogram"]


def effective_sample_size(weights) -> float:
    """Kish's ESS = (sum w)^2 / sum w^2 of non-negative (linear) weights [F]
    (:func:`~openmm_cgflow_plugin.statistics.kish_ess` of their logarithms)."""
    with np.errstate(divide="ignore"):
        return float(kish_ess(np.log(np.asarray(weights, dtype=np.float64).reshape(-1))))


@dataclass
class Reweighting:
    """Normalised unbiasing weights of F frames.

    weights [F] (sum 1), log_weights [F] (unnormalised, = beta * V_bias), ess (Kish), ess_fraction = ess / F.
    """

    weights: np.ndarray
    log_weights: np.ndarray
    ess: float

    @property
    def n_frames(self) -> int:
        return len(self.weights)

    @property
    def ess_fraction(self) -> float:
        return self.ess / max(1, self.n_frames)

    def average(self, values):
        """Weighted mean of ``values`` [F] (or [F, k]) and its standard error sqrt(var / ESS)."""
        v = np.asarray(values, dtype=np.float64)
        w = self.weights.reshape((-1,) + (1,) * (v.ndim - 1))
        mean = np.sum(w * v, axis=0)
        var = np.sum(w * (v - mean) ** 2, axis=0)
        return mean, np.sqrt(var / max(self.ess, 1.0))

    def population(self, mask):
        """Weighted fraction of frames where ``mask`` [F] is True, with its standard error."""
        return self.average(np.asarray(mask, dtype=np.float64))

    def histogram(self, s, bins=100, ranges: Optional[Sequence[tuple]] = None, periodic=None):
        """Reweighted, normalised histogram of ``s`` [F, d]; periodic coordinates wrapped into [-pi, pi).

        Returns (probabilities with shape [bins] * d, edges list)."""
        return reweighted_histogram(s, self.weights, bins, ranges, periodic)


def _from_log_weights(log_w: np.ndarray) -> Reweighting:
    log_w = np.asarray(log_w, dtype=np.float64).reshape(-1)
    if log_w.size == 0:
        raise ValueError("no frames to reweight")
    if not np.all(np.isfinite(log_w)):
        raise ValueError("bias energies must be finite")
    return Reweighting(weights=normalised_weights(log_w), log_weights=log_w, ess=kish_ess(log_w))


def reweight(s=None, pmf=None, factor: float = -1.0, bias_kT=None, bias_kJmol=None, temperature=None,
             cap_kT=None) -> Reweighting:
    """Unbiasing weights for frames of a run biased by ``factor * A(s)``.

    Give either ``s`` [F, d] (CG coordinates of the frames, radians) with ``pmf`` (the ``pmf.pt`` used for
    the bias) and ``factor``; or the per-frame bias energies directly: ``bias_kT`` [F] (V / kT) or
    ``bias_kJmol`` [F] with ``temperature`` (K). The weights are exp(+V / kT), i.e. exp(factor * A(s)), with
    A capped at ``cap_kT`` when the bias was (:func:`~openmm_cgflow_plugin.forces.add_pmf_bias`).
    """
    if bias_kT is not None:
        return _from_log_weights(bias_kT)
    if bias_kJmol is not None:
        if temperature is None:
            raise ValueError("bias_kJmol needs the temperature (K)")
        return _from_log_weights(np.asarray(bias_kJmol, dtype=np.float64) / kT_kJmol(float(temperature)))
    if s is None or pmf is None:
        raise ValueError("give s and pmf (and factor), or bias_kT, or bias_kJmol and temperature")
    pmf = load_pmf(pmf, temperature=temperature)
    s = np.asarray(s, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None] if pmf.n_cg == 1 else s[None, :]
    # The pmf.pt contract defines A on [-pi, pi) for dihedrals: wrap frames given in another convention.
    A = pmf.mean(wrap_periodic(s, pmf.periodic))
    if cap_kT is not None:
        A = np.minimum(A, float(cap_kT))
    return _from_log_weights(float(factor) * A)


def reweighted_histogram(s, weights, bins=100, ranges: Optional[Sequence[tuple]] = None, periodic=None):
    """Normalised histogram [bins] * d of samples ``s`` [F, d] with linear ``weights`` [F].

    ``ranges`` default to [-pi, pi) per coordinate; ``periodic`` (default all True) coordinates are wrapped
    into [-pi, pi) first (:func:`~openmm_cgflow_plugin.statistics.weighted_histogram`). Returns
    (probabilities, list of edge arrays)."""
    x = np.asarray(s, dtype=np.float64)
    d = 1 if x.ndim == 1 else x.shape[1]
    ranges = list(ranges) if ranges is not None else [(-math.pi, math.pi)] * d
    periodic = [True] * d if periodic is None else [bool(p) for p in periodic]
    return weighted_histogram(x, weights, bins=bins, ranges=ranges, periodic=periodic)
