"""The one accuracy metric of the project: forward KL divergence D(p_ref || p_est) on a grid of bins.

A *reference* is plain data, a dict with ``probabilities`` (per bin, any number of axes, summing to 1),
``edges`` (one edge array per axis) and ``periodic`` (one bool per axis), optionally ``free_energy_kT``
(same shape) and ``name``. Each system says what its reference is: the registry
(:func:`openmm_cgflow.registry.reference`) maps a system name to it, e.g. alanine dipeptide's
100 x 100 bins on [-pi, pi)^2 in IUPAC/mdtraj (phi, psi) (radians; 2-D arrays indexed ``[i_phi, j_psi]``)
or Mueller-Brown's 100 bins on s = x - y in [-2.5, 1.1] nm (see :mod:`openmm_cgflow.mueller_brown`).
Wherever a reference is expected, a registered system name, an npz path, such a dict, or a bare
probability array whose axes all have the same number of bins (read as periodic axes on [-pi, pi)) works.

``p_est`` comes either from a PMF (``exp(-A)`` at the bin centres, normalised over all bins) or from
samples (histogram smoothed by a Gaussian of one bin width, periodic where the coordinate is, plus a
floor of 1e-12, normalised). Bins with ``p_ref == 0`` are skipped. Energies/PMFs are in kT throughout.

Only numpy is required; torch is used lazily when a PMF is a torch module (e.g. a loaded ``pmf.pt``).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import numpy as np
# The metric's two primitives live in the plugin (one implementation, usable without the sampler).
from openmm_cgflow_plugin.marginals import HISTOGRAM_FLOOR, forward_kld, smoothed_probabilities  # noqa: F401
from openmm_cgflow_plugin.statistics import weighted_histogram

from . import registry

#: Number of bins per periodic dihedral axis of the standard torus grid.
TORUS_BINS = 100

ArrayLike = Union[np.ndarray, Sequence[float]]


# --------------------------------------------------------------------------------------------- grids
def torus_bin_edges(n: int = TORUS_BINS) -> np.ndarray:
    """Bin edges [n + 1] (radians) of one periodic axis on [-pi, pi)."""
    return np.linspace(-np.pi, np.pi, n + 1)


def torus_bin_centres(n: int = TORUS_BINS) -> np.ndarray:
    """Bin centres [n] (radians) of one periodic axis on [-pi, pi)."""
    edges = torus_bin_edges(n)
    return 0.5 * (edges[:-1] + edges[1:])


def torus_grid_points(n: int = TORUS_BINS) -> np.ndarray:
    """All bin centres of the n x n torus grid as points [n * n, 2] (phi, psi) in radians.

    Row-major with phi along the first axis: ``points.reshape(n, n, 2)[i, j] = (phi_i, psi_j)``, so a
    PMF evaluated on these points reshapes to the ``[i_phi, j_psi]`` layout used throughout this module.
    """
    c = torus_bin_centres(n)
    phi, psi = np.meshgrid(c, c, indexing="ij")
    return np.stack([phi.ravel(), psi.ravel()], axis=1)


# ----------------------------------------------------------------------------------------- the metric
def pmf_to_probabilities(A: ArrayLike) -> np.ndarray:
    """Bin probabilities exp(-A) / sum exp(-A) from a PMF at the bin centres.

    Args:
        A: PMF in kT at the bin centres, any shape; ``+inf`` means probability 0. Adding a constant to
           ``A`` does not change the result.
    Returns the probabilities, same shape, float64, summing to 1.
    """
    A = np.asarray(A, dtype=np.float64)
    if np.any(np.isnan(A)) or np.any(A == -np.inf):
        raise ValueError("PMF contains NaN or -inf")
    finite = np.isfinite(A)
    if not np.any(finite):
        raise ValueError("PMF is +inf everywhere")
    w = np.zeros_like(A)
    w[finite] = np.exp(-(A[finite] - A[finite].min()))
    return w / w.sum()


def probabilities_to_pmf(p: ArrayLike) -> np.ndarray:
    """PMF in kT (minimum 0; +inf where p == 0) from bin probabilities, same shape."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        A = -np.log(p)
    return A - A[np.isfinite(A)].min()


