"""The Mueller-Brown potential: a 2-D toy with an exactly computable PMF.

Energies in kJ/mol with x, y in nm (one particle; z carries no energy). At T = 1202.7 K, kT = 10 kJ/mol,
i.e. beta = 0.1 per energy unit as in the literature. The CG coordinate is s = x - y and the fine
coordinate s_perp = x + y.

This module registers the system ``"mueller-brown"`` (:mod:`openmm_cgflow.registry`) with its 1-D
active-learning settings, its flow size and its exact reference: 100 bins on s in [-2.5, 1.1] nm, the
bin probabilities integrated by quadrature.
"""

from __future__ import annotations

import numpy as np
import openmm
import openmm.app as app

from . import metrics
from .coordinates import LinearCoordinates
from .registry import register_system
from .systems import CGSystem

#: Temperature (K) at which kT = 10 kJ/mol (beta = 0.1 mol/kJ).
TEMPERATURE = 1202.7

A = (-200.0, -100.0, -170.0, 15.0)
a = (-1.0, -1.0, -6.5, 0.7)
b = (0.0, 0.0, 11.0, 0.6)
c = (-10.0, -10.0, -6.5, 0.7)
X0 = (1.0, 0.0, -0.5, -1.0)
Y0 = (0.0, 0.5, 1.5, 1.0)

#: Upper-left minimum (nm), the starting basin of the active-learning demo.
UPPER_LEFT_MINIMUM = (-0.558, 1.442)
#: Inverse temperature, mol/kJ (kT = 10 kJ/mol).
BETA = 0.1
#: The reference grid: 100 bins on s = x - y in [-2.5, 1.1] nm.
BINS = 100
RANGE = (-2.5, 1.1)

#: Active-learning settings of the 1-D problem (LearnerSettings overrides; lengths in nm). The ensemble's
#: networks are [32, 32] wide (a 1-D PMF needs no more: final KLD 1.9e-4 to 3.3e-4 over seeds 1-3, as with
#: [64, 64], at two thirds of the fit time). 100 + 60 epochs per iteration and 2,500 fit steps (from 150 + 100
#: and 3,000) cut the run by ~15 % with final KLD 3.8e-4 to 8.2e-4 over seeds 0-2; 50 epochs ended seed 2 at
#: 1.6e-3. 100 walkers of at most 2,000 steps (from 50 of 4,000) search the same CG-walker time in half the
#: steps of a Context whose cost per step hardly depends on the number of walkers: over seeds 0-9 the run
#: stops after 4 iterations in 9 of 10 (5 in 7 of 10 before), in 18-26 s, final KLD 1.3e-4 to 5.2e-4
#: (benchmarks/RESULTS.md).
SETTINGS = dict(
    domain=[[-2.5, 1.1]], radius=0.12, initial_radius=0.25, initial_points=40, new_centres=4,
    points_per_centre=10, n_walkers=100, walker_steps=2_000, report_interval=20,
    first_epochs=100, epochs=60, samples_per_point=8, lr=3e-3, lr_final=3e-5, drop_worst=0,
    label_samples=1000, flow_dtype="float64", ensemble_hidden=[32, 32], fit_steps=2500,
)
#: Flow size for one fine coordinate: 3 conditional spline layers of width 64, the CG input standardised
#: over s in [-2.5, 1.1] nm.
FLOW = dict(n_layers=3, hidden=(64, 64), cg_loc=[-0.7], cg_scale=[1.04])


def potential(x, y):
    """Mueller-Brown energy in kJ/mol at (x, y) in nm; works on floats, numpy arrays and torch tensors."""
    total = 0.0
    for k in range(4):
        dx, dy = x - X0[k], y - Y0[k]
        arg = a[k] * dx * dx + b[k] * dx * dy + c[k] * dy * dy
        total = total + A[k] * (arg.exp() if hasattr(arg, "exp") else np.exp(arg))
    return total


def energy_expression() -> str:
    """The potential as an OpenMM custom-force expression in the particle's x and y."""
    terms = [
        f"({A[k]})*exp(({a[k]})*(x-({X0[k]}))^2+({b[k]})*(x-({X0[k]}))*(y-({Y0[k]}))+({c[k]})*(y-({Y0[k]}))^2)"
        for k in range(4)
    ]
    return "+".join(terms)


