"""Free-energy labels A(s) from a trained conditional flow by importance sampling.

For each CG point s, with fine_i ~ q(. | s), x_i = x(fine_i, s) and log p~_i = -u(x_i) + log_det_i,

    A(s) = -ln (1/N) sum_i exp(log p~_i - log q_i)        (kT, up to one constant shared by all points)

computed by log-sum-exp in float64, with the log weights of :func:`openmm_cgflow.importance.log_weights`.
Samples that are not finite or have the wrong chirality (D-alanine) get weight zero but stay in N, so the
estimate is of the reference-chirality free energy. Reported with the Kish effective sample size (the
plugin's ``kish_ess``) and a delta-method standard error, SE(A)^2 = (N / ESS - 1) / (N - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from openmm_cgflow_plugin.statistics import kish_ess

from .importance import log_weights
from .threads import thread_steps

__all__ = ["FreeEnergyLabels", "free_energy"]


@dataclass
class FreeEnergyLabels:
    """Per-point free-energy labels; arrays have length M (number of CG points).

    s: CG points [M, n_cg]. A: free energy (kT; +inf where no sample is usable). stderr: delta-method
    standard error of A (kT). ess: Kish effective sample size. n_samples: N per point.
    n_wrong_chirality, n_nonfinite: excluded samples per point. n_evaluations: energy evaluations spent.
    """

    s: np.ndarray
    A: np.ndarray
    stderr: np.ndarray
    ess: np.ndarray
    n_samples: int
    n_wrong_chirality: np.ndarray
    n_nonfinite: np.ndarray
    n_evaluations: int

    @property
    def ess_fraction(self) -> np.ndarray:
        """ESS / N per point."""
        return self.ess / self.n_samples


def free_energy(flow, cgsystem, bridge, s_points, n_samples: int, batch_size: int = 4096,
                generator: torch.Generator | None = None, threads=None) -> FreeEnergyLabels:
    """Free-energy labels at CG points s_points [M, n_cg] (radians / nm) from ``n_samples`` flow samples each.

    ``cgsystem`` is a CGSystem or a coordinate transform; ``bridge`` an EnergyBridge (or any object with
    ``energy(x) -> u`` in kT). Samples are drawn in batches of about ``batch_size``. A in kT. ``threads``: an
    optional :class:`~openmm_cgflow.threads.ThreadTuner` choosing torch's thread count per batch.
    """
    s_points = torch.as_tensor(np.asarray(s_points, dtype=np.float64)).reshape(len(s_points), -1)
    m, n = s_points.shape[0], int(n_samples)
    if n < 1:
        raise ValueError("n_samples must be >= 1")
    start_evals = int(getattr(bridge, "n_evaluations", 0))
    log_w = torch.empty(m, n, dtype=torch.float64)
    bad = torch.zeros(m, dtype=torch.long)
    wrong = torch.zeros(m, dtype=torch.long)
    per_batch = max(1, batch_size // n)  # whole points per batch
    for p0 in range(0, m, per_batch):
        pts = s_points[p0 : p0 + per_batch]
        for c0 in range(0, n, batch_size):  # points with more samples than batch_size: split the samples
            c1 = min(n, c0 + batch_size)
            s = pts.repeat_interleave(c1 - c0, dim=0)
            with thread_steps(threads, work=len(s)):
                lw, nf, wr = log_weights(flow, cgsystem, bridge, s, generator)
            log_w[p0 : p0 + len(pts), c0:c1] = lw.reshape(len(pts), c1 - c0).cpu()
            bad[p0 : p0 + len(pts)] += nf.reshape(len(pts), -1).sum(1).cpu()
            wrong[p0 : p0 + len(pts)] += wr.reshape(len(pts), -1).sum(1).cpu()
    lse1 = torch.logsumexp(log_w, dim=1)
    usable = torch.isfinite(lse1)
    A = torch.where(usable, -(lse1 - math.log(n)), torch.full_like(lse1, math.inf))
    ess = torch.as_tensor(kish_ess(log_w, axis=1), dtype=torch.float64).reshape(m)
    if n > 1:
        var = torch.clamp(n / ess - 1.0, min=0.0) / (n - 1)
        stderr = torch.where(usable, torch.sqrt(var), torch.full_like(var, math.inf))
    else:
        stderr = torch.full_like(A, math.inf)
    return FreeEnergyLabels(
        s=s_points.numpy(), A=A.numpy(), stderr=stderr.numpy(), ess=ess.numpy(), n_samples=n,
        n_wrong_chirality=wrong.numpy(), n_nonfinite=bad.numpy(),
        n_evaluations=int(getattr(bridge, "n_evaluations", 0)) - start_evals,
    )
