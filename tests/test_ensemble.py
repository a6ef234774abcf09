"""PMF ensemble: accuracy against noisy labels of a known periodic function, uncertainty away from the data,
one batched computation for all models, and the pmf.pt export contract."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from openmm_cgflow_plugin.cgspace import CGSpace
from openmm_cgflow_plugin.pmf_file import FORMAT_VERSION

from openmm_cgflow.ensemble import PMFEnsemble, default_ranges, export_pmf
from openmm_cgflow.ensemble_fit import EnsembleFitSettings, fit_ensemble

SIGMA = 0.2   # label noise, kT


def f_true(s):
    """Known 2-D periodic function (kT) of (phi, psi) in radians."""
    return 2.0 * np.cos(s[:, 0] - 1.0) + np.sin(s[:, 1]) + 0.5 * np.cos(s[:, 0] + s[:, 1])


def _mean_spread(ens, s):
    with torch.no_grad():
        m, sd = ens.mean_and_spread(torch.as_tensor(s, dtype=torch.float64))
    return m.numpy(), sd.numpy()


@pytest.fixture(scope="module")
def half_torus_fit():
    """8 models fitted to 300 labels with Gaussian noise SIGMA, phi only in [-pi, 0) (psi everywhere)."""
    rng = np.random.default_rng(0)
    m = 300
    s = np.stack([rng.uniform(-math.pi, 0.0, m), rng.uniform(-math.pi, math.pi, m)], axis=1)
    A = f_true(s) + SIGMA * rng.standard_normal(m)
    ens = fit_ensemble(s, A, np.full(m, SIGMA), [True, True], n_models=8, hidden=(32, 32), steps=600, seed=0)
    return ens, s, A


def test_mean_error_within_the_noise(half_torus_fit):
    """Criterion: at 2,000 held-out points inside the training region (phi in [-pi + 0.3, -0.3]), the RMS error of
    the ensemble mean against the noise-free function (after removing the free constant) is <= SIGMA / 2: the
    fit averages the label noise instead of reproducing it (measured ~0.05-0.07 kT for SIGMA = 0.2 kT). And it
    does not interpolate the noise: its RMS deviation from the noisy labels is >= 0.6 SIGMA (measured ~0.9)."""
    ens, s, A = half_torus_fit
    rng = np.random.default_rng(1)
    test = np.stack([rng.uniform(-math.pi + 0.3, -0.3, 2000), rng.uniform(-math.pi, math.pi, 2000)], axis=1)
    mean, _ = _mean_spread(ens, test)
    err = mean - f_true(test)
    rms = float(np.sqrt(np.mean((err - err.mean()) ** 2)))
    assert rms <= SIGMA / 2, rms
    fit = _mean_spread(ens, s)[0]
    dev = fit - A
    assert float(np.sqrt(np.mean((dev - dev.mean()) ** 2))) >= 0.6 * SIGMA
    assert ens.fit_info["n_labels"] == 300 and ens.fit_info["n_dropped"] == 0
    # offset convention: the mean is 0 kT at the lowest training label
    assert abs(fit[int(np.argmin(A))]) < 1e-9


def test_spread_grows_away_from_the_data(half_torus_fit):
    """Spread at held-out far points (phi = pi/2, the middle of the unlabelled half) > 3x the spread at the
    training points (measured ~10x)."""
    ens, s, _ = half_torus_fit
    far = np.stack([np.full(400, math.pi / 2), np.linspace(-math.pi, math.pi, 400, endpoint=False)], axis=1)
    sd_train = _mean_spread(ens, s)[1].mean()
    sd_far = _mean_spread(ens, far)[1].mean()
    assert sd_far > 3 * sd_train, (sd_far, sd_train)
    assert np.all(np.isfinite(_mean_spread(ens, far)[0]))


def test_training_is_one_batched_computation(monkeypatch):
    """All models train in the same tensor operations: the number of batched matmuls (torch.baddbmm, one per
    layer per forward pass) does not depend on the number of models, and each carries every model."""
    calls = []
    real = torch.baddbmm

    def counting(bias, x, w, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return real(bias, x, w, *args, **kwargs)

    monkeypatch.setattr(torch, "baddbmm", counting)
    rng = np.random.default_rng(2)
    s = rng.uniform(-math.pi, math.pi, size=(64, 2))
    counts = {}
    for n_models in (1, 7):
        calls.clear()
        ens = fit_ensemble(s, f_true(s), None, [True, True], n_models=n_models, hidden=(8, 8), steps=20, seed=0)
        counts[n_models] = len(calls)
        assert set(calls) == {n_models}
        assert ens.layers[0].weight.shape == (n_models, 4, 8)   # [models, inputs (cos, sin) x 2, hidden]
    assert counts[1] == counts[7] >= 20 * 3


def test_models_differ_and_seed_reproduces():
    rng = np.random.default_rng(3)
    s = rng.uniform(-math.pi, math.pi, size=(80, 2))
    kw = dict(n_models=5, hidden=(16,), steps=100)
    a = fit_ensemble(s, f_true(s), None, [True, True], seed=4, **kw)
    b = fit_ensemble(s, f_true(s), None, [True, True], seed=4, **kw)
    c = fit_ensemble(s, f_true(s), None, [True, True], seed=5, **kw)
    x = torch.as_tensor(s)
    with torch.no_grad():
        assert torch.equal(a.predict_all(x), b.predict_all(x))
        assert not torch.equal(a.predict_all(x), c.predict_all(x))
        per_model = a.predict_all(x)
        assert per_model.shape == (5, 80) and float(per_model.std(dim=0).mean()) > 0


def test_export_round_trip(half_torus_fit, tmp_path):
    ens, s, _ = half_torus_fit
    path = export_pmf(ens, tmp_path / "sub" / "pmf.pt",
                      CGSpace(["phi", "psi"], [True, True], 300.0, [[4, 6, 8, 14], [6, 8, 14, 16]]), note="test")
    module = torch.jit.load(path)
    assert isinstance(module, torch.jit.ScriptModule)
    assert list(module.cg_names) == ["phi", "psi"]
    assert list(module.periodic) == [True, True]
    assert module.temperature == 300.0 and isinstance(module.temperature, float)
    assert [list(q) for q in module.cg_atoms] == [[4, 6, 8, 14], [6, 8, 14, 16]]
    meta = json.loads(module.metadata)
    assert meta["format_version"] == FORMAT_VERSION and meta["n_models"] == 8 and meta["note"] == "test"
    assert meta["energy_unit"] == "kT"
    x = torch.as_tensor(np.random.default_rng(4).uniform(-math.pi, math.pi, size=(50, 2)))
    with torch.no_grad():
        fwd = module(x)
        mean, spread = module.mean_and_spread(x)
        ref_mean, ref_spread = ens.mean_and_spread(x)
        assert fwd.shape == (50,) and fwd.dtype == torch.float64
        assert torch.equal(fwd, mean)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(spread, ref_spread, rtol=1e-12, atol=1e-12)
        assert bool((spread >= 0).all())
        out32 = module(x.float())
        m32, sd32 = module.mean_and_spread(x.float())
    assert out32.dtype == torch.float32 and m32.dtype == torch.float32 and sd32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), fwd, rtol=0, atol=1e-4)
    # per-model predictions are exported too, consistent with the spread (population std)
    with torch.no_grad():
        allm = module.model.predict_all(x)
    torch.testing.assert_close(allm.std(dim=0, unbiased=False), spread)
    # the plugin reads the same file
    from openmm_cgflow_plugin import load_pmf

    pmf = load_pmf(path, expected_cg=["phi", "psi"], temperature=300.0)
    np.testing.assert_allclose(pmf.mean(x.numpy()), fwd.numpy(), rtol=1e-12)
    assert pmf.metadata["note"] == "test"
    # nothing but the file is left in the folder (atomic write through a temp file)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["pmf.pt"]


def test_export_checks_metadata(half_torus_fit, tmp_path):
    ens, _, _ = half_torus_fit
    with pytest.raises(ValueError, match="periodic"):
        export_pmf(ens, tmp_path / "a.pt", CGSpace(["phi", "psi"], [True, False], 300.0))
    with pytest.raises(ValueError, match="cg_names"):
        export_pmf(ens, tmp_path / "a.pt", CGSpace(["phi"], [True], 300.0))
    with pytest.raises(ValueError, match="temperature"):
        export_pmf(ens, tmp_path / "a.pt", CGSpace(["phi", "psi"], [True, True], 0.0))
    with pytest.raises(ValueError, match="quadruple"):
        export_pmf(ens, tmp_path / "a.pt", CGSpace(["phi", "psi"], [True, True], 300.0, [[1, 2, 3]]))
    assert not list(tmp_path.iterdir())


def test_non_finite_labels_are_dropped_and_never_reach_the_file(tmp_path):
    rng = np.random.default_rng(6)
    s = rng.uniform(-math.pi, math.pi, size=(120, 2))
    A = f_true(s)
    kw = dict(n_models=4, hidden=(16, 16), steps=150, seed=2)
    clean = fit_ensemble(s, A, None, [True, True], **kw)
    s_bad = np.concatenate([s, rng.uniform(-math.pi, math.pi, size=(3, 2)), [[np.nan, 0.0]]])
    A_bad = np.concatenate([A, [np.inf, np.nan, -np.inf], [0.0]])
    with pytest.warns(RuntimeWarning, match="dropped 4 of 124 labels"):
        dirty = fit_ensemble(s_bad, A_bad, None, [True, True], **kw)
    assert dirty.fit_info["n_labels"] == 120 and dirty.fit_info["n_dropped"] == 4
    # identical to the fit that never saw them
    for (k, v1), (_, v2) in zip(clean.state_dict().items(), dirty.state_dict().items()):
        assert torch.equal(v1, v2), k
    path = export_pmf(dirty, tmp_path / "pmf.pt", CGSpace(["phi", "psi"], [True, True], 300.0))
    module = torch.jit.load(path)
    assert json.loads(module.metadata)["n_labels"] == 120
    grid = torch.as_tensor(np.stack(np.meshgrid(*[np.linspace(-math.pi, math.pi, 30)] * 2), -1).reshape(-1, 2))
    with torch.no_grad():
        m, sd = module.mean_and_spread(grid)
    assert bool(torch.isfinite(m).all()) and bool(torch.isfinite(sd).all())
    with pytest.raises(ValueError, match="no finite labels"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit_ensemble(s[:3], [np.inf, np.nan, np.inf], None, [True, True], steps=5)


def test_non_periodic_inputs_are_standardised():
    rng = np.random.default_rng(7)
    s = rng.uniform(-2.5, 1.1, size=(150, 1))
    A = 3.0 * (s[:, 0] + 0.7) ** 2
    ens = fit_ensemble(s, A, None, [False], n_models=4, hidden=(16, 16), steps=400, seed=0)
    assert isinstance(ens, PMFEnsemble) and ens.n_cg == 1
    assert float(ens.s_mean[0]) == pytest.approx(float(s.mean()))
    mean, _ = _mean_spread(ens, s)
    err = mean - A
    assert float(np.sqrt(np.mean((err - err.mean()) ** 2))) < 0.1 * float(A.std())


def test_fit_settings_object_equals_keyword_overrides():
    """The hyperparameters can be given as an EnsembleFitSettings or as keyword overrides: same ensemble."""
    rng = np.random.default_rng(8)
    s = rng.uniform(-math.pi, math.pi, size=(60, 2))
    a = fit_ensemble(s, f_true(s), None, [True, True], EnsembleFitSettings(n_models=3, hidden=(8,), steps=30), seed=1)
    b = fit_ensemble(s, f_true(s), None, [True, True], n_models=3, hidden=(8,), steps=30, seed=1)
    for (k, v1), (_, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v1, v2), k


def test_export_ranges_of_non_periodic_coordinates(tmp_path):
    """pmf.pt carries (lo, hi) per coordinate: [-pi, pi] for dihedrals, the labels' mean +- 3 std otherwise."""
    rng = np.random.default_rng(9)
    s = np.stack([rng.uniform(-math.pi, math.pi, 80), rng.uniform(-2.5, 1.1, 80)], axis=1)
    ens = fit_ensemble(s, np.cos(s[:, 0]) + s[:, 1] ** 2, None, [True, False], n_models=2, hidden=(8,), steps=20)
    lo, hi = default_ranges(ens)[1]
    assert lo == pytest.approx(s[:, 1].mean() - 3 * s[:, 1].std()) and hi == pytest.approx(s[:, 1].mean() + 3 * s[:, 1].std())
    module = torch.jit.load(export_pmf(ens, tmp_path / "pmf.pt", CGSpace(["phi", "x"], [True, False], 300.0)))
    assert [list(r) for r in module.cg_ranges] == [[-math.pi, math.pi], [lo, hi]]


