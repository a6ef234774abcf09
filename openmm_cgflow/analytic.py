"""An analytic test system with d >= 2 CG coordinates whose PMF is known in closed form.

d particles in the xy plane (z carries no energy). Particle i has the CG coordinate s_i = x_i - y_i and the
fine coordinate f_i = x_i + y_i (nm), as Mueller-Brown's one particle has. The energy (kJ/mol) is

    U(x) = V(s) + sum_i 1/2 kappa_i(s) (f_i - g_i(s))^2

    V(s)       = kT [ sum_i h (s_i^2 - 1)^2 + c s_i s_{i+1} ]          (double wells, coupled neighbours)
    kappa_i(s) = kappa0 exp(b sin(s_{i+1} - s_i))                       (kJ/mol/nm^2)
    g_i(s)     = m sin(2 s_{i+1})                                       (nm)

with indices cyclic (i + 1 = 0 after d - 1). Given s the fine coordinates are independent Gaussians of
mean g_i(s) and variance kT / kappa_i(s), and (x, y) -> (f, s) is linear, so the exact PMF is

    A(s) = V(s) / kT + 1/2 sum_i log kappa_i(s) + const = V(s) / kT + (b / 2) sum_i sin(s_{i+1} - s_i) + const

in kT (:func:`exact_pmf`; :func:`potential` is the same energy in numpy for quadrature checks). The
temperature is 1 / R = 120.27 K, so kT = 1 kJ/mol. The fine coordinates depend nonlinearly on s through
both their means and their widths, which the conditional flow must learn; the PMF does not depend on g.

This module registers ``"analytic-4d"`` (d = 4) with its settings, a small flow and its exact KLD reference
(:func:`reference`: 20 bins of 0.2 nm per axis on [-2, 2] nm, bin-integrated); :func:`cgsystem` builds any
d >= 2 (for d != 4 register it under your own name, with a ``domain`` of d pairs, to run it).
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import openmm.app as app
import torch
from openmm_cgflow_plugin.cgspace import MOLAR_GAS_CONSTANT

from . import metrics
from .coordinates import _as_float64, _check_positions
from .registry import register_system
from .systems import CGSystem

__all__ = ["ParticleCoordinates", "cgsystem", "create_system", "potential", "exact_pmf", "reference", "TEMPERATURE",
           "DOMAIN"]

#: K, at which kT = 1 kJ/mol.
TEMPERATURE = 1.0 / MOLAR_GAS_CONSTANT
#: Parameters (see the module docstring): h, c, b dimensionless; kappa0 kJ/mol/nm^2; m nm.
H, C, B, KAPPA0, M = 1.0, 0.3, 1.0, 4.0, 0.5
#: Box (nm) of every CG coordinate explored: (lo, hi).
DOMAIN = (-2.0, 2.0)


class ParticleCoordinates:
    """d particles: fine = [x_i + y_i] (nm), s = [x_i - y_i] (nm), i = 0..d-1; z ignored (0 in to_cartesian).

    ``to_cartesian`` log_det = d log(1/2) (|det d(x, y)/d(f, s)|); ``to_internal`` log_det = d log 2.
    Mueller-Brown's :class:`~openmm_cgflow.coordinates.LinearCoordinates` is the case d = 1.
    """

    def __init__(self, d: int):
        d = int(d)
        if d < 1:
            raise ValueError(f"ParticleCoordinates needs d >= 1 particles, got {d}")
        self.n_atoms = self.n_fine = self.n_cg = d
        self.circular = torch.zeros(d, dtype=torch.bool)
        self.cg_periodic = [False] * d

    def to_internal(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, d, 3] nm -> (fine [B, d] nm, s [B, d] nm, log_det [B] = d log 2)."""
        x = _check_positions(x, self.n_atoms)
        px, py = x[:, :, 0], x[:, :, 1]
        return px + py, px - py, torch.full_like(px[:, 0], self.n_cg * math.log(2.0))

    def to_cartesian(self, fine, s) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine [B, d], s [B, d]) nm -> (x [B, d, 3] nm with z = 0, log_det [B] = d log(1/2))."""
        fine = _as_float64(fine, "fine")
        s = _as_float64(s, "s").to(fine.device)
        d = self.n_cg
        if fine.ndim != 2 or fine.shape[1] != d:
            raise ValueError(f"fine must have shape [B, {d}], got {tuple(fine.shape)}")
        if s.shape != fine.shape:
            raise ValueError(f"s must have shape [{fine.shape[0]}, {d}], got {tuple(s.shape)}")
        x = torch.stack([(s + fine) / 2, (fine - s) / 2, torch.zeros_like(fine)], dim=-1)
        return x, torch.full_like(fine[:, 0], d * math.log(0.5))

    def chirality_ok(self, x) -> torch.Tensor:
        """All True [B] (point particles have no handedness)."""
        x = _as_float64(x, "x")
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def __repr__(self) -> str:
        return f"ParticleCoordinates(d={self.n_cg}: fine_i = x_i + y_i, s_i = x_i - y_i)"


def _terms(s, f, lib):
    """(V [..] kJ/mol, 1/2 sum kappa (f - g)^2 [..] kJ/mol) for s, f [..., d] (numpy or torch via ``lib``)."""
    s_next = lib.roll(s, -1, -1) if lib is np else torch.roll(s, -1, -1)
    kT = 1.0  # kJ/mol at TEMPERATURE
    v = kT * (H * (s * s - 1.0) ** 2 + C * s * s_next).sum(-1)
    kappa = KAPPA0 * lib.exp(B * lib.sin(s_next - s))
    g = M * lib.sin(2.0 * s_next)
    return v, (0.5 * kappa * (f - g) ** 2).sum(-1)


def potential(x, y) -> np.ndarray:
    """U in kJ/mol of particle positions x, y [..., d] (nm), numpy."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    v, fine = _terms(x - y, x + y, np)
    return v + fine


