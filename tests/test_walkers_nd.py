"""CG walkers in d dimensions (d = 1 ... 6): ceil(d / 3) particles per walker in real OpenMM Contexts (TorchForce
and PythonForce), their forces, their sampling of an analytic six-dimensional PMF, marginals and plots.

The analytic PMF (kT) on the 6-torus, coordinates (phi_1, psi_1, phi_2, psi_2, phi_3, psi_3) = (x_0 ... x_5):

    A = sum_i [a_i cos(phi_i - c_i) + b_i sin(psi_i) + g cos(phi_i + psi_i)] + k sum_{i<3} cos(psi_i - phi_{i+1})

is a chain of nearest-neighbour couplings x_0 - x_1 - ... - x_5, so its exact 2-D marginals follow from transfer
matrices on a fine grid (:func:`exact_pair_probabilities`), independently of the plugin's marginals module.
"""

import math
import os
from types import SimpleNamespace
from typing import Tuple

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch
from torch import nn

from openmm_cgflow_plugin import CGDynamics, CGSpace, load_pmf, pmf_cmap_force, save_pmf
from openmm_cgflow_plugin.backends import force_backend, plugin_forces
from openmm_cgflow_plugin.forces import cg_walker_system, walker_cg, walker_positions
from openmm_cgflow_plugin.marginals import (forward_kld, importance_samples, marginal_free_energy,
                                            marginal_free_energy_from_samples,
                                            marginal_histogram, marginal_kld, pmf_marginal_kld, residue_pairs,
                                            smoothed_probabilities)
from openmm_cgflow_plugin.modules import CGWalkerEnergy, CGWalkerEnergyPBC, walker_particles

#: Parameters of the analytic 6-D PMF (kT): per residue i, a_i cos(phi_i - c_i) + b_i sin(psi_i).
A_COEF = (1.5, 1.0, 1.2)
C_SHIFT = (1.0, -0.5, 2.0)
B_COEF = (1.0, -0.8, 0.6)
G_COUPLING = 0.5
K_COUPLING = 0.8


def _chain_terms(n_fine: int, scale: float = 1.0):
    """Unary [6, n] and pairwise [5, n, n] terms (kT) of the analytic PMF (times ``scale``) on n midpoints of
    [-pi, pi)."""
    e = np.linspace(-math.pi, math.pi, n_fine + 1)
    x = 0.5 * (e[1:] + e[:-1])
    unary = np.zeros((6, n_fine))
    pair = np.zeros((5, n_fine, n_fine))
    for i in range(3):
        unary[2 * i] = A_COEF[i] * np.cos(x - C_SHIFT[i])
        unary[2 * i + 1] = B_COEF[i] * np.sin(x)
        pair[2 * i] = G_COUPLING * np.cos(x[:, None] + x[None, :])
        if i < 2:
            pair[2 * i + 1] = K_COUPLING * np.cos(x[:, None] - x[None, :])
    return scale * unary, scale * pair


def analytic_A6(s: np.ndarray) -> np.ndarray:
    """The analytic 6-D PMF (kT) at s [N, 6] (NumPy, radians)."""
    a = np.zeros(len(s))
    for i in range(3):
        phi, psi = s[:, 2 * i], s[:, 2 * i + 1]
        a += A_COEF[i] * np.cos(phi - C_SHIFT[i]) + B_COEF[i] * np.sin(psi) + G_COUPLING * np.cos(phi + psi)
        if i < 2:
            a += K_COUPLING * np.cos(psi - s[:, 2 * i + 2])
    return a


def exact_pair_probabilities(k: int, n_bins: int = 100, sub: int = 4, scale: float = 1.0) -> np.ndarray:
    """Exact bin probabilities [n_bins, n_bins] of the marginal of (x_k, x_{k+1}) of exp(-scale A6) on [-pi, pi)^2,
    by transfer matrices on a midpoint grid of n_bins * sub points per axis (spectrally accurate for the
    integrals over the other coordinates; midpoint error ~ h^2 within a bin), summed over sub x sub blocks."""
    n = n_bins * sub
    unary, pair = _chain_terms(n, scale)
    h = 2 * math.pi / n
    eu = np.exp(-unary)
    ep = np.exp(-pair) * h
    alpha = [eu[0]]
    for j in range(5):
        a = eu[j + 1] * (alpha[-1] @ ep[j])
        alpha.append(a / a.sum())
    beta = [np.ones(n)]
    for j in range(4, -1, -1):
        b = ep[j] @ (eu[j + 1] * beta[0])
        beta.insert(0, b / b.sum())
    p = alpha[k][:, None] * ep[k] * (eu[k + 1] * beta[k + 1])[None, :]
    p = p.reshape(n_bins, sub, n_bins, sub).sum(axis=(1, 3))
    return p / p.sum()


