"""Plots of a PMF ensemble: Ramachandran-style mean/spread panels (2-D) or mean +- spread (1-D)
(:func:`plot_pmf`), and per-residue Ramachandran panels of 2-D marginals of a d-dimensional PMF
(:func:`plot_marginals`).

matplotlib is imported lazily here and used only through its object API (``matplotlib.figure.Figure``
with an Agg canvas: no pyplot, no global backend change, no display needed). Energies in kT, angles in
radians (other CG coordinates in nm). The PNG is written atomically.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from .cgspace import wrap_periodic
from .files import atomic_write
from .pmf import PMF, load_pmf

__all__ = ["plot_pmf", "plot_marginals", "as_pmf"]


def as_pmf(pmf_path_or_model) -> PMF:
    """A :class:`PMF` from a path, a PMF, or an in-memory module with ``cg_names``/``periodic`` attributes
    and ``mean_and_spread`` (e.g. an ensemble before it is saved; ``temperature``, ``cg_atoms`` and
    ``cg_ranges`` are read when present)."""
    if isinstance(pmf_path_or_model, PMF):
        return pmf_path_or_model
    if isinstance(pmf_path_or_model, torch.nn.Module) and not isinstance(pmf_path_or_model, torch.jit.ScriptModule):
        for attr in ("cg_names", "periodic", "mean_and_spread"):
            if not hasattr(pmf_path_or_model, attr):
                raise ValueError(f"the PMF module has no {attr!r}")
        return PMF(pmf_path_or_model)
    return load_pmf(pmf_path_or_model)


def _ranges(pmf: PMF, points, ranges):
    if ranges is not None:
        return [tuple(map(float, r)) for r in ranges]
    out = []
    for k in range(pmf.n_cg):
        if pmf.periodic[k]:
            out.append((-math.pi, math.pi))
        elif pmf.cg_ranges is not None and k < len(pmf.cg_ranges):
            out.append(tuple(pmf.cg_ranges[k]))  # the domain it was trained on: beyond it the spread only grows
        elif points is not None and len(points):
            lo, hi = float(np.min(points[:, k])), float(np.max(points[:, k]))
            pad = 0.15 * max(hi - lo, 1e-3)
            out.append((lo - pad, hi + pad))
        else:
            out.append(pmf.default_range(k))
    return out


def _label(pmf: PMF, k: int) -> str:
    return f"{pmf.cg_names[k]} ({'rad' if pmf.periodic[k] else 'nm'})"


def plot_pmf(pmf_path_or_model, png_path, points=None, threshold: Optional[float] = None, n_grid: int = 100,
             ranges: Optional[Sequence[tuple]] = None, vmax: Optional[float] = None, title: Optional[str] = None,
             dpi: int = 110) -> str:
    """Write a PNG of the ensemble mean and spread.

    Args:
        pmf_path_or_model: ``pmf.pt`` path, loaded PMF, or in-memory ensemble module.
        png_path: output file (folders are created).
        points: optional CG points [M, d] to overlay (e.g. the labelled points of active learning).
        threshold: optional spread threshold (kT), drawn as a contour (2-D) or a line (1-D).
        n_grid: grid points per axis. ranges: per-axis (low, high); periodic axes default to [-pi, pi),
            non-periodic ones to the file's ``cg_ranges`` (the domain it was trained on), else the points +- 15 %.
        vmax: upper limit (kT) of the mean's colour scale (default: min(max, 99th percentile + 2)).
    2-D: two panels (mean with minimum 0, spread). 1-D: mean with a +-spread band above, spread below.
    Returns ``png_path``.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    pmf = as_pmf(pmf_path_or_model)
    if pmf.n_cg not in (1, 2):
        raise ValueError(f"plot_pmf draws 1-D or 2-D PMFs; this one has {pmf.n_cg} CG coordinates")
    pts = None
    if points is not None:
        pts = wrap_periodic(np.asarray(points, dtype=np.float64).reshape(-1, pmf.n_cg), pmf.periodic)
    rng = _ranges(pmf, pts, ranges)
    centres, mean, spread = pmf.grid(n_grid, rng)
    mean = mean - np.min(mean)
    # constrained layout keeps axis labels and colour bars inside the figure (tight_layout cut the phi label)
    fig = Figure(figsize=(11, 4.6) if pmf.n_cg == 2 else (7, 6), layout="constrained")
    FigureCanvasAgg(fig)
    if pmf.n_cg == 2:
        top = float(np.percentile(mean, 99)) + 2.0
        vmax = float(vmax) if vmax is not None else min(float(mean.max()), top)
        axes = fig.subplots(1, 2)
        x, y = centres
        im0 = axes[0].pcolormesh(x, y, np.minimum(mean, vmax).T, shading="auto", cmap="viridis", vmin=0, vmax=vmax)
        axes[0].contour(x, y, mean.T, levels=np.arange(1, vmax, 2), colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(im0, ax=axes[0], label="mean PMF (kT)")
        im1 = axes[1].pcolormesh(x, y, spread.T, shading="auto", cmap="magma")
        fig.colorbar(im1, ax=axes[1], label="ensemble spread (kT)")
        if threshold is not None and spread.min() < threshold < spread.max():
            axes[1].contour(x, y, spread.T, levels=[threshold], colors="cyan", linewidths=1.2)
            axes[0].contour(x, y, spread.T, levels=[threshold], colors="red", linewidths=0.9, linestyles="dashed")
        for ax, name in zip(axes, ("mean", "spread")):
            if pts is not None:
                ax.scatter(pts[:, 0], pts[:, 1], s=3, c="k" if name == "spread" else "w", alpha=0.6, lw=0)
            ax.set_xlabel(_label(pmf, 0))
            ax.set_ylabel(_label(pmf, 1))
            ax.set_xlim(*rng[0])
            ax.set_ylim(*rng[1])
            ax.set_aspect("equal" if all(pmf.periodic) else "auto")
        axes[0].set_title("ensemble mean" + (f" (threshold {threshold:g} kT dashed)" if threshold is not None else ""))
        axes[1].set_title("ensemble spread" + (f", {threshold:g} kT contour" if threshold is not None else ""))
    else:
        x = centres[0]
        ax0, ax1 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        ax0.plot(x, mean, color="C0", label="ensemble mean")
        ax0.fill_between(x, mean - spread, mean + spread, color="C0", alpha=0.3, label="mean +- spread")
        ax0.set_ylabel("PMF (kT)")
        if vmax is not None:
            ax0.set_ylim(top=vmax)
        ax1.plot(x, spread, color="C3")
        ax1.set_ylabel("spread (kT)")
        ax1.set_xlabel(_label(pmf, 0))
        if threshold is not None:
            ax1.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g} kT")
            ax1.legend(loc="upper right", fontsize=8)
        if pts is not None:
            for ax in (ax0, ax1):
                ax.plot(pts[:, 0], np.zeros(len(pts)), "|", color="k", ms=8, alpha=0.5,
                        transform=ax.get_xaxis_transform())
        ax0.legend(loc="upper right", fontsize=8)
        ax1.set_xlim(*rng[0])
    return _save(fig, png_path, title, dpi)


