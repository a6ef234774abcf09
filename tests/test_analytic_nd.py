"""The analytic d = 4 system: its PMF by quadrature, and the whole pipeline learning it to 0.1 kT.

U = V(s) + sum_i 1/2 kappa_i(s) (f_i - g_i(s))^2 with s_i = x_i - y_i, f_i = x_i + y_i (see
openmm_cgflow.analytic), so A(s) = V(s)/kT + 1/2 sum_i log kappa_i(s) + const; kT = 1 kJ/mol.
"""

import math
import time

import numpy as np
import openmm
import pytest
import torch

from openmm_cgflow import analytic  # noqa: F401  (registers "analytic-4d")
from openmm_cgflow.flow import flow_for
from openmm_cgflow.learner import PMFLearner
from openmm_cgflow.registry import builtin
from openmm_cgflow.reporting import PlotReporter
from openmm_cgflow.settings import LearnerSettings
from openmm_cgflow_plugin import load_pmf
from openmm_cgflow_plugin.cgspace import kT_kJmol

D = 4


@pytest.fixture(scope="module")
def anl():
    return builtin("analytic-4d")


def _boltzmann_draws(n, seed, beta=1.0):
    """n points [n, 4] (nm) from exp(-beta A(s)) on the domain box, by rejection from uniform."""
    rng = np.random.default_rng(seed)
    lo, hi = analytic.DOMAIN
    a_min = analytic.exact_pmf(np.ones((1, D)))[0] - 1.0  # below the global minimum (near s = 1 or -1)
    out, total = [], 0
    while total < n:
        s = rng.uniform(lo, hi, size=(20_000, D))
        keep = rng.random(len(s)) < np.exp(-beta * (analytic.exact_pmf(s) - a_min))
        out.append(s[keep])
        total += int(keep.sum())
    return np.concatenate(out)[:n]