def _importance_labels(A_true, sigma, n_samples, rng):
    """Labels as the learner draws them: A = -log mean(w) (kT) of ``n_samples`` log-normal importance weights
    with E[w] = exp(-A_true) and log-weight spread ``sigma`` [M] (ESS/N ~ exp(-sigma^2))."""
    log_w = (-A_true - 0.5 * sigma**2)[:, None] + sigma[:, None] * rng.standard_normal((len(A_true), n_samples))
    top = log_w.max(axis=1, keepdims=True)
    return -(np.log(np.exp(log_w - top).mean(axis=1)) + top[:, 0])


def test_exp_loss_removes_the_bias_of_heavy_tailed_importance_labels():
    """Criterion: labels are -log of unbiased importance-sampling estimates of exp(-A) (64 samples each) whose
    log-weight spread grows from 1.0 to 2.2 across CG space (ESS/N 0.37 -> 0.008, as a flow that is good in one
    basin and poor in another). The squared loss fits the mean of -log Z_hat, whose upward Jensen bias follows
    the spread and bends the PMF; the exp-linear loss averages in exp(-A), where the estimates are unbiased. Equal
    label weights, so only the losses differ. The exp fit must be within 0.1 kT RMS of the truth and at most
    0.8x the squared fit's error (measured over data seeds 3-5: squared 0.062-0.120 kT, exp 0.045-0.073 kT,
    ratio 0.54-0.74)."""
    rng = np.random.default_rng(4)
    m = 800
    s = rng.uniform(-math.pi, math.pi, (m, 1))
    sigma = 1.6 + 0.6 * np.sin(s[:, 0])
    A = _importance_labels(np.cos(s[:, 0]), sigma, 64, rng)
    grid = np.linspace(-math.pi, math.pi, 200, endpoint=False)[:, None]
    rms = {}
    for loss in ("squared", "exp"):
        ens = fit_ensemble(s, A, None, [True], n_models=4, hidden=(32, 32), steps=1500, seed=0, loss=loss)
        err = _mean_spread(ens, grid)[0] - np.cos(grid[:, 0])
        rms[loss] = float(np.sqrt(np.mean((err - err.mean()) ** 2)))
        assert ens.fit_info["loss"] == loss
    assert rms["exp"] <= 0.8 * rms["squared"], rms
    assert rms["exp"] <= 0.1, rms


