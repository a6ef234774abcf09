"""Where to look next: geometry of the CG space and the CG-walker search for uncertain points.

* :func:`periodic_distance`, :func:`farthest_points` (greedy farthest-point sampling with minimum-image
  distances, per coordinate: the d-torus metric), :func:`neighbourhood` (points uniform in a d-dimensional
  ball around centres), :func:`clip_to_domain` and
  :func:`in_domain` (the box of the non-periodic coordinates outside of which nothing is explored);
* :func:`populated_starts`: walkers' starting points drawn from labelled points by exp(-A) (the
  ``walker_starts = "populated"`` setting; "newest" starts them from the points labelled last);
* :func:`find_uncertain`: CG walkers in OpenMM (``openmm_cgflow_plugin.CGDynamics``) on an exported
  ``pmf.pt`` run until they reach points where the ensemble spread exceeds a threshold.

Units: CG coordinates in radians (periodic, period 2 pi, wrapped into [-pi, pi)) or nm; spreads in kT;
temperatures in K; timesteps in ps. Random numbers come from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np
from openmm_cgflow_plugin import CGDynamics
from openmm_cgflow_plugin.cgspace import wrap_periodic

__all__ = ["periodic_distance", "farthest_points", "neighbourhood", "clip_to_domain", "in_domain",
           "populated_starts", "find_uncertain", "WALKER_STARTS"]

#: Where the CG walkers of an iteration start (LearnerSettings.walker_starts).
WALKER_STARTS = ("newest", "populated")


def periodic_distance(a: np.ndarray, b: np.ndarray, periodic) -> np.ndarray:
    """Euclidean distance with minimum-image differences on periodic dims (period 2 pi).

    a [..., d], b [..., d] (broadcast) -> [...].
    """
    diff = wrap_periodic(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), periodic)
    return np.sqrt((diff**2).sum(-1))


def farthest_points(points: np.ndarray, k: int, periodic, rng: np.random.Generator,
                    existing: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``k`` mutually distant rows of points [N, d] (greedy farthest-point sampling).

    With ``existing`` [M, d], the first pick is the point farthest from them; otherwise a random one.
    Distances to ``existing`` are taken in blocks (memory ~ 2e6 floats, whatever N, M and d).
    """
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=int)
    k = min(int(k), n)
    if existing is not None and len(existing):
        existing = np.asarray(existing, dtype=np.float64)
        dmin = np.full(n, np.inf)
        block = max(1, 2_000_000 // (n * points.shape[1]))
        for i in range(0, len(existing), block):
            near = periodic_distance(points[:, None, :], existing[None, i:i + block, :], periodic).min(1)
            dmin = np.minimum(dmin, near)
        first = int(np.argmax(dmin))
    else:
        first = int(rng.integers(n))
        dmin = np.full(n, np.inf)
    chosen = [first]
    dmin = np.minimum(dmin, periodic_distance(points, points[first], periodic))
    while len(chosen) < k:
        nxt = int(np.argmax(dmin))
        chosen.append(nxt)
        dmin = np.minimum(dmin, periodic_distance(points, points[nxt], periodic))
    return np.array(chosen, dtype=int)


def neighbourhood(centres: np.ndarray, n_per_centre: int, radius: float, periodic, rng: np.random.Generator,
                  domain=None) -> np.ndarray:
    """Points uniform in a d-dimensional ball of ``radius`` around each centre [C, d] -> [C * n_per_centre, d]:
    direction uniform on the sphere S^(d-1) (normalised Gaussian), distance radius * U^(1/d).

    Periodic dims are wrapped to [-pi, pi); non-periodic ones clipped to ``domain`` [(lo, hi), ...].
    """
    centres = np.atleast_2d(np.asarray(centres, dtype=np.float64))
    c, d = centres.shape
    direction = rng.standard_normal((c, n_per_centre, d))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    r = radius * rng.random((c, n_per_centre, 1)) ** (1.0 / d)
    pts = (centres[:, None, :] + r * direction).reshape(-1, d)
    return clip_to_domain(wrap_periodic(pts, periodic), periodic, domain)


def clip_to_domain(pts: np.ndarray, periodic, domain) -> np.ndarray:
    """Copy of points [N, d] with each non-periodic coordinate clipped to its (lo, hi) in ``domain`` (one
    pair per non-periodic coordinate, in order; None: no clipping)."""
    if domain is None:
        return pts
    pts = pts.copy()
    j = 0
    for i, per in enumerate(periodic):
        if not per:
            lo, hi = domain[j]
            pts[:, i] = np.clip(pts[:, i], lo, hi)
            j += 1
    return pts


def in_domain(pts: np.ndarray, periodic, domain) -> np.ndarray:
    """Boolean [N]: whether each point [N, d] lies inside ``domain`` (see :func:`clip_to_domain`)."""
    ok = np.ones(len(pts), dtype=bool)
    if domain is None:
        return ok
    j = 0
    for i, per in enumerate(periodic):
        if not per:
            lo, hi = domain[j]
            ok &= (pts[:, i] >= lo) & (pts[:, i] <= hi)
            j += 1
    return ok


def populated_starts(points: np.ndarray, A: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows of points [M, d] drawn with replacement with probability proportional to exp(-A) (A [M] in
    kT, the current PMF at the points; non-finite A never drawn): starting points for walkers that should
    search where the population is. With d CG coordinates the frontier of the labelled region is mostly
    improbable (for the alanine tetrapeptide, 19 of its 27 backbone-basin combinations have a residue at
    phi > 0), so walkers started from the newest points drift there. Returns [n, d]."""
    points = np.asarray(points, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64).reshape(-1)
    if len(A) != len(points):
        raise ValueError(f"populated_starts: {len(points)} points but {len(A)} free energies")
    finite = np.isfinite(A)
    if not finite.any():
        raise ValueError("populated_starts: no point has a finite free energy")
    logw = np.where(finite, -(A - A[finite].min()), -np.inf)
    p = np.exp(logw)
    return points[rng.choice(len(points), size=int(n), replace=True, p=p / p.sum())]


def find_uncertain(pmf_path, starts: np.ndarray, settings, temperature: float, periodic,
                   rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """CG walkers on ``pmf_path`` from ``settings.n_walkers`` points drawn from ``starts`` [M, d] until they
    reach points where the ensemble spread exceeds ``settings.threshold_kT``.

    The walkers run Langevin dynamics at ``settings.walker_temperature_factor * temperature`` (K) for at most
    ``walker_steps`` steps, checked every ``report_interval`` steps; a walker stops at its first uncertain
    point inside the domain. The search ends early once ``2 * new_centres`` walkers have found one.
    Returns (uncertain points [K, d], stats: max_spread_kT, mean_spread_kT, uncertain_found, walker_steps).
    """
    st = settings
    s0 = starts[rng.choice(len(starts), size=st.n_walkers, replace=len(starts) < st.n_walkers)]
    kwargs = {"sampling_temperature": st.walker_temperature_factor * temperature}
    if st.walker_timestep_ps is not None:
        kwargs["timestep"] = st.walker_timestep_ps
    dyn = CGDynamics(pmf_path, s0, seed=int(rng.integers(1, 2**30)), **kwargs)
    active = np.ones(st.n_walkers, dtype=bool)
    found, max_spread, spread_sum, n_frames = [], 0.0, 0.0, 0
    chunk = st.report_interval * 10
    steps = 0
    want = max(2 * st.new_centres, 1)
    while steps < st.walker_steps and active.any():
        n = min(chunk, st.walker_steps - steps)
        s, spread = dyn.run(n, st.report_interval)
        steps += n
        s = np.asarray(s)
        spread = np.asarray(spread)
        for f in range(s.shape[0]):
            inside = in_domain(s[f], periodic, st.domain)
            sp = np.where(inside, spread[f], 0.0)
            max_spread = max(max_spread, float(sp[active].max(initial=0.0)))
            spread_sum += float(sp[active & inside].sum())
            n_frames += int((active & inside).sum())
            hit = active & inside & (sp > st.threshold_kT)
            for w in np.flatnonzero(hit):
                found.append(s[f, w])
            active &= ~hit
        if len(found) >= want and (~active).sum() >= want:
            break
    stats = {"max_spread_kT": max_spread, "mean_spread_kT": spread_sum / max(n_frames, 1),
             "uncertain_found": len(found), "walker_steps": int(steps)}
    return np.asarray(found, dtype=np.float64).reshape(-1, len(periodic)), stats
