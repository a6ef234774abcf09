"""Tests of the forward-KLD metric (openmm_cgflow.metrics) and the Mueller-Brown exact reference
(openmm_cgflow.mueller_brown)."""

import os

import numpy as np
import pytest

from openmm_cgflow import alanine_dipeptide as aldp
from openmm_cgflow import metrics as M
from openmm_cgflow import mueller_brown as mb


@pytest.fixture(scope="module")
def mb_ref():
    return mb.reference_probabilities()


def test_kld_of_distribution_with_itself_is_zero():
    rng = np.random.default_rng(0)
    p = rng.random((100, 100))
    assert M.forward_kld(p, p) == pytest.approx(0.0, abs=1e-14)
    # normalisation is done inside: scaling either argument changes nothing
    assert M.forward_kld(3.0 * p, p) == pytest.approx(0.0, abs=1e-14)


def test_kld_discrete_known_value_and_asymmetry():
    p = np.array([0.5, 0.5])
    q = np.array([0.25, 0.75])
    expected = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert M.forward_kld(p, q) == pytest.approx(expected, rel=1e-12)
    assert M.forward_kld(q, p) != pytest.approx(expected, rel=1e-3)


def test_kld_two_gaussians_matches_analytic():
    # PMFs A = x^2 / 2 sigma^2 on a fine grid: the binned KLD converges to the continuous one
    edges = np.linspace(-12, 12, 4001)
    x = 0.5 * (edges[1:] + edges[:-1])
    m1, s1, m2, s2 = 0.0, 1.0, 0.7, 1.6
    p = M.pmf_to_probabilities((x - m1) ** 2 / (2 * s1 ** 2))
    q = M.pmf_to_probabilities((x - m2) ** 2 / (2 * s2 ** 2))
    analytic = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    assert M.forward_kld(p, q) == pytest.approx(analytic, rel=1e-5)


def test_kld_from_pmf_invariant_to_constant_and_callable_equals_grid():
    rng = np.random.default_rng(1)
    p_ref = rng.random((100, 100)) + 0.1
    pts = M.torus_grid_points()

    def pmf(s):
        return np.cos(s[:, 0]) + 0.5 * np.sin(2 * s[:, 1]) + 0.3 * s[:, 0] * 0  # smooth periodic function

    grid = pmf(pts).reshape(100, 100)
    k = M.kld_from_pmf(grid, p_ref)
    assert k > 0
    assert M.kld_from_pmf(grid + 7.3, p_ref) == pytest.approx(k, rel=1e-12)
    assert M.kld_from_pmf(pmf, p_ref) == pytest.approx(k, rel=1e-12)
    assert M.kld_from_pmf(lambda s: pmf(s) - 100.0, p_ref) == pytest.approx(k, rel=1e-12)
    # layout: axis 0 is phi
    assert np.allclose(pts.reshape(100, 100, 2)[:, 0, 0], M.torus_bin_centres())
    assert np.allclose(pts.reshape(100, 100, 2)[0, :, 1], M.torus_bin_centres())


def test_kld_from_pmf_accepts_torch_module():
    torch = pytest.importorskip("torch")

    class PMF(torch.nn.Module):
        def forward(self, s):
            return torch.cos(s[:, 0]) - torch.cos(s[:, 1])

    rng = np.random.default_rng(2)
    p_ref = rng.random((100, 100))
    pts = M.torus_grid_points()
    grid = (np.cos(pts[:, 0]) - np.cos(pts[:, 1])).reshape(100, 100)
    assert M.kld_from_pmf(torch.jit.script(PMF()), p_ref) == pytest.approx(M.kld_from_pmf(grid, p_ref), rel=1e-12)