def test_fit_refuses_an_unknown_loss():
    s = np.zeros((4, 1))
    with pytest.raises(ValueError, match="loss must be one of"):
        fit_ensemble(s, np.zeros(4), None, [True], steps=2, loss="absolute")


def test_written_out_squared_loss_gradient_equals_autograd_bit_for_bit():
    """The squared loss's gradient written out in ensemble_fit equals autograd's for the same expression, bit for
    bit, in float32 and float64 and for any batch size (so the fit's numbers do not depend on how it is computed)."""
    from openmm_cgflow.ensemble_fit import _squared_loss_grad

    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        for n_models, batch in ((1, 1), (10, 150), (7, 513)):
            pred = torch.randn(n_models, batch, generator=gen, dtype=dtype).requires_grad_()
            y = torch.randn(batch, generator=gen, dtype=dtype)
            w = torch.rand(n_models, batch, generator=gen, dtype=dtype) * 3
            loss = (w * (pred - y) ** 2).mean(dim=1).sum()
            (expected,) = torch.autograd.grad(loss, pred)
            written = _squared_loss_grad(pred.detach(), y, w)
            assert torch.equal(written, expected), (dtype, n_models, batch)


@pytest.mark.parametrize("case", ["1-d", "torus-minibatches", "exp-loss", "float64-decay-classic"])
def test_fit_equals_the_same_fit_through_autograd(case, monkeypatch):
    """fit_ensemble's written-out backward pass through the stacked layers gives the same ensemble, bit for bit, as
    the same fit with autograd differentiating ``PMFEnsemble.networks`` (benchmarks/fit_speed.py's
    AutogradTraining): one-dimensional and periodic inputs, mini-batches, the exp-linear loss, float64 with weight
    decay."""
    import os
    import sys

    from openmm_cgflow import ensemble_fit

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from fit_speed import AutogradTraining  # noqa: E402

    rng = np.random.default_rng(17)
    kw = {"1-d": dict(periodic=[False], m=120, n_models=10, hidden=(32, 32), steps=300),
          "torus-minibatches": dict(periodic=[True, True], m=300, n_models=4, hidden=(16, 16), steps=60,
                                    batch_size=128),
          "exp-loss": dict(periodic=[True], m=200, n_models=5, hidden=(16, 16, 8), steps=200, loss="exp"),
          "float64-decay-classic": dict(periodic=[True, False], m=90, n_models=3, hidden=(8,), steps=150,
                                        dtype=torch.float64, weight_decay=1e-3, bootstrap="classic")}[case]
    periodic, m = kw.pop("periodic"), kw.pop("m")
    s = rng.uniform(-3.0, 3.0, (m, len(periodic)))
    A = 2.0 * np.sin(s).sum(axis=1) + 0.3 * rng.standard_normal(m)
    se = rng.uniform(0.02, 0.3, m)
    written = fit_ensemble(s, A, se, periodic, seed=2, **kw)
    monkeypatch.setattr(ensemble_fit, "_FlatStackedTraining", AutogradTraining)
    autograd = fit_ensemble(s, A, se, periodic, seed=2, **kw)
    x = torch.as_tensor(s)
    with torch.no_grad():
        assert torch.equal(written.predict_all(x), autograd.predict_all(x))
        assert float(written.predict_all(x).std(dim=0).mean()) > 0   # a real, diverse fit