class AnalyticPMF6(nn.Module):
    """pmf.pt-contract model of the analytic 6-D PMF times ``scale``; spread 0.1 + |sin phi_1| (kT). ``periodic``
    may mark the last coordinate non-periodic (a walker System without a box; A is the same function)."""

    g: float
    k: float
    scale: float

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        self.g = G_COUPLING
        self.k = K_COUPLING
        self.register_buffer("a", torch.tensor(A_COEF, dtype=torch.float64))
        self.register_buffer("b", torch.tensor(B_COEF, dtype=torch.float64))
        self.register_buffer("c", torch.tensor(C_SHIFT, dtype=torch.float64))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mean_and_spread(s)[0]

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        phi = s[:, 0::2]
        psi = s[:, 1::2]
        a = (self.a.to(s.dtype) * torch.cos(phi - self.c.to(s.dtype))).sum(1) \
            + (self.b.to(s.dtype) * torch.sin(psi)).sum(1) + self.g * torch.cos(phi + psi).sum(1) \
            + self.k * torch.cos(psi[:, :2] - phi[:, 1:]).sum(1)
        return self.scale * a, 0.1 + torch.abs(torch.sin(s[:, 0]))


class CosineChain(nn.Module):
    """A = sum_k cos(x_k - 0.3 k) + 0.5 sum_k cos(x_{k+1} - x_k) (kT) in any d; spread 0.2 + 0.1 x_0^2."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mean_and_spread(s)[0]

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shift = 0.3 * torch.arange(s.shape[1], dtype=s.dtype)
        a = torch.cos(s - shift.unsqueeze(0)).sum(1)
        if s.shape[1] > 1:
            a = a + 0.5 * torch.cos(s[:, 1:] - s[:, :-1]).sum(1)
        return a, 0.2 + 0.1 * s[:, 0] * s[:, 0]


class TinyMLP(nn.Module):
    """A random (seeded) two-member MLP ensemble on (cos s, sin s): a non-trivial smooth periodic PMF."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(2, 2 * d, 16, generator=g, dtype=torch.float64) * 0.5)
        self.w2 = nn.Parameter(torch.randn(2, 16, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mean_and_spread(s)[0]

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = torch.cat([torch.cos(s), torch.sin(s)], dim=1)
        h = torch.tanh(torch.einsum("nf,mfh->mnh", f, self.w1.to(s.dtype)))
        e = (h * self.w2.to(s.dtype).unsqueeze(1)).sum(2)
        return e.mean(0), e.std(0)


def _space(d: int, periodic=None) -> CGSpace:
    return CGSpace([f"x{k}" for k in range(d)], [True] * d if periodic is None else periodic, 300.0)


@pytest.fixture(scope="module")
def pmf6(tmp_path_factory):
    return save_pmf(AnalyticPMF6(), tmp_path_factory.mktemp("nd") / "a6.pt", _space(6))


@pytest.fixture(scope="module")
def pmf6_nobox(tmp_path_factory):
    """The same A with x_5 declared non-periodic: no periodic box, x_0..x_4 wrapped inside the module."""
    return save_pmf(AnalyticPMF6(), tmp_path_factory.mktemp("nd") / "a6_nobox.pt",
                    _space(6, [True] * 5 + [False]), ranges=[(-math.pi, math.pi)] * 6)


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chains")
    return {d: save_pmf(CosineChain(), folder / f"chain{d}.pt", _space(d)) for d in (1, 2, 3, 4, 6)}


def _energy_forces(context, positions):
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return e, f


def _autograd_forces(pmf, s: np.ndarray):
    """kT * sum A(s) and -kT dA/ds [W, d] of the loaded PMF's mean by autograd."""
    x = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    e = pmf.kT * pmf.module(x).sum()
    (g,) = torch.autograd.grad(e, x)
    return float(e.detach()), -g.numpy()


# --------------------------------------------------------------------------------------- layout
def test_walker_layout_packs_d_coordinates_into_ceil_d_over_3_particles():
    assert [walker_particles(d) for d in (1, 2, 3, 4, 5, 6, 7, 9, 10)] == [1, 1, 1, 2, 2, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="at least one CG coordinate"):
        walker_particles(0)
    rng = np.random.default_rng(0)
    for d in (1, 2, 3, 4, 6, 7):
        s = rng.uniform(-math.pi, math.pi, size=(5, d))
        pos = walker_positions(s, [True] * d)
        p = walker_particles(d)
        assert pos.shape == (5 * p, 3)
        np.testing.assert_array_equal(pos.reshape(5, 3 * p)[:, :d], s)   # in order, walker after walker
        assert np.all(pos.reshape(5, 3 * p)[:, d:] == 0)
        np.testing.assert_array_equal(walker_cg(pos, [True] * d), s)
        np.testing.assert_allclose(walker_cg(pos + 2 * math.pi, [True] * d), s, atol=1e-12)   # wrapped
    with pytest.raises(ValueError, match=r"\[W \* 2, 3\]"):
        walker_cg(np.zeros((3, 3)), [True] * 4)


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_d_le_3_keeps_one_particle_per_walker_and_its_numbers(backend, chains):
    """d <= 3: one particle per walker, positions[:, :d] = s, unused columns ignored (the layout before d > 3)."""
    rng = np.random.default_rng(1)
    for d in (1, 2, 3):
        system, topology = cg_walker_system(chains[d], 4, backend=backend)
        assert system.getNumParticles() == 4 and topology.getNumAtoms() == 4
        pmf = load_pmf(chains[d])
        s = rng.uniform(-math.pi, math.pi, size=(4, d))
        pos = np.zeros((4, 3))
        pos[:, :d] = s
        pos[:, d:] = rng.normal(size=(4, 3 - d))
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        e, f = _energy_forces(ctx, pos)
        e_ref, f_ref = _autograd_forces(pmf, s)
        assert e == pytest.approx(e_ref, rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(f[:, :d], f_ref, rtol=1e-9, atol=1e-12)
        assert np.all(f[:, d:] == 0)


# ------------------------------------------------------------------------------------ a) forces
@pytest.mark.parametrize("backend", ["torch", "python"])
@pytest.mark.parametrize("which", ["box", "nobox", "mlp"])
def test_d6_walker_forces_are_minus_the_gradient_of_kT_A(backend, which, pmf6, pmf6_nobox, tmp_path):
    """Energy and forces of a d = 6 walker System (2 particles per walker) in an OpenMM Context equal kT * sum A
    and -kT grad A of the PMF's mean by autograd, placed in the right slots (unused slots: zero), with the
    periodic box (all-periodic PMF) and without (one non-periodic coordinate), for positions outside the box."""
    path = {"box": pmf6, "nobox": pmf6_nobox,
            "mlp": save_pmf(TinyMLP(6), tmp_path / "mlp.pt", _space(6)) if which == "mlp" else None}[which]
    pmf = load_pmf(path)
    w = 7
    system, topology = cg_walker_system(pmf, w, backend=backend)
    assert system.getNumParticles() == 2 * w and topology.getNumResidues() == w and topology.getNumAtoms() == 2 * w
    assert system.usesPeriodicBoundaryConditions() == (which != "nobox")
    assert [force_backend(system.getForce(i)).name for i in plugin_forces(system)] == [backend]
    if which != "nobox":
        box = system.getDefaultPeriodicBoxVectors()
        assert [b.value_in_unit(unit.nanometer)[k] for k, b in enumerate(box)] == pytest.approx([2 * math.pi] * 3)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(2)
    per = np.array(pmf.periodic)
    for _ in range(3):
        s = rng.uniform(-3 * math.pi, 3 * math.pi, size=(w, 6))
        s[:, ~per] = rng.uniform(-2.0, 2.0, size=(w, int((~per).sum())))
        flat = rng.normal(size=(w, 6)) * 5.0
        flat[:, :6] = s
        e, f = _energy_forces(ctx, flat.reshape(2 * w, 3))
        s_in = np.where(per, (s + math.pi) % (2 * math.pi) - math.pi, s)
        e_ref, f_ref = _autograd_forces(pmf, s_in)
        assert e == pytest.approx(e_ref, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(f.reshape(w, 6), f_ref, rtol=1e-8, atol=1e-10 * np.abs(f_ref).max())
        if which == "box":
            np.testing.assert_allclose(f_ref[:, 0] / pmf.kT, A_COEF[0] * np.sin(s[:, 0] - C_SHIFT[0])
                                       + G_COUPLING * np.sin(s[:, 0] + s[:, 1]), rtol=1e-9, atol=1e-12)
    # the energy modules on their own: [W * 2, 3] -> same numbers, and a [W, 3] layout would be a shape error
    cls = CGWalkerEnergyPBC if which != "nobox" else CGWalkerEnergy
    module = torch.jit.script(cls(pmf.module, 6, pmf.periodic, pmf.kT))
    x = torch.tensor(flat.reshape(2 * w, 3), requires_grad=True)
    args = (x, torch.eye(3, dtype=torch.float64) * 2 * math.pi) if which != "nobox" else (x,)
    e_m = module(*args)
    assert float(e_m.detach()) == pytest.approx(e_ref, rel=1e-12, abs=1e-12)
    assert module.particles == 2 and module.cg(x).shape == (w, 6)


# --------------------------------------------------------------- dynamics, swap, spread, search
@pytest.mark.parametrize("d", [1, 2, 3, 4, 6])
def test_cg_dynamics_spread_s_and_swap_work_for_any_d(d, chains, tmp_path):
    path = chains[d]
    rng = np.random.default_rng(d)
    s0 = rng.uniform(-math.pi, math.pi, size=(5, d))
    dyn = CGDynamics(path, s0, seed=4)
    assert dyn.simulation.system.getNumParticles() == 5 * walker_particles(d)
    np.testing.assert_allclose(dyn.s, s0, atol=1e-12)
    np.testing.assert_allclose(dyn.spread(), 0.2 + 0.1 * s0[:, 0] ** 2, rtol=1e-12)
    assert dyn.energy_kT() == pytest.approx(float(load_pmf(path).mean(s0).sum()), rel=1e-10)
    s, spread = dyn.run(40, 10)
    assert s.shape == (4, 5, d) and spread.shape == (4, 5)
    assert np.all(s >= -math.pi) and np.all(s < math.pi)
    np.testing.assert_allclose(spread, 0.2 + 0.1 * s[..., 0] ** 2, rtol=1e-12)
    assert not np.allclose(s[-1], s0)                                   # it moved
    dyn.s = s0 + 2 * math.pi                                            # setter wraps
    np.testing.assert_allclose(dyn.s, s0, atol=1e-12)
    other = save_pmf(TinyMLP(d, seed=3), tmp_path / "other.pt", _space(d))
    dyn.swap_pmf(other)
    np.testing.assert_allclose(dyn.s, s0, atol=1e-12)
    assert dyn.energy_kT() == pytest.approx(float(load_pmf(other).mean(s0).sum()), rel=1e-9)
    dyn.run(20, 10)
    with pytest.raises(ValueError, match="CG dimension mismatch"):
        CGDynamics(path, np.zeros((2, d + 1)))
    # the OpenMM reporter records the d CG coordinates of every walker (not the raw particle positions)
    from openmm_cgflow_plugin import CGReporter, read_cg_npz

    reporter = CGReporter(tmp_path / "walkers.npz", 10)
    dyn.simulation.reporters.append(reporter)
    dyn.simulation.step(20)
    reporter.close()
    rec = read_cg_npz(tmp_path / "walkers.npz")
    assert rec["s"].shape == (2, 5, d)
    np.testing.assert_allclose(rec["s"][-1], dyn.s, atol=1e-5)  # float32 file


@pytest.mark.parametrize("d", [1, 4, 6])
def test_find_uncertain_reaches_high_spread_in_d_dimensions(d, chains):
    from openmm_cgflow.exploration import find_uncertain

    st = SimpleNamespace(n_walkers=12, walker_temperature_factor=2.0, walker_timestep_ps=None, report_interval=10,
                         walker_steps=2000, new_centres=2, domain=None, threshold_kT=0.2 + 0.1 * 1.5 ** 2)
    found, stats = find_uncertain(chains[d], np.zeros((3, d)), st, 300.0, [True] * d, np.random.default_rng(5))
    assert found.ndim == 2 and found.shape[1] == d and len(found) >= 1
    assert np.all(np.abs(found[:, 0]) > 1.5)                              # spread > threshold <=> |x_0| > 1.5
    assert stats["max_spread_kT"] > st.threshold_kT


@pytest.mark.parametrize("d", [2, 6])
def test_neighbourhood_is_uniform_in_a_d_ball_and_distances_are_periodic(d):
    from openmm_cgflow.exploration import farthest_points, neighbourhood, periodic_distance

    rng = np.random.default_rng(7)
    r = 0.5
    pts = neighbourhood(np.zeros((1, d)), 40000, r, [True] * d, rng)
    rho = np.linalg.norm(pts, axis=1)
    assert pts.shape == (40000, d) and rho.max() <= r + 1e-12
    # uniform in a d-ball: P(|x| < r/2) = 2^-d, E|x|^2 = d / (d + 2) r^2, and isotropic
    assert np.mean(rho < r / 2) == pytest.approx(0.5 ** d, abs=4 * math.sqrt(0.5 ** d / len(pts)))
    assert np.mean(rho ** 2) == pytest.approx(d / (d + 2) * r * r, rel=0.01)
    np.testing.assert_allclose(np.mean(pts ** 2, axis=0), r * r / (d + 2), rtol=0.05)
    # minimum image per coordinate: across the seam of any axis the distance is short
    a = np.zeros(d)
    a[-1] = math.pi - 0.05
    b = np.zeros(d)
    b[-1] = -math.pi + 0.05
    assert periodic_distance(a, b, [True] * d) == pytest.approx(0.1)
    assert periodic_distance(a, b, [True] * (d - 1) + [False]) == pytest.approx(2 * math.pi - 0.1)
    # farthest-point sampling in d dims: from an existing point at the seam, the point across it is not picked
    cand = np.stack([b, np.full(d, 1.0)])
    assert farthest_points(cand, 1, [True] * d, rng, existing=a[None])[0] == 1
    # the distances to many existing points (taken in blocks) give the brute-force first pick
    cand = rng.uniform(-math.pi, math.pi, size=(300, d))
    ex = rng.uniform(-math.pi, math.pi, size=(4000, d))
    brute = np.array([periodic_distance(cand, e, [True] * d) for e in ex]).min(0)
    assert farthest_points(cand, 3, [True] * d, rng, existing=ex)[0] == int(np.argmax(brute))
    # near the box edge the neighbourhood wraps into [-pi, pi)
    edge = neighbourhood(a[None], 200, r, [True] * d, rng)
    assert np.all(edge >= -math.pi) and np.all(edge < math.pi)
    assert np.all(periodic_distance(edge, a, [True] * d) <= r + 1e-12)


# ------------------------------------------------------------------- b) sampling a 6-D PMF
def test_d6_walkers_sample_the_analytic_6d_pmf_marginals(pmf6):
    """N walkers (2 particles each) in ONE Context, started uniformly on the 6-torus, sample exp(-A6): the forward
    KLD (the metric's definition: smoothed histogram, floor) of each (phi_i, psi_i) marginal on 100 x 100 bins is
    <= 0.01 against the exact transfer-matrix marginals; swapped axes or a mirrored marginal are far off."""
    rng = np.random.default_rng(21)
    dyn = CGDynamics(pmf6, rng.uniform(-math.pi, math.pi, size=(1000, 6)), seed=21)
    assert dyn.simulation.system.getNumParticles() == 2000
    dyn.run(500, 500)                                   # 10 ps burn-in
    s, spread = dyn.run(5000, 25)                       # 100 ps, a frame every 0.5 ps: 200,000 samples
    assert s.shape == (200, 1000, 6) and np.all(s >= -math.pi) and np.all(s < math.pi)
    np.testing.assert_allclose(spread, 0.1 + np.abs(np.sin(s[..., 0])), rtol=1e-12)
    for i, (a, b) in enumerate(residue_pairs(6)):
        p_ref = exact_pair_probabilities(a)
        kld = marginal_kld(s, (a, b), p_ref, periodic=[True] * 6)
        assert kld <= 0.01, (i, kld)
        assert marginal_kld(s, (b, a), p_ref, periodic=[True] * 6) > 0.1
        assert marginal_kld(-s, (a, b), p_ref, periodic=[True] * 6) > 0.1
    # the marginal free energy from these samples is the exact one within noise: the p-weighted RMS error on
    # 20 x 20 bins is ~ sqrt(bins / n_independent) (~0.05-0.1 kT here; swapped axes give > 1 kT)
    p_ex = exact_pair_probabilities(0, 20)
    f, edges = marginal_free_energy_from_samples(s, (0, 1), 20, periodic=[True] * 6)
    assert f.shape == (20, 20) and f.min() == 0.0 and len(edges) == 2
    f_ex = -np.log(p_ex)
    shift = np.sum(p_ex * (f - f_ex))
    assert math.sqrt(np.sum(p_ex * (f - f_ex - shift) ** 2)) < 0.15
    assert math.sqrt(np.sum(p_ex * (f.T - f_ex - np.sum(p_ex * (f.T - f_ex))) ** 2)) > 0.5


# ---------------------------------------------------------------------------- c) marginals
def test_marginal_free_energy_by_quadrature_and_monte_carlo_matches_the_exact_marginals(pmf6):
    """Quadrature over the 4 other coordinates (8 midpoints each) agrees with the transfer matrices (20 midpoints)
    to 1e-4 relative at the bin centres (spectral convergence for this smooth periodic PMF); Monte Carlo with 3,000
    common points agrees within its noise."""
    for k in (0, 2, 4):
        exact = exact_pair_probabilities(k, 20, sub=1)          # probability at the 20 x 20 bin centres
        m = marginal_free_energy(pmf6, (k, k + 1), 20, method="quadrature", n_quadrature=8)
        assert m.method == "quadrature" and m.n_points == 8 ** 4 and m.free_energy.shape == (20, 20)
        assert m.free_energy.min() == 0.0
        np.testing.assert_allclose(m.probabilities, exact, rtol=1e-4)
        assert forward_kld(exact, m.probabilities.T) > 0.1       # axis order matters
    mc = marginal_free_energy(pmf6, (4, 5), 20, method="mc", n_mc=3000, seed=1)
    assert mc.method == "mc" and mc.n_points == 3000 and forward_kld(exact, mc.probabilities) < 0.01
    # the spread is the exp(-A)-weighted mean of 0.1 + |sin phi_1| over the rest: a function of phi_1 only
    m = marginal_free_energy(pmf6, (0, 1), 20, method="quadrature", n_quadrature=8)
    np.testing.assert_allclose(m.spread, (0.1 + np.abs(np.sin(m.centres[0])))[:, None] * np.ones((1, 20)), rtol=1e-12)
    # 1-D marginals and "auto": 1 axis of 6 is 32 bins x 8^5 points, within the quadrature budget
    m1 = marginal_free_energy(pmf6, 3, 32, n_quadrature=8)
    assert m1.method == "quadrature" and m1.free_energy.shape == (32,)
    np.testing.assert_allclose(m1.probabilities, exact_pair_probabilities(2, 32, sub=1).sum(0), rtol=1e-4)
    assert marginal_free_energy(pmf6, (0, 1), 40, n_mc=200).method == "mc"     # 40^2 x 8^4 is over the budget
    with pytest.raises(ValueError, match="distinct CG coordinate indices"):
        marginal_free_energy(pmf6, (0, 0), 10)
    with pytest.raises(ValueError, match="method must be"):
        marginal_free_energy(pmf6, (0, 1), 10, method="simpson")
    assert pmf_marginal_kld(pmf6, (2, 3), exact_pair_probabilities(2, 20, sub=1), n_quadrature=8) < 1e-8


def test_importance_sampled_marginals_of_a_sharp_6d_pmf_match_the_exact_ones(tmp_path):
    """Four times the analytic PMF (basins 10-20 kT deep, mass in a few per cent of the 6-torus): the
    importance-sampled 2-D marginals are within KLD 0.01 of the transfer-matrix ones for every residue pair,
    and far closer than uniform Monte Carlo with the same number of PMF evaluations."""
    path = save_pmf(AnalyticPMF6(scale=4.0), tmp_path / "sharp.pt", _space(6))
    smp = importance_samples(path, n_samples=200_000, n_pilot=100_000, n_centres=1000, seed=1)
    assert smp.s.shape == (200_000, 6) and np.all(np.abs(smp.s) <= math.pi)
    assert smp.ess > 5_000
    for k in (0, 2, 4):
        exact = exact_pair_probabilities(k, scale=4.0)
        m = marginal_free_energy(path, (k, k + 1), 100, method="importance", samples=smp)
        assert m.method == "importance" and m.free_energy.shape == (100, 100)
        kld = forward_kld(exact, m.probabilities)
        mc = marginal_free_energy(path, (k, k + 1), 100, method="mc", n_mc=30, seed=1)  # 3e5 evaluations as well
        assert kld < 0.01, (k, kld)
        assert kld < 0.5 * forward_kld(exact, mc.probabilities), (k, kld)
        if k == 0:   # the spread, 0.1 + |sin phi_1| kT, is a function of this pair's first axis: bin by bin
            assert np.nanmax(np.abs(m.spread - (0.1 + np.abs(np.sin(m.centres[0])))[:, None])) < 0.05


def test_marginal_kld_is_the_metric_of_openmm_cgflow_metrics():
    """The plugin's KLD of sample marginals equals openmm_cgflow.metrics' (same smoothing, floor and skip rules)."""
    from openmm_cgflow.metrics import forward_kld as metrics_kld
    from openmm_cgflow.metrics import grid_reference, histogram_probabilities, kld_from_samples, torus_bin_edges

    rng = np.random.default_rng(3)
    s = rng.vonmises(0.5, 1.5, size=(5000, 4))
    s[:, 3] = rng.normal(0.0, 0.7, size=5000)
    w = rng.uniform(0.5, 2.0, size=5000)
    p_ref = rng.uniform(size=(30, 30)) ** 3
    p_ref[0, :5] = 0.0
    for axes, periodic in (((0, 1), [True] * 4), ((3, 2), [True, True, True, False])):
        ranges = [(-math.pi, math.pi), (-math.pi, math.pi)] if axes == (0, 1) else [(-2.0, 2.0), (-math.pi, math.pi)]
        ours = marginal_kld(s, axes, p_ref, ranges, periodic, weights=w)
        per = [periodic[a] for a in axes]
        q = histogram_probabilities(s[:, list(axes)], 30, ranges, per, smooth=True, weights=w)
        assert ours == pytest.approx(metrics_kld(p_ref, q), rel=1e-12)
        h, _ = marginal_histogram(s, axes, 30, ranges, periodic, w)
        np.testing.assert_allclose(smoothed_probabilities(h, per), q, rtol=1e-12)
        assert marginal_kld(s, axes, p_ref, ranges, periodic, weights=w, smooth=False) == pytest.approx(
            metrics_kld(p_ref, histogram_probabilities(s[:, list(axes)], 30, ranges, per, smooth=False, weights=w)))
    ref = grid_reference(p_ref, [torus_bin_edges(30)] * 2, [True, True])
    assert marginal_kld(s, (0, 1), p_ref, periodic=[True] * 4) == pytest.approx(kld_from_samples(s[:, :2], ref),
                                                                                rel=1e-12)
    assert forward_kld(p_ref, np.ones_like(p_ref)) == pytest.approx(metrics_kld(p_ref, np.ones_like(p_ref)))
    q0 = np.ones_like(p_ref)
    q0[1, 1] = 0.0
    assert forward_kld(p_ref, q0) == math.inf
    with pytest.raises(ValueError, match="shape mismatch"):
        forward_kld(p_ref, np.ones((3, 3)))
    with pytest.raises(ValueError, match="ranges are required"):
        marginal_kld(s, (3, 2), p_ref, periodic=[True, True, True, False])


def test_residue_pairs_and_the_ramachandran_figure(pmf6, tmp_path):
    from openmm_cgflow_plugin.plot import plot_marginals

    assert residue_pairs(6) == [(0, 1), (2, 3), (4, 5)]
    assert residue_pairs(5) == [(0, 1), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="d >= 2"):
        residue_pairs(1)
    png = plot_marginals(pmf6, tmp_path / "figs" / "rama.png", n_grid=20, n_quadrature=4,
                         points=np.zeros((3, 6)), title="6-D analytic PMF")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 20_000
    png = plot_marginals(pmf6, tmp_path / "figs" / "rama_importance.png", n_grid=20, method="importance",
                         n_samples=20_000, title="6-D analytic PMF, importance samples")
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_two_dimensional_only_features_refuse_other_d(pmf6, chains):
    for path in (pmf6, chains[1], chains[3]):
        with pytest.raises(ValueError, match="CMAP needs exactly two dihedral CG coordinates"):
            pmf_cmap_force(path, cg_atoms=[[0, 1, 2, 3]] * load_pmf(path).n_cg)
    assert isinstance(pmf_cmap_force(chains[2], cg_atoms=[[0, 1, 2, 3], [1, 2, 3, 4]]), openmm.CMAPTorsionForce)