def exact_pmf(s) -> np.ndarray:
    """Exact PMF A(s) [N] in kT at s [N, d] (nm), up to a constant: V/kT + (b/2) sum_i sin(s_{i+1} - s_i)."""
    s = np.atleast_2d(np.asarray(s, dtype=np.float64))
    v = (H * (s * s - 1.0) ** 2 + C * s * np.roll(s, -1, -1)).sum(-1)
    return v + 0.5 * B * np.sin(np.roll(s, -1, -1) - s).sum(-1)


def energy_expression(d: int) -> str:
    """U as an OpenMM CustomCompoundBondForce expression in the particles' x1, y1, ..., xd, yd (kJ/mol, nm)."""
    if d < 2:
        raise ValueError(f"the analytic system needs d >= 2 CG coordinates, got {d}")
    terms, defs = [], []
    for i in range(1, d + 1):
        j = i % d + 1
        terms.append(f"{H}*(s{i}^2-1)^2+{C}*s{i}*s{j}+0.5*{KAPPA0}*exp({B}*sin(s{j}-s{i}))*(f{i}-{M}*sin(2*s{j}))^2")
        defs.append(f"s{i}=x{i}-y{i}; f{i}=x{i}+y{i}")
    return "+".join(terms) + "; " + "; ".join(defs)


def create_system(d: int = 4, mass: float = 1.0) -> openmm.System:
    """OpenMM System of d particles with U as one CustomCompoundBondForce (kJ/mol, nm)."""
    system = openmm.System()
    for _ in range(d):
        system.addParticle(mass)
    force = openmm.CustomCompoundBondForce(d, energy_expression(d))
    force.addBond(list(range(d)), [])
    system.addForce(force)
    return system