def create_system(mass: float = 1.0) -> openmm.System:
    """One-particle OpenMM System with the Mueller-Brown potential as a CustomExternalForce (kJ/mol, nm)."""
    system = openmm.System()
    system.addParticle(mass)
    force = openmm.CustomExternalForce(energy_expression())
    force.addParticle(0, [])
    system.addForce(force)
    return system


def cgsystem() -> CGSystem:
    """Mueller-Brown particle at T = 1202.7 K (kT = 10 kJ/mol); CG coordinate s = x - y (nm), fine x + y."""
    topology = app.Topology()
    residue = topology.addResidue("MB", topology.addChain())
    topology.addAtom("P", None, residue)
    x0, y0 = UPPER_LEFT_MINIMUM
    return CGSystem(
        name="mueller-brown",
        system=create_system(),
        topology=topology,
        positions=np.array([[x0, y0, 0.0]]),
        temperature=TEMPERATURE,
        cg_atoms=[],
        cg_names=["s"],
        cg_periodic=[False],
        coordinates=LinearCoordinates(),
    )


# ------------------------------------------------------------------------------------- the reference
def bin_edges(n: int = BINS) -> np.ndarray:
    """Bin edges [n + 1] (nm) of the CG coordinate s = x - y on [-2.5, 1.1]."""
    return np.linspace(RANGE[0], RANGE[1], n + 1)


def bin_centres(n: int = BINS) -> np.ndarray:
    """Bin centres [n] (nm) of the CG coordinate s = x - y."""
    edges = bin_edges(n)
    return 0.5 * (edges[:-1] + edges[1:])


def histogram(samples, n: int = BINS, smooth: bool = True, weights=None) -> np.ndarray:
    """Smoothed (non-periodic) histogram probabilities [n] of s = x - y samples [N] (nm)."""
    return metrics.histogram_probabilities(np.asarray(samples).reshape(-1, 1), n, [RANGE], [False], smooth, weights)


def reference_probabilities(n: int = BINS, sub: int = 40, df: float = 0.002,
                            f_range: tuple[float, float] = (-5.0, 6.0), beta: float = BETA) -> np.ndarray:
    """Exact bin probabilities [n] along s = x - y by quadrature.

    p(bin) = integral over s in the bin and over f = x + y of exp(-beta U(x, y)), with x = (s + f)/2,
    y = (f - s)/2 (constant Jacobian 1/2, cancelled by normalisation). Midpoint rule with ``sub``
    points per bin in s and step ``df`` (nm) in f over ``f_range`` (the integrand is negligible outside).
    Normalised over the n bins of [-2.5, 1.1].
    """
    edges = bin_edges(n)
    ds = (edges[1] - edges[0]) / sub
    s = edges[0] + ds * (np.arange(n * sub) + 0.5)
    f = np.arange(f_range[0] + 0.5 * df, f_range[1], df)
    p = np.empty(n * sub)
    chunk = 256
    for i in range(0, len(s), chunk):
        si = s[i:i + chunk, None]
        x, y = 0.5 * (si + f[None, :]), 0.5 * (f[None, :] - si)
        u = beta * potential(x, y)
        p[i:i + chunk] = np.exp(-u).sum(axis=1)
    p = p.reshape(n, sub).sum(axis=1)
    return p / p.sum()


def reference_pmf(n: int = BINS) -> np.ndarray:
    """Exact PMF [n] in kT (minimum 0) per bin of s = x - y (bin-integrated)."""
    return metrics.probabilities_to_pmf(reference_probabilities(n))


def reference() -> dict:
    """The KLD reference (see :mod:`openmm_cgflow.metrics`): exact probabilities on 100 bins of s."""
    p = reference_probabilities()
    return metrics.grid_reference(p, [bin_edges()], [False], name="mueller-brown",
                                  free_energy_kT=metrics.probabilities_to_pmf(p))


register_system("mueller-brown", cgsystem, settings=SETTINGS, flow=FLOW, reference=reference)
