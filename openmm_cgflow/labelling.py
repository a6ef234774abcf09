"""The free-energy labels of an active-learning run: drawing them, judging a relabelling, merging.

The labels live in a plain dict of arrays (the checkpoint's format): ``A`` (kT), ``stderr`` (kT), ``ess``
(ESS/N) and ``iteration`` per labelled CG point, beside the points ``label_s`` [M, d].

* :func:`draw_labels`: labels at the new points and at the replayed ones, from the flow just trained.
* :func:`relabel_ess_ratio`: the median ratio of the replayed points' new ESS to their earlier one; below
  :data:`DEGRADED_ESS_RATIO` the flow got worse where it had already learned (the learner then trains the
  iteration again from the previous flow).
* :func:`merge_labels`: the new points' labels are appended; a replayed point's new label replaces its
  earlier one (the flow was just trained there; :func:`replace_labels`). Keeping whichever label has the
  higher ESS, as before issue #13, selects the draws that missed the rare large importance weights and so
  biases the kept labels upward (+0.13 to +0.29 kT at ESS/N 0.08-0.17 after four relabels:
  ``benchmarks/relabel_bias.py``).
* :func:`populated_labels`: the labelled points where the fitted PMF is within a window of its minimum (the
  points a run's polish trains at and labels again).
"""

from __future__ import annotations

import numpy as np

from .free_energy import FreeEnergyLabels, free_energy

__all__ = ["draw_labels", "relabel_ess_ratio", "merge_labels", "replace_labels", "populated_labels",
           "DEGRADED_ESS_RATIO", "MIN_REPLAYED_TO_JUDGE", "LABEL_KEYS"]

#: Below this median ratio of new to earlier ESS at the replayed points, the flow got worse where it learned.
DEGRADED_ESS_RATIO = 0.5
#: Fewer replayed points than this cannot tell a degraded flow from noise: no judgement (ratio 1).
MIN_REPLAYED_TO_JUDGE = 8
#: The per-label arrays.
LABEL_KEYS = ("A", "stderr", "ess", "iteration")


def draw_labels(flow, cgsystem, bridge, new: np.ndarray, replay_s: np.ndarray, n_samples: int, generator,
                threads=None) -> tuple[FreeEnergyLabels, FreeEnergyLabels | None]:
    """(labels at ``new`` [N, d], labels at ``replay_s`` [R, d] or None when R = 0) from ``n_samples`` flow
    samples per point (see :func:`~openmm_cgflow.free_energy.free_energy`); nothing is stored."""
    labels = free_energy(flow, cgsystem, bridge, new, n_samples, generator=generator, threads=threads)
    again = None
    if len(replay_s):
        again = free_energy(flow, cgsystem, bridge, replay_s, n_samples, generator=generator, threads=threads)
    return labels, again


def relabel_ess_ratio(old_ess: np.ndarray, again: FreeEnergyLabels | None) -> float:
    """Median over the replayed points of (new ESS/N) / (earlier ESS/N); 1.0 with fewer than
    :data:`MIN_REPLAYED_TO_JUDGE` points."""
    if again is None or len(old_ess) < MIN_REPLAYED_TO_JUDGE:
        return 1.0
    old = np.maximum(np.asarray(old_ess, dtype=np.float64), 1e-12)
    return float(np.median(np.nan_to_num(again.ess_fraction, nan=0.0) / old))


def merge_labels(store: dict, label_s: np.ndarray, replay_idx: np.ndarray, labels: FreeEnergyLabels,
                 again: FreeEnergyLabels | None, iteration: int, keep_old: bool = False):
    """Merge an iteration's labels into ``store`` (modified) and ``label_s``.

    The replayed points' new labels replace the earlier ones where finite (unless ``keep_old``); the new
    points' finite labels are appended. Returns (label_s [M', d], number relabelled, mask of the new points'
    labels that were kept [N])."""
    n_relabelled = 0
    if again is not None and not keep_old:
        n_relabelled = replace_labels(store, replay_idx, again, iteration)
    good = np.isfinite(labels.A) & np.isfinite(labels.stderr)
    label_s = np.concatenate([label_s, labels.s[good]])
    for key, val in (("A", labels.A[good]), ("stderr", labels.stderr[good]), ("ess", labels.ess_fraction[good]),
                     ("iteration", np.full(int(good.sum()), iteration))):
        store[key] = np.concatenate([store[key], val])
    return label_s, n_relabelled, good


def replace_labels(store: dict, idx: np.ndarray, again: FreeEnergyLabels, iteration: int) -> int:
    """Replace the labels ``idx`` [R] of ``store`` (modified) by ``again`` (labels at those points, in that
    order) where the new label is finite; returns how many were replaced."""
    idx = np.asarray(idx, dtype=int)
    if len(idx) != len(again.A):
        raise ValueError(f"{len(again.A)} new labels for {len(idx)} label indices")
    usable = np.isfinite(again.A) & np.isfinite(again.stderr)
    for key, val in (("A", again.A), ("stderr", again.stderr), ("ess", again.ess_fraction)):
        store[key][idx[usable]] = val[usable]
    store["iteration"][idx[usable]] = iteration
    return int(usable.sum())


def populated_labels(A_fit: np.ndarray, window_kT: float, max_points: int) -> np.ndarray:
    """Indices of the labelled points whose fitted PMF ``A_fit`` [M] (kT) lies within ``window_kT`` of its
    minimum, at most ``max_points`` of them (the lowest), in increasing order of A_fit."""
    A_fit = np.asarray(A_fit, dtype=np.float64)
    order = np.argsort(np.where(np.isfinite(A_fit), A_fit, np.inf), kind="stable")
    finite = A_fit[order]
    keep = np.isfinite(finite) & (finite - finite[0] <= window_kT) if len(finite) else np.zeros(0, bool)
    return order[keep][:max_points]