def cgsystem(d: int = 4) -> CGSystem:
    """The analytic system with d CG coordinates s_i = x_i - y_i (nm) at 120.27 K (kT = 1 kJ/mol), starting
    at s_i = 1 (a minimum of the double wells), f_i = g_i(s)."""
    d = int(d)
    topology = app.Topology()
    residue = topology.addResidue("ANL", topology.addChain())
    for i in range(d):
        topology.addAtom(f"P{i + 1}", None, residue)
    s0 = np.ones(d)
    f0 = M * np.sin(2.0 * np.roll(s0, -1))
    positions = np.stack([(s0 + f0) / 2, (f0 - s0) / 2, np.zeros(d)], axis=1)
    return CGSystem(
        name=f"analytic-{d}d",
        system=create_system(d),
        topology=topology,
        positions=positions,
        temperature=TEMPERATURE,
        cg_atoms=[],
        cg_names=[f"s{i + 1}" for i in range(d)],
        cg_periodic=[False] * d,
        coordinates=ParticleCoordinates(d),
    )


def reference_probabilities(d: int = 4, bins: int = 20, sub: int = 3) -> np.ndarray:
    """Exact bin probabilities [bins] * d of exp(-A(s)) on the domain box, ``bins`` per axis, each bin integrated
    by the midpoint rule with ``sub`` points per axis; normalised. exp(-A) is a cyclic product of pair factors
    exp(-(h (s_i^2 - 1)^2 + c s_i s_j + (b/2) sin(s_j - s_i))), j = i + 1, built by broadcasting ((bins sub)^d
    floats: d = 4 only in practice)."""
    lo, hi = DOMAIN
    n = bins * sub
    x = lo + (hi - lo) * (np.arange(n) + 0.5) / n
    u, v = x[:, None], x[None, :]
    pair = np.exp(-(H * (u * u - 1.0) ** 2 + C * u * v + 0.5 * B * np.sin(v - u)))  # [s_i, s_j]
    p = np.ones((n,) * d)
    for i in range(d):
        j = (i + 1) % d
        factor = pair if j > i else pair.T  # axes in increasing order: (i, j) or (0, d - 1)
        shape = [1] * d
        shape[min(i, j)], shape[max(i, j)] = n, n
        p = p * factor.reshape(shape)
    for axis in range(d):
        p = p.reshape(p.shape[:axis] + (bins, sub) + p.shape[axis + 1:]).sum(axis=axis + 1)
    return p / p.sum()


def reference(d: int = 4, bins: int = 20) -> dict:
    """The KLD reference of :mod:`openmm_cgflow.metrics`: exact probabilities on ``bins`` bins per axis
    (default 20 of 0.2 nm on [-2, 2] nm), non-periodic."""
    p = reference_probabilities(d, bins)
    edges = np.linspace(DOMAIN[0], DOMAIN[1], bins + 1)
    return metrics.grid_reference(p, [edges] * d, [False] * d, name=f"analytic-{d}d",
                                  free_energy_kT=metrics.probabilities_to_pmf(p))


#: Active-learning settings for d = 4 (nm; energies kT).
SETTINGS = dict(
    domain=[list(DOMAIN)] * 4, radius=0.5, initial_radius=0.6, initial_points=100, new_centres=8,
    points_per_centre=10, n_walkers=50, walker_steps=4_000, report_interval=20, first_epochs=100, epochs=60,
    samples_per_point=16, lr=3e-3, lr_final=3e-5, drop_worst=0, label_samples=256, flow_dtype="float64",
)
#: Flow size: 4 fine coordinates, a conditional affine layer of width (64, 64) (a single hidden layer of 32 plateaus
#: at ESS ~0.45 on this system) + 2 spline coupling layers; CG input (s - 0) / 1 (the domain is [-2, 2] nm).
FLOW = dict(n_layers=2, hidden=(64, 64), affine_hidden=(64, 64), cg_loc=[0.0] * 4, cg_scale=[1.0] * 4)

register_system("analytic-4d", lambda: cgsystem(4), settings=SETTINGS, flow=FLOW, reference=reference)