def test_openmm_energy_is_the_analytic_potential(anl):
    assert anl.n_cg == D and anl.cg_periodic == [False] * D and anl.cg_names == ["s1", "s2", "s3", "s4"]
    assert kT_kJmol(anl.temperature) == pytest.approx(1.0, rel=1e-12)
    context = openmm.Context(anl.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(0)
    for _ in range(5):
        xyz = rng.normal(scale=1.0, size=(D, 3))
        context.setPositions(xyz)
        state = context.getState(getEnergy=True, getForces=True)
        e = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        assert e == pytest.approx(analytic.potential(xyz[:, 0], xyz[:, 1]), rel=1e-10, abs=1e-10)
        forces = np.asarray(state.getForces(asNumpy=True))
        assert np.all(forces[:, 2] == 0.0)  # z carries no energy


def test_exact_pmf_equals_quadrature():
    """-log of the 4-D integral over the fine coordinates (trapezoid, 41^4 points on [-6, 6] nm, no use of
    the Gaussian form) equals the closed form up to one constant."""
    f = np.linspace(-6.0, 6.0, 41)
    df = f[1] - f[0]
    grids = np.meshgrid(f, f, f, indexing="ij")
    rng = np.random.default_rng(3)
    s_points = rng.uniform(-1.8, 1.8, size=(3, D))
    a_quad = []
    for s in s_points:
        total = 0.0
        for f0 in f:  # chunk over the first fine coordinate
            fine = np.stack([np.full_like(grids[0], f0), *grids], axis=-1)  # [41, 41, 41, 4]
            u = analytic.potential((s + fine) / 2, (fine - s) / 2)  # kJ/mol = kT
            total += np.exp(-u).sum()
        a_quad.append(-math.log(total * df**D))
    diff = np.array(a_quad) - analytic.exact_pmf(s_points)
    assert np.ptp(analytic.exact_pmf(s_points)) > 1.0  # the points differ in A: the check is not vacuous
    assert np.ptp(diff) < 1e-6


def test_registered_reference_is_the_exact_pmf_per_bin(anl):
    """The factorised bin integration equals brute force over exact_pmf; the learner accepts the reference."""
    from openmm_cgflow import metrics

    bins, sub = 4, 2
    p = analytic.reference_probabilities(D, bins, sub)
    lo, hi = analytic.DOMAIN
    x = lo + (hi - lo) * (np.arange(bins * sub) + 0.5) / (bins * sub)
    s = np.stack(np.meshgrid(*[x] * D, indexing="ij"), axis=-1).reshape(-1, D)
    w = np.exp(-analytic.exact_pmf(s)).reshape((bins, sub) * D).sum(axis=(1, 3, 5, 7))
    assert np.allclose(p, w / w.sum(), rtol=1e-10, atol=0)
    ref = metrics.check_reference("analytic-4d", anl.cg_periodic, anl.cg_names)
    assert ref["probabilities"].shape == (20,) * D and ref["periodic"] == [False] * D
    # the exact PMF evaluated at the bin centres is close to the bin-integrated reference (0.2 nm bins)
    assert metrics.kld_from_pmf(analytic.exact_pmf, ref) < 0.005  # 1.1 x the exact PMF gives 0.011


def test_particle_coordinates(anl):
    coords = anl.coordinates
    gen = torch.Generator().manual_seed(0)
    fine, s = torch.randn(5, D, generator=gen, dtype=torch.float64), torch.randn(5, D, generator=gen, dtype=torch.float64)
    x, log_det = coords.to_cartesian(fine, s)
    assert x.shape == (5, D, 3) and torch.all(x[..., 2] == 0)
    fine2, s2, log_det2 = coords.to_internal(x)
    assert torch.allclose(fine2, fine, atol=1e-12) and torch.allclose(s2, s, atol=1e-12)
    assert torch.allclose(log_det + log_det2, torch.zeros(5, dtype=torch.float64))
    # log|det d(x, y)/d(f, s)| by autograd
    jac = torch.autograd.functional.jacobian(
        lambda v: coords.to_cartesian(v[:D][None], v[D:][None])[0][0, :, :2].reshape(-1), torch.cat([fine[0], s[0]]))
    assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(float(log_det[0]), abs=1e-12)
    assert np.allclose(anl.cg_of(anl.positions), 1.0)
    with pytest.raises(ValueError, match=r"fine must have shape \[B, 4\]"):
        coords.to_cartesian(fine[:, :3], s)
    flow = flow_for(anl)
    assert flow.n_context == D and flow.n_fine == D


def test_learned_pmf_within_0p1_kT_of_the_exact_pmf(anl, tmp_path):
    """The Must-show: flow trained by energy (OpenMM) -> labels by importance sampling -> ensemble fit ->
    exported pmf.pt read back with load_pmf, at 1,600 fixed CG points (one PMFLearner.step, no exploration).

    Accuracy is the RMS over 400 held-out points drawn from the exact marginal exp(-A(s)) (a Boltzmann-weighted
    RMS), after removing the best constant (the mean difference). Training points are drawn from exp(-A/2)
    (broader, to cover the tails of the held-out set)."""
    t0 = time.perf_counter()
    settings = LearnerSettings.for_system(
        anl, first_epochs=10, samples_per_point=16, points_per_batch=16, lr=3e-3, lr_final=1e-3, label_samples=64,
        n_models=4, n_workers=0, seed=0, flow_kwargs=dict(n_layers=1, hidden=(16, 16), affine_hidden=(64, 64)))
    learner = PMFLearner(anl, tmp_path / "run", settings, reference="analytic-4d", progress=False, plots=False)
    learner.pending = _boltzmann_draws(1600, seed=0, beta=0.5)
    record = learner.step(explore=False)
    # The run's plot for d >= 4: per-pair marginals from importance samples of the exported PMF.
    PlotReporter(learner.run_directory).report(learner, record)
    learner.close()
    with open(learner.run_directory.plot_path("pmf_000.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    pmf = load_pmf(learner.pmf_path, expected_cg=["s1", "s2", "s3", "s4"], temperature=anl.temperature)
    held_out = _boltzmann_draws(400, seed=1)
    mean, spread = (np.asarray(v) for v in pmf.mean_and_spread(held_out))
    diff = mean - analytic.exact_pmf(held_out)
    rms = float(np.sqrt(np.mean((diff - diff.mean()) ** 2)))
    wall = time.perf_counter() - t0
    print(f"analytic-4d: RMS {rms:.3f} kT, KLD {record['kld']:.4f}, mean ESS {record['mean_ess']:.3f}, "
          f"{record['energy_evaluations']} energy evaluations, {wall:.1f} s")
    assert record["mean_ess"] > 0.7
    assert np.ptp(analytic.exact_pmf(held_out)) > 4.0  # the held-out PMF spans several kT
    assert rms < 0.1
