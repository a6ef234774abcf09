"""PMF ensemble: N small networks giving a PMF in kT, evaluated as one batched computation.

The ensemble maps CG coordinates ``s`` [N, d] (radians for dihedrals, nm otherwise, e.g. Mueller-Brown's
s = x - y) to a PMF in kT. Its mean is the PMF used for dynamics; its spread (standard deviation over the
models, population form: divide by the number of models) is the uncertainty that drives active learning.

Design:

* Inputs: each periodic coordinate (period 2 pi) enters as (cos s, sin s), so every model is exactly
  periodic; every other coordinate is standardised with the labels' mean and standard deviation.
* Targets: standardised internally; outputs are mapped back to kT, minus a constant ``offset`` (a PMF is
  defined up to a constant).
* Models: ``n_models`` MLPs (SiLU, smooth forces) whose weights are stacked along a leading model axis,
  [n_models, n_in, n_out] per layer, and evaluated with one ``torch.baddbmm`` per layer, so training and
  inference are one batched computation, never a Python loop over models.

Fitting is :func:`openmm_cgflow.ensemble_fit.fit_ensemble`. :func:`export_pmf` writes a fitted ensemble as
``pmf.pt`` through the plugin's one writer, :func:`openmm_cgflow_plugin.pmf_file.save_pmf`.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from openmm_cgflow_plugin.cgspace import CGSpace
from openmm_cgflow_plugin.pmf_file import save_pmf
from torch import nn

__all__ = ["PMFEnsemble", "StackedLinear", "export_pmf", "default_ranges"]


class StackedLinear(nn.Module):
    """``n_models`` independent affine layers: x [n_models, B, n_in] -> [n_models, B, n_out].

    weight [n_models, n_in, n_out], bias [n_models, 1, n_out]; computed in the dtype of ``x``.
    """

    def __init__(self, n_models: int, n_in: int, n_out: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_models, n_in, n_out, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_models, 1, n_out, dtype=dtype))

    def reset(self, generator: torch.Generator) -> None:
        """nn.Linear's default initialisation, independently for every model."""
        n_in = self.weight.shape[1]
        bound = 1.0 / math.sqrt(n_in)
        with torch.no_grad():
            w = torch.rand(self.weight.shape, generator=generator, dtype=torch.float64) * 2 - 1
            b = torch.rand(self.bias.shape, generator=generator, dtype=torch.float64) * 2 - 1
            self.weight.copy_(w * bound)
            self.bias.copy_(b * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.to(x.dtype), x, self.weight.to(x.dtype))


