"""A convergence signal that needs no reference, and the stop rule built on it.

``pmf_change_kT`` (in iterations.jsonl) is the exp(-A)-weighted RMS of A_now - A_before (kT) over probe points,
after removing their weighted mean difference (a PMF's constant is arbitrary): how much the PMF that matters
moved since the previous iteration. The learner probes a uniform grid of the CG ranges for d <= 3 (a Boltzmann
average over CG space) and the labelled points for larger d. :func:`change_says_stop` is the second stop rule
of :class:`~openmm_cgflow.learner.PMFLearner` (``change_tolerance_kT``, ``change_patience``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pmf_change", "change_says_stop"]


def pmf_change(now: np.ndarray, before: np.ndarray) -> float:
    """exp(-now)-weighted RMS of (now - before) minus its weighted mean, in kT; ``now``, ``before`` [N] are two
    PMFs (kT) at the same probe points."""
    now = np.asarray(now, dtype=np.float64)
    diff = now - np.asarray(before, dtype=np.float64)
    p = np.exp(-(now - now.min()))
    p /= p.sum()
    centred = diff - np.sum(p * diff)
    return float(np.sqrt(np.sum(p * centred ** 2)))


def change_says_stop(changes, tolerance: float | None, patience: int) -> bool:
    """True when the last ``patience`` values of ``changes`` (``pmf_change_kT`` per iteration, None for the
    first) are all below ``tolerance`` (kT); never with ``tolerance`` None."""
    if tolerance is None:
        return False
    last = list(changes)[-int(patience):]
    return len(last) == int(patience) and all(c is not None and c < tolerance for c in last)
