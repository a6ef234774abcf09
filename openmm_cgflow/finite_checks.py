"""Checks that nothing non-finite or overflowed leaves an iteration: labels, the fitted ensemble, the flow.

Each raises ``FloatingPointError`` naming the cause and where it was found, with ``intact`` (a sentence the
caller supplies: which earlier files are still good), before anything of the iteration is written. Also
:func:`probe_grid`, the probe points over the CG ranges that the checks and the convergence signal use.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["LABEL_LIMIT_KT", "check_labels", "check_ensemble", "check_finite_parameters", "probe_grid"]

#: Largest |free-energy label| (kT) the ensemble is fitted to; larger ones mean the energies overflowed.
LABEL_LIMIT_KT = 1e6


def probe_grid(ranges, n_total: int = 4096) -> np.ndarray:
    """Probe points [N, d] over ``ranges`` ((lo, hi) per CG coordinate): a full grid for d <= 3, else ``n_total``
    points of a fixed pseudo-random design (its own generator: the run's random streams are untouched)."""
    d = len(ranges)
    lo = np.array([r[0] for r in ranges], dtype=np.float64)
    hi = np.array([r[1] for r in ranges], dtype=np.float64)
    if d <= 3:
        n = max(2, int(round(n_total ** (1.0 / d))))
        axes = [np.linspace(a, b, n) for a, b in zip(lo, hi)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, d)
    return lo + (hi - lo) * np.random.default_rng(12345).random((n_total, d))


def check_labels(A: np.ndarray, label_s: np.ndarray, iteration: int, intact: str) -> None:
    """FloatingPointError if a label A [M] (kT) is beyond :data:`LABEL_LIMIT_KT` (the energies overflowed)."""
    A = np.asarray(A)
    big = ~(np.abs(A) <= LABEL_LIMIT_KT)
    if big.any():
        worst = int(np.argmax(np.abs(A)))
        raise FloatingPointError(
            f"labels overflowed in iteration {iteration}: {int(big.sum())} labels with |A| > {LABEL_LIMIT_KT:g} kT "
            f"(e.g. A = {A[worst]:.3g} kT at s = {np.round(label_s[worst], 3).tolist()}): the energies there are "
            f"astronomically large (CG points far outside the physical region? check domain and start); nothing "
            f"was exported, {intact}")


def check_ensemble(ensemble, probes, n_cg: int, iteration: int, intact: str) -> None:
    """FloatingPointError if the ensemble's mean or spread is non-finite at any of the ``probes`` (arrays of CG
    points, concatenated)."""
    s = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, n_cg) for p in probes])
    with torch.no_grad():
        mean, spread = ensemble.mean_and_spread(torch.as_tensor(s))
    bad = ~(torch.isfinite(mean) & torch.isfinite(spread)).numpy()
    if bad.any():
        raise FloatingPointError(
            f"non-finite PMF in iteration {iteration}: the fitted ensemble's mean or spread is not finite at "
            f"{int(bad.sum())} of {len(s)} CG points (e.g. s = {np.round(s[np.argmax(bad)], 3).tolist()}); "
            f"nothing was exported, {intact}")


def check_finite_parameters(flow) -> None:
    """FloatingPointError if a parameter of ``flow`` is not finite."""
    for name, p in flow.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"flow parameter {name} became non-finite during training; "
                                     "lower the learning rate (the last checkpoint is intact)")