class PMFEnsemble(nn.Module):
    """Ensemble of ``n_models`` MLPs giving a PMF in kT; TorchScript-compatible (the pmf.pt module).

    Args:
        periodic: per CG coordinate, whether it is a dihedral (period 2 pi, radians).
        n_models: ensemble size.
        hidden: hidden layer widths.
    What the CG coordinates are (names, temperature, atoms) is not the model's business: :func:`export_pmf`
    stores it with the model from a :class:`~openmm_cgflow_plugin.cgspace.CGSpace`.
    Shapes: ``s`` [N, d] -> ``forward`` [N]; ``predict_all`` [n_models, N]; ``mean_and_spread`` two [N].
    """

    periodic: List[bool]
    n_models: int
    n_cg: int

    def __init__(self, periodic: Sequence[bool], n_models: int = 10, hidden: Sequence[int] = (64, 64),
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        periodic = [bool(p) for p in periodic]
        if len(periodic) == 0:
            raise ValueError("at least one CG coordinate is needed")
        if n_models < 1:
            raise ValueError(f"n_models must be >= 1, got {n_models}")
        self.periodic = periodic
        self.n_cg = len(periodic)
        self.n_models = int(n_models)
        self.hidden = [int(h) for h in hidden]
        #: filled by :func:`~openmm_cgflow.ensemble_fit.fit_ensemble` (n_labels, n_dropped, rmse_kT, ...)
        self.fit_info: dict = {}
        n_in = sum(2 if p else 1 for p in periodic)
        sizes = [n_in] + self.hidden + [1]
        self.layers = nn.ModuleList(
            [StackedLinear(self.n_models, a, b, dtype) for a, b in zip(sizes[:-1], sizes[1:])])
        # Input standardisation (non-periodic coordinates only), target standardisation, PMF offset (kT).
        self.register_buffer("s_mean", torch.zeros(self.n_cg, dtype=torch.float64))
        self.register_buffer("s_scale", torch.ones(self.n_cg, dtype=torch.float64))
        self.register_buffer("y_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("y_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("offset", torch.zeros((), dtype=torch.float64))

    def reset_parameters(self, generator: torch.Generator) -> None:
        for layer in self.layers:
            layer.reset(generator)

    def features(self, s: torch.Tensor) -> torch.Tensor:
        """Network inputs [N, n_in]: (cos, sin) of periodic coordinates, standardised others."""
        cols: List[torch.Tensor] = []
        mean = self.s_mean.to(s.dtype)
        scale = self.s_scale.to(s.dtype)
        for k in range(self.n_cg):
            x = s[:, k]
            if self.periodic[k]:
                cols.append(torch.cos(x))
                cols.append(torch.sin(x))
            else:
                cols.append((x - mean[k]) / scale[k])
        return torch.stack(cols, dim=1)

    def predict_standardised(self, s: torch.Tensor) -> torch.Tensor:
        """Raw network outputs [n_models, N] (standardised target units)."""
        return self.networks(self.features(s))

    def networks(self, x: torch.Tensor) -> torch.Tensor:
        """All models on features x [N, n_in] -> [n_models, N] (standardised target units)."""
        h = x.unsqueeze(0).expand(self.n_models, x.shape[0], x.shape[1])
        n_layers = len(self.layers)
        i = 0
        for layer in self.layers:
            h = layer(h)
            if i < n_layers - 1:
                h = torch.nn.functional.silu(h)
            i += 1
        return h.squeeze(-1)

    @torch.jit.export
    def predict_all(self, s: torch.Tensor) -> torch.Tensor:
        """PMF of every model [n_models, N] in kT at s [N, d]."""
        if s.dim() != 2 or s.shape[1] != self.n_cg:
            raise ValueError("s must have shape [N, n_cg]")
        y = self.predict_standardised(s)
        return y * self.y_scale.to(s.dtype) + (self.y_mean - self.offset).to(s.dtype)

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean [N] and standard deviation [N] (population form), both kT, dtype of s."""
        a = self.predict_all(s)
        mean = a.mean(dim=0)
        var = ((a - mean.unsqueeze(0)) ** 2).mean(dim=0)
        return mean, torch.sqrt(var)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """Ensemble-mean PMF [N] in kT at s [N, d] (same dtype as s)."""
        return self.predict_all(s).mean(dim=0)


def default_ranges(ensemble: PMFEnsemble) -> List[Tuple[float, float]]:
    """(lo, hi) per CG coordinate where the ensemble was trained: [-pi, pi] for periodic coordinates, the
    training labels' mean +- 3 standard deviations (the input standardisation) for the others."""
    out = []
    for k in range(ensemble.n_cg):
        if ensemble.periodic[k]:
            out.append((-math.pi, math.pi))
        else:
            mu, sd = float(ensemble.s_mean[k]), float(ensemble.s_scale[k])
            out.append((mu - 3.0 * sd, mu + 3.0 * sd))
    return out


def export_pmf(ensemble: PMFEnsemble, path, cgspace: CGSpace, ranges: Optional[Sequence[Sequence[float]]] = None,
               **metadata) -> str:
    """Write the ensemble as ``pmf.pt`` (atomically, via :func:`openmm_cgflow_plugin.pmf_file.save_pmf`).

    Args:
        ensemble: a fitted :class:`PMFEnsemble`.
        path: output file.
        cgspace: what the CG coordinates are (names, periodicity, temperature K, atom quadruples); its
            periodicity and size must match the ensemble's (e.g. ``cgsystem.cgspace``).
        ranges: (lo, hi) per coordinate where the PMF is meaningful; default :func:`default_ranges`.
        **metadata: JSON-serialisable extras stored in the file's ``metadata`` (with n_models, hidden and
            the fit's n_labels, rmse_kT, bootstrap and seed).
    Returns the path written.
    """
    if not isinstance(cgspace, CGSpace):
        raise TypeError(f"cgspace must be a CGSpace (e.g. cgsystem.cgspace), got {type(cgspace).__name__}")
    if cgspace.d != ensemble.n_cg:
        raise ValueError(f"{cgspace.d} cg_names {cgspace.names} for an ensemble of {ensemble.n_cg} CG coordinates")
    if list(cgspace.periodic) != list(ensemble.periodic):
        raise ValueError(f"periodic {cgspace.periodic} does not match the ensemble's {list(ensemble.periodic)}")
    from . import __version__

    info = dict(getattr(ensemble, "fit_info", {}) or {})
    meta = {"n_models": ensemble.n_models, "hidden": list(ensemble.hidden), "openmm_cgflow_version": __version__,
            "spread": "population standard deviation over models"}
    for key in ("n_labels", "bootstrap", "seed"):
        if key in info:
            meta[key] = info[key]
    if "rmse_kT" in info:
        meta["fit_rmse_kT"] = info["rmse_kT"]
    meta.update(metadata)
    return save_pmf(ensemble, path, cgspace, ranges=ranges if ranges is not None else default_ranges(ensemble),
                    metadata=meta)