def test_empty_reference_bins_are_skipped():
    p_ref = np.array([0.0, 0.2, 0.8, 0.0])
    q = np.array([0.0, 0.5, 0.5, 0.3])  # q = 0 where p_ref = 0 is fine
    qn = q / q.sum()
    expected = 0.2 * np.log(0.2 / qn[1]) + 0.8 * np.log(0.8 / qn[2])
    assert M.forward_kld(p_ref, q) == pytest.approx(expected, rel=1e-12)
    # p_est = 0 where p_ref > 0 is an infinite divergence
    assert M.forward_kld(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == np.inf
    # an infinite PMF is probability 0
    assert M.pmf_to_probabilities(np.array([0.0, np.inf]))[1] == 0.0


def test_periodic_smoothing_wraps_around():
    # all samples in the first phi bin: smoothing must leak equally into the last and the second bin
    samples = np.stack([np.full(1000, -np.pi + 0.01), np.zeros(1000)], 1)
    h = M.torus_histogram(samples)
    assert h.shape == (100, 100)
    assert h.sum() == pytest.approx(1.0)
    row = h[:, 50]
    assert row[-1] == pytest.approx(row[1], rel=1e-9)
    assert row[-1] > 1e-3
    # angles outside [-pi, pi) are wrapped
    h2 = M.torus_histogram(samples + np.array([2 * np.pi, -4 * np.pi]))
    assert np.allclose(h, h2)
    # non-periodic (Mueller-Brown) smoothing does not wrap: the last bin only gets the floor
    hs = mb.histogram(np.full(1000, mb.RANGE[0] + 0.001))
    assert hs.sum() == pytest.approx(1.0)
    assert hs[-1] < 1e-10 and hs[1] > 1e-3
    # floor: no bin is zero, so an unvisited bin gives a finite divergence
    assert h.min() > 0
    assert np.isfinite(M.forward_kld(np.ones((100, 100)), h))


def test_smoothed_histogram_of_reference_samples_is_close():
    rng = np.random.default_rng(3)
    c = M.torus_bin_centres()
    A = 2 * (1 - np.cos(c[:, None] + 1.5)) + 1.0 * (1 - np.cos(c[None, :] - 2.5))
    p = M.pmf_to_probabilities(A)
    idx = rng.choice(p.size, size=200_000, p=p.ravel())
    h = 2 * np.pi / 100
    pts = M.torus_grid_points()[idx] + rng.uniform(-h / 2, h / 2, (idx.size, 2))
    k = M.kld_from_samples(pts, p)
    assert 0 < k < 0.02
    # weights: uniform weights change nothing
    assert M.kld_from_samples(pts, p, weights=np.full(len(pts), 2.0)) == pytest.approx(k, rel=1e-10)


def test_mueller_brown_reference_normalised_and_minima(mb_ref):
    p = mb_ref
    assert p.shape == (100,)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(p > 0)
    A = M.probabilities_to_pmf(p)
    c = mb.bin_centres()
    # global minimum: the upper-left basin, s = x - y = -0.558 - 1.442 = -2.0
    assert c[np.argmin(A)] == pytest.approx(UPPER_LEFT_S, abs=0.04)
    # two further local minima near the other two Mueller-Brown minima (s ~ -0.52 and s ~ 0.60)
    loc = [c[i] for i in range(1, 99) if A[i] < A[i - 1] and A[i] < A[i + 1]]
    assert len(loc) == 3
    assert loc[1] == pytest.approx(-0.517, abs=0.06)
    assert loc[2] == pytest.approx(0.595, abs=0.06)
    # quadrature converged: a coarser rule gives the same bins
    coarse = mb.reference_probabilities(sub=10, df=0.004)
    assert M.forward_kld(p, coarse) < 1e-8
    assert np.max(np.abs(coarse / p - 1)) < 1e-3


UPPER_LEFT_S = mb.UPPER_LEFT_MINIMUM[0] - mb.UPPER_LEFT_MINIMUM[1]


def test_mueller_brown_reference_matches_direct_2d_integral(mb_ref):
    # independent check: integrate exp(-beta U) on an (x, y) grid and bin by s = x - y
    h = 0.004
    x = np.arange(-3.0, 2.5, h) + h / 2
    y = np.arange(-1.5, 3.5, h)  # offset by h/2 against x: no s = x - y value lies on a bin edge
    X, Y = np.meshgrid(x, y, indexing="ij")
    w = np.exp(-mb.BETA * mb.potential(X, Y))
    hist, _ = np.histogram((X - Y).ravel(), bins=mb.bin_edges(), weights=w.ravel())
    assert M.forward_kld(mb_ref, hist) < 2e-4
    assert M.kld_from_pmf(mb.reference_pmf(), "mueller-brown") == pytest.approx(0.0, abs=1e-12)


def test_basin_populations_sum_to_one():
    pops = M.basin_populations(np.ones((100, 100)))
    assert sum(pops.values()) == pytest.approx(1.0)
    assert pops["phi_pos"] == pytest.approx(0.5)
    assert pops["alpha_R"] == pytest.approx(0.5 * 48 / 100, abs=0.01)


def test_packaged_alanine_reference_if_present():
    path = os.path.join(os.path.dirname(M.__file__), "data", aldp.REFERENCE_FILE)
    if not os.path.exists(path):
        pytest.skip("alanine-dipeptide reference not generated yet (benchmarks/reference_metad.py)")
    ref = M.load_reference("alanine-dipeptide")
    p = ref["probabilities"]
    assert p.shape == (100, 100)
    assert p.sum() == pytest.approx(1.0)
    assert np.all(p > 0)
    assert M.kld_from_pmf(ref["free_energy_kT"], "alanine-dipeptide") == pytest.approx(0.0, abs=1e-10)
    pops = M.basin_populations(p)
    assert pops["beta_C7eq"] > pops["alpha_R"] > pops["phi_pos"] > 0


def test_reference_of_a_registered_system_and_of_an_npz(tmp_path):
    """A reference is data given by its system: a name resolves through the registry, an npz is read as is."""
    ref = M.as_reference("mueller-brown")
    assert ref["periodic"] == [False] and ref["probabilities"].shape == (100,)
    np.testing.assert_allclose(ref["edges"][0], mb.bin_edges())
    path = tmp_path / "ref.npz"
    np.savez(path, probabilities=ref["probabilities"], edges_0=ref["edges"][0], periodic=np.array([False]))
    again = M.load_reference("ignored", path=path)
    np.testing.assert_allclose(again["probabilities"], ref["probabilities"])
    assert M.kld_from_pmf(mb.reference_pmf(), str(path)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown system"):
        M.as_reference("no-such-system")
