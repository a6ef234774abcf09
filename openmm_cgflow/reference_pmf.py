"""A PMF ensemble fitted to a registered system's reference: a "good PMF" for demos, examples and benchmarks.

:func:`fit_to_reference` draws labels from the reference free energy (kT) of a registered system
(:func:`openmm_cgflow.registry.reference`) and fits an ensemble to them; the CG space (names, periodicity,
temperature in K, atom quadruples) comes from the system itself (:attr:`CGSystem.cgspace`).
"""

from __future__ import annotations

import numpy as np

from . import metrics, registry
from .ensemble import PMFEnsemble
from .ensemble_fit import fit_ensemble

__all__ = ["fit_to_reference"]


def fit_to_reference(name: str, n_labels: int = 2000, noise_kT: float = 0.0, seed: int = 0,
                     **fit_kwargs) -> tuple[PMFEnsemble, dict]:
    """An ensemble fitted to the packaged reference PMF of the registered system ``name``.

    Labels are the reference free energy (kT) at ``n_labels`` random bin centres of its grid (jittered
    uniformly within the bin along periodic axes; bins of infinite free energy dropped), plus optional
    Gaussian noise ``noise_kT`` (also used as stderr). ``fit_kwargs`` go to
    :func:`~openmm_cgflow.ensemble_fit.fit_ensemble` (e.g. ``steps``, ``n_models``).
    Returns (ensemble, keyword arguments for :func:`~openmm_cgflow.ensemble.export_pmf`: ``cgspace`` from the
    system and ``source``), so ``export_pmf(ensemble, path, **kwargs)`` writes it.
    """
    cgspace = registry.builtin(name).cgspace
    ref = registry.reference(name)
    rng = np.random.default_rng(seed)
    F = ref.get("free_energy_kT")
    if F is None:
        F = metrics.probabilities_to_pmf(ref["probabilities"])
    pts = metrics.reference_grid_points(ref)
    idx = rng.choice(len(pts), size=min(n_labels, len(pts)), replace=False)
    s = pts[idx]
    periodic = [bool(p) for p in ref["periodic"]]
    if any(periodic):
        widths = np.array([e[1] - e[0] for e in ref["edges"]])
        jitter = rng.uniform(-0.5, 0.5, size=(len(idx), len(periodic))) * widths
        s = s + np.where(periodic, jitter, 0.0)
    A = np.asarray(F, dtype=np.float64).ravel()[idx]
    keep = np.isfinite(A)
    s, A = s[keep], A[keep]
    if noise_kT > 0:
        A = A + noise_kT * rng.standard_normal(len(A))
    stderr = np.full(len(A), noise_kT) if noise_kT > 0 else None
    ens = fit_ensemble(s, A, stderr, periodic, seed=seed, **fit_kwargs)
    return ens, {"cgspace": cgspace, "source": f"reference of {name!r}"}