def plot_marginals(pmf_path_or_model, png_path, pairs: Optional[Sequence[Sequence[int]]] = None, n_grid: int = 60,
                   method: str = "auto", n_quadrature: int = 8, n_mc: int = 2000, n_samples: int = 400_000,
                   seed: int = 0, points=None, vmax: Optional[float] = None, title: Optional[str] = None,
                   dpi: int = 110) -> str:
    """Write a per-residue Ramachandran PNG of a d-dimensional PMF: one column per pair (phi_i, psi_i), the
    2-D marginal mean free energy on top (kT, minimum 0) and the marginal spread below (kT, the exp(-A)-weighted
    mean ensemble spread over the other coordinates).

    Args:
        pmf_path_or_model: ``pmf.pt`` path, loaded PMF or in-memory ensemble module (d >= 2).
        pairs: coordinate index pairs (default :func:`~openmm_cgflow_plugin.marginals.residue_pairs`:
            (0, 1), (2, 3), ...).
        n_grid: bins per axis of each marginal; method, n_quadrature, n_mc, seed: how the other coordinates
            are integrated out (:func:`~openmm_cgflow_plugin.marginals.marginal_free_energy`; "importance",
            the choice for d >= 4, draws one set of ``n_samples`` importance samples, after ``n_samples // 2``
            uniform pilot points, for all panels).
        points: optional CG points [M, d] overlaid on every panel (projected on the pair).
        vmax: upper limit (kT) of the free-energy colour scale (default: min(max, 99th percentile + 2)).
    Returns ``png_path``.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .marginals import importance_samples, marginal_free_energy, residue_pairs

    pmf = as_pmf(pmf_path_or_model)
    pairs = residue_pairs(pmf.n_cg) if pairs is None else [tuple(int(a) for a in p) for p in pairs]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"pairs must be a list of (i, j) coordinate index pairs, got {pairs}")
    pts = None
    if points is not None:
        pts = wrap_periodic(np.asarray(points, dtype=np.float64).reshape(-1, pmf.n_cg), pmf.periodic)
    rng = _ranges(pmf, pts, None)
    fig = Figure(figsize=(4.2 * len(pairs) + 0.8, 7.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(2, len(pairs), squeeze=False))
    samples = None
    if method == "importance":  # one set for all panels
        samples = importance_samples(pmf, n_samples=int(n_samples), n_pilot=max(1, int(n_samples) // 2), ranges=rng,
                                     seed=seed)
    for col, (i, j) in enumerate(pairs):
        m = marginal_free_energy(pmf, (i, j), n_grid, rng, method=method, n_quadrature=n_quadrature, n_mc=n_mc,
                                 seed=seed, samples=samples)
        x, y = m.centres
        f = m.free_energy
        top = min(float(f.max()), float(np.percentile(f, 99)) + 2.0) if vmax is None else float(vmax)
        im0 = axes[0, col].pcolormesh(x, y, np.minimum(f, top).T, shading="auto", cmap="viridis", vmin=0, vmax=top)
        if top > 1:
            axes[0, col].contour(x, y, f.T, levels=np.arange(1, top, 1), colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(im0, ax=axes[0, col], label="marginal free energy (kT)")
        im1 = axes[1, col].pcolormesh(x, y, m.spread.T, shading="auto", cmap="magma")
        fig.colorbar(im1, ax=axes[1, col], label="marginal spread (kT)")
        axes[0, col].set_title(f"{pmf.cg_names[i]}, {pmf.cg_names[j]}: mean ({m.method})")
        axes[1, col].set_title(f"{pmf.cg_names[i]}, {pmf.cg_names[j]}: spread")
        for ax in axes[:, col]:
            if pts is not None:
                ax.scatter(pts[:, i], pts[:, j], s=3, c="k", alpha=0.5, lw=0)
            ax.set_xlabel(_label(pmf, i))
            ax.set_ylabel(_label(pmf, j))
            ax.set_xlim(*rng[i])
            ax.set_ylim(*rng[j])
            ax.set_aspect("equal" if pmf.periodic[i] and pmf.periodic[j] else "auto")
    return _save(fig, png_path, title, dpi)


def _save(fig, png_path, title, dpi: int) -> str:
    """Write ``fig`` (with ``title`` as its suptitle, if any) to ``png_path`` atomically; returns the path."""
    if title:
        fig.suptitle(title)
    png_path = os.fspath(png_path)
    with atomic_write(png_path) as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return png_path