def histogram_probabilities(
    samples: ArrayLike,
    bins: Union[int, Sequence[int]],
    ranges: Sequence[tuple[float, float]],
    periodic: Union[bool, Sequence[bool]],
    smooth: bool = True,
    weights: ArrayLike | None = None,
) -> np.ndarray:
    """Bin probabilities from samples: histogram, Gaussian smoothing of one bin width, floor, normalise.

    Args:
        samples: [N, d] (or [N] for d = 1) CG coordinates (radians for dihedrals, nm otherwise).
        bins: bins per dimension (int or one per dimension).
        ranges: (low, high) per dimension. Periodic coordinates (angles, range [-pi, pi)) are wrapped first;
            non-periodic samples outside the range are dropped.
        periodic: per dimension (or one bool for all) whether the axis wraps around.
        smooth: apply the Gaussian smoothing (sigma = 1 bin, periodic where the axis is) and the
            1e-12 floor; ``False`` gives the raw normalised histogram.
        weights: optional non-negative weights [N] (e.g. reweighting factors of biased samples).
    Returns probabilities with shape ``bins`` (d axes, axis k = dimension k), summing to 1.
    The histogram itself is :func:`openmm_cgflow_plugin.statistics.weighted_histogram`.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    d = x.shape[1]
    bins = [int(bins)] * d if np.isscalar(bins) else [int(b) for b in bins]
    periodic = [bool(periodic)] * d if np.isscalar(periodic) else [bool(p) for p in periodic]
    if len(ranges) != d or len(bins) != d or len(periodic) != d:
        raise ValueError("bins, ranges and periodic must have one entry per dimension")
    h, _ = weighted_histogram(x, weights, bins, [tuple(r) for r in ranges], periodic)
    if h.sum() <= 0:
        raise ValueError("no samples inside the histogram range")
    if not smooth:
        return h
    return smoothed_probabilities(h, periodic)


def torus_histogram(samples: ArrayLike, n: int = TORUS_BINS, smooth: bool = True, weights=None) -> np.ndarray:
    """Smoothed histogram probabilities [n, n] (``[i_phi, j_psi]``) of (phi, psi) samples [N, 2] in radians."""
    return histogram_probabilities(samples, n, [(-np.pi, np.pi)] * 2, [True, True], smooth, weights)


# --------------------------------------------------------------------------------------- references
def grid_reference(probabilities: ArrayLike, edges: Sequence[ArrayLike], periodic: Sequence[bool],
                   name: str = "", **extra) -> dict:
    """A reference dict from bin probabilities (normalised here), edges per axis and periodicity per axis."""
    p = np.asarray(probabilities, dtype=np.float64)
    edges = [np.asarray(e, dtype=np.float64) for e in edges]
    periodic = [bool(q) for q in periodic]
    if p.ndim != len(edges) or p.ndim != len(periodic) or any(len(e) - 1 != n for e, n in zip(edges, p.shape)):
        raise ValueError(f"reference: probabilities of shape {p.shape} do not match {len(edges)} edge arrays "
                         f"of {[len(e) - 1 for e in edges]} bins")
    out = {"name": name, "probabilities": p / p.sum(), "edges": edges, "periodic": periodic}
    out.update(extra)
    return out


def load_reference_npz(path: str | os.PathLike) -> dict:
    """A reference from an npz with ``probabilities`` and either ``edges_0 ... edges_{d-1}`` (plus an optional
    boolean ``periodic``) or ``phi_edges``/``psi_edges`` (two dihedrals, as ``benchmarks/reference_metad.py``
    writes). Optional ``free_energy_kT`` and ``self_consistency_kld`` are kept."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"could not read reference file {path} as an .npz archive: {exc}") from exc
    with z:
        names = set(z.files)
        if "probabilities" not in names:
            raise ValueError(f"reference file {path} has no array 'probabilities' (arrays: {sorted(names)})")
        p = np.array(z["probabilities"], dtype=np.float64)
        if "phi_edges" in names and "psi_edges" in names:
            edges, periodic = [np.array(z["phi_edges"]), np.array(z["psi_edges"])], [True, True]
        else:
            missing = [f"edges_{k}" for k in range(p.ndim) if f"edges_{k}" not in names]
            if missing:
                raise ValueError(f"reference file {path} lacks the bin edges {missing} (or phi_edges/psi_edges) "
                                 f"for its {p.ndim}-axis 'probabilities' (arrays: {sorted(names)})")
            edges = [np.array(z[f"edges_{k}"]) for k in range(p.ndim)]
            periodic = [bool(q) for q in z["periodic"]] if "periodic" in names else [False] * p.ndim
        extra = {}
        if "free_energy_kT" in names:
            extra["free_energy_kT"] = np.array(z["free_energy_kT"])
        if "self_consistency_kld" in names:
            extra["self_consistency_kld"] = float(z["self_consistency_kld"])
    if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
        raise ValueError(f"reference file {path}: 'probabilities' must be finite, non-negative and not all zero")
    return grid_reference(p, edges, periodic, name=os.path.basename(path), **extra)


def load_reference(name: str, path: str | os.PathLike | None = None) -> dict:
    """The reference of the registered system ``name`` (:func:`openmm_cgflow.registry.reference`), or the one
    in the npz file ``path`` when given (see :func:`load_reference_npz`)."""
    if path is not None:
        return load_reference_npz(path)
    return registry.reference(name)


def as_reference(reference) -> dict:
    """A reference dict from a dict, a registered system name, an npz path, or a bare probability array whose
    axes all have the same number of bins (periodic axes on [-pi, pi), radians)."""
    if isinstance(reference, dict):
        return reference
    if isinstance(reference, (str, os.PathLike)):
        s = os.fspath(reference)
        return load_reference_npz(s) if s.endswith(".npz") else registry.reference(s)
    p = np.asarray(reference, dtype=np.float64)
    if p.ndim >= 1 and p.size and len(set(p.shape)) == 1:
        return grid_reference(p, [torus_bin_edges(p.shape[0])] * p.ndim, [True] * p.ndim)
    raise ValueError("reference must be a registered system name, an npz path, a dict or a probability grid "
                     "with the same number of bins on every (periodic) axis")


def check_reference(reference, periodic, names=None, what: str = "reference") -> dict:
    """The reference (anything :func:`as_reference` takes) as a dict, checked against a system's CG coordinates:
    one grid axis per CG coordinate, periodic where the coordinate is. ``periodic`` [d] bools; ``names`` [d]
    optional coordinate names for the message. Raises ValueError naming the mismatch (before any work)."""
    ref = as_reference(reference)
    periodic = [bool(p) for p in periodic]
    axes = len(ref["edges"])
    label = f"{what} {reference!r}" if isinstance(reference, (str, os.PathLike)) else what
    coords = f" ({', '.join(map(str, names))})" if names is not None else ""
    if axes != len(periodic):
        raise ValueError(f"{label} has {axes} grid axis/axes but the system has {len(periodic)} CG coordinate(s)"
                         f"{coords}: it belongs to another system")
    if list(ref["periodic"]) != periodic:
        raise ValueError(f"{label} has periodic axes {list(ref['periodic'])} but the system's CG coordinates"
                         f"{coords} are periodic {periodic}: it belongs to another system")
    return ref


def reference_grid_points(reference) -> np.ndarray:
    """Bin centres of a reference's grid as points [n_bins, d] (row-major, axis 0 first)."""
    ref = as_reference(reference)
    centres = [0.5 * (e[:-1] + e[1:]) for e in ref["edges"]]
    mesh = np.meshgrid(*centres, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _evaluate_pmf(pmf: Callable, points: np.ndarray) -> np.ndarray:
    """Call a PMF on points [N, d]; torch modules get a float64 tensor. Returns A [N] in kT."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(pmf, torch.nn.Module):
        with torch.no_grad():
            out = pmf(torch.as_tensor(points, dtype=torch.float64))
        return np.asarray(out.detach().cpu().numpy(), dtype=np.float64).reshape(-1)
    out = pmf(points)
    if torch is not None and isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=np.float64).reshape(-1)


# ----------------------------------------------------------------------------------------- the API
def kld_from_pmf(pmf: Union[Callable, ArrayLike], reference) -> float:
    """Forward KLD D(p_ref || exp(-A)) of a PMF on a reference's grid.

    Args:
        pmf: a callable taking CG points [N, d] (numpy array, or float64 tensor for a torch module such
             as a loaded ``pmf.pt``) and returning A [N] in kT; or A already evaluated at the bin
             centres (shape of the reference grid, or flat in the row-major order of
             :func:`reference_grid_points`).
        reference: a registered system name (e.g. ``"alanine-dipeptide"``: 100 x 100 on [-pi, pi)^2), an npz
             path, a reference dict, or a probability grid (see :func:`as_reference`).
    Returns the divergence in nats.
    """
    ref = as_reference(reference)
    p_ref = ref["probabilities"]
    if callable(pmf):
        A = _evaluate_pmf(pmf, reference_grid_points(ref))
    else:
        A = np.asarray(pmf, dtype=np.float64)
    A = A.reshape(p_ref.shape)
    return forward_kld(p_ref, pmf_to_probabilities(A))


def kld_from_samples(samples: ArrayLike, reference, weights=None) -> float:
    """Forward KLD D(p_ref || smoothed histogram of samples) on a reference's grid.

    Args:
        samples: CG samples [N, d] (radians for dihedrals; nm otherwise; [N] for d = 1).
        reference: as in :func:`kld_from_pmf`.
        weights: optional per-sample weights [N] (reweighting).
    """
    ref = as_reference(reference)
    p_ref = ref["probabilities"]
    edges = ref["edges"]
    q = histogram_probabilities(samples, [len(e) - 1 for e in edges], [(e[0], e[-1]) for e in edges],
                                ref["periodic"], smooth=True, weights=weights)
    return forward_kld(p_ref, q)


def basin_populations(p: np.ndarray, n: int = TORUS_BINS) -> dict:
    """Populations of the backbone basins of one residue's (phi, psi) from torus bin probabilities [n, n]
    (``[i_phi, j_psi]``), e.g. alanine dipeptide's or one residue of a peptide.

    Definitions (radians, by bin centre): ``phi_pos`` = phi > 0 (alpha_L, C7ax);
    ``alpha_R`` = phi < 0 and -2.0 < psi < 1.0; ``beta_C7eq`` = phi < 0 and (psi >= 1.0 or psi <= -2.0).
    """
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    c = torus_bin_centres(n)
    phi, psi = np.meshgrid(c, c, indexing="ij")
    neg = phi < 0
    alpha = neg & (psi > -2.0) & (psi < 1.0)
    return {"beta_C7eq": float(p[neg & ~alpha].sum()), "alpha_R": float(p[alpha].sum()),
            "phi_pos": float(p[~neg].sum())}
