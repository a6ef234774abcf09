"""Active learning end to end on Mueller-Brown (real OpenMM energies, real TorchForce walkers), the CLI's
input checks, crash/resume (SIGKILL) repeatability, reporters and the run directory's atomic writes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from openmm_cgflow import LearnerSettings, PMFLearner
import openmm_cgflow.learner as learner_module
from openmm_cgflow.exploration import farthest_points, neighbourhood, periodic_distance, populated_starts
from openmm_cgflow.mueller_brown import bin_centres as mb_bin_centres
from openmm_cgflow.run_directory import RunDirectory
from openmm_cgflow.settings import SettingsError

SEED = 3
CLI = [sys.executable, "-m", "openmm_cgflow.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run_cli(*args, timeout=300):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=ENV)


def _pmf_on_grid(run_dir, name="pmf.pt"):
    from openmm_cgflow_plugin import load_pmf

    pmf = load_pmf(os.path.join(run_dir, name))
    return np.asarray(pmf.mean_and_spread(mb_bin_centres()[:, None])[0])


def _records(run_dir):
    with open(os.path.join(run_dir, "iterations.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def mb_run(tmp_path_factory):
    """An uninterrupted seeded Mueller-Brown run through the CLI, from the upper-left basin only."""
    out = tmp_path_factory.mktemp("mb") / "run"
    t0 = time.perf_counter()
    res = _run_cli("run", "mueller-brown", "--out", str(out), "--seed", str(SEED), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    return out, time.perf_counter() - t0, res.stdout


def test_mueller_brown_stops_by_itself_with_small_kld(mb_run):
    out, wall, stdout = mb_run
    recs = _records(out)
    assert recs[-1]["converged"], stdout
    assert recs[-1]["uncertain_found"] == 0
    # started in the upper-left basin (s = x - y = -2.0) only ...
    first = recs[0]
    assert first["iteration"] == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert np.all(np.abs(ck["points"][: first["new_points"], 0] + 2.0) <= 0.25 + 1e-9)
    # ... and found the whole PMF: forward KLD to the quadrature PMF on 100 bins of [-2.5, 1.1]
    assert recs[-1]["kld"] <= 1e-3, [r["kld"] for r in recs]
    assert ck["points"][:, 0].max() > 0.4  # reached the lower-right basin (s ~ 0.6)
    for key in ("energy_evaluations", "cg_points", "max_spread_kT", "mean_spread_kT", "mean_ess", "wall_s",
                "phase_s", "train_cpu_load", "relabel_ess_ratio"):
        assert key in recs[-1]
    # the reference-free convergence signal: none in the first iteration, then a finite change in kT
    assert recs[0]["pmf_change_kT"] is None
    assert all(np.isfinite(r["pmf_change_kT"]) and r["pmf_change_kT"] >= 0 for r in recs[1:])
    assert set(recs[-1]["phase_s"]) == {"train", "label", "fit", "explore"}
    assert sum(recs[-1]["phase_s"].values()) <= recs[-1]["wall_s"] - recs[-2]["wall_s"] + 1e-3
    assert (out / "pmf.pt").exists() and (out / "flow.pt").exists()
    assert any(p.suffix == ".png" for p in (out / "plots").iterdir())
    print(f"Mueller-Brown active learning: {len(recs)} iterations, {recs[-1]['energy_evaluations']} evaluations, "
          f"KLD {recs[-1]['kld']:.2e}, {wall:.0f} s")


def test_sigkill_mid_iteration_then_resume_gives_the_same_pmf(mb_run, tmp_path):
    """SIGKILL inside the second iteration, resume: the PMF after two iterations is the uninterrupted run's."""
    reference_out = mb_run[0]
    out = tmp_path / "killed"
    args = ["run", "mueller-brown", "--out", str(out), "--seed", str(SEED), "--quiet", "--max-iterations", "2"]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 240
        while not (out / "iterations.jsonl").exists():  # first iteration finished
            assert proc.poll() is None, "run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(1.5)  # well inside the second iteration
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(_records(out)) == 1, "the kill came too late to interrupt the second iteration"
    res = _run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout
    a = _pmf_on_grid(out)
    b = _pmf_on_grid(reference_out, "pmfs/pmf_001.pt")  # the uninterrupted run after its second iteration
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    ra, rb = _records(out), _records(reference_out)[:2]
    assert [r["energy_evaluations"] for r in ra] == [r["energy_evaluations"] for r in rb]
    assert [r["kld"] for r in ra] == [r["kld"] for r in rb]


@pytest.mark.parametrize("args, message", [
    (["run", "no-such-molecule", "--out", "{tmp}/x"], "unknown system"),
    (["run", "mueller-brown", "--out", "{tmp}/x", "--threshold", "0"], "threshold"),
    (["run", "mueller-brown", "--out", "{tmp}/x", "--threshold", "-1"], "threshold"),
    (["run", "{tmp}/missing.toml", "--out", "{tmp}/x"], "not found"),
    (["run", "mueller-brown", "--out", "/proc/forbidden/run"], "output directory"),
    (["backmap", "{tmp}/no-run", "{tmp}/cg.npy", "-o", "{tmp}/out.dcd"], "not found"),
])
def test_bad_input_fails_fast_with_a_clear_error(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    t0 = time.perf_counter()
    res = _run_cli(*args, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
    assert time.perf_counter() - t0 < 60


def test_bad_config_file_keys(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[system]\nbuiltin = "mueller-brown"\n[settings]\nthreshold = 0.3\n')
    res = _run_cli("run", str(cfg), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "unknown setting" in res.stderr
    cfg.write_text('[system]\npdb = "nothere.pdb"\ncg = ["phi:ALA", "psi:ALA"]\n')
    res = _run_cli("run", str(cfg), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "nothere.pdb" in res.stderr


class _NaNAbove:
    """Energy object that returns NaN energies for configurations with x > x_max (a broken force field)."""

    def __init__(self, bridge, x_max):
        self.bridge, self.x_max = bridge, x_max

    @property
    def n_evaluations(self):
        return self.bridge.n_evaluations

    def energy(self, x):
        u = self.bridge.energy(x)
        return torch.where(x[:, 0, 0] > self.x_max, torch.full_like(u, float("nan")), u)

    def close(self):
        self.bridge.close()


def test_nan_energies_never_reach_labels_or_the_exported_pmf(tmp_path, mb):
    st = LearnerSettings.for_system(mb, first_epochs=20, max_iterations=1, seed=0, n_workers=0)
    learner = PMFLearner(mb, tmp_path / "run", st, progress=False, plots=False)
    learner._bridge = _NaNAbove(learner.bridge, x_max=-0.6)  # about half of each flow sample set is NaN
    learner.pending = learner.initial_points()
    rec = learner.step(explore=False)
    assert np.all(np.isfinite(learner.labels["A"])) and np.all(np.isfinite(learner.labels["stderr"]))
    assert rec["mean_ess"] < 1.0
    mean = _pmf_on_grid(tmp_path / "run")
    assert np.all(np.isfinite(mean))
    for p in learner.flow.parameters():
        assert torch.isfinite(p).all()


def test_point_selection_is_periodic():
    rng = np.random.default_rng(0)
    a, b = np.array([3.1, 0.0]), np.array([-3.1, 0.0])
    assert periodic_distance(a, b, [True, True]) == pytest.approx(2 * np.pi - 6.2)
    assert periodic_distance(a, b, [False, True]) == pytest.approx(6.2)
    pts = np.array([[3.1, 0.0], [-3.1, 0.0], [0.0, 0.0]])  # the first two are neighbours on the torus
    idx = farthest_points(pts, 2, [True, True], rng, existing=np.array([[3.0, 0.0]]))
    assert 2 in idx
    nb = neighbourhood(np.array([[3.0, -3.0]]), 500, 0.6, [True, True], rng)
    assert np.all(nb >= -np.pi) and np.all(nb < np.pi)
    assert np.all(periodic_distance(nb, np.array([3.0, -3.0]), [True, True]) <= 0.6 + 1e-12)


def test_populated_starts_are_drawn_by_exp_minus_A():
    pts = np.array([[0.0], [1.0], [2.0], [3.0]])
    A = np.array([5.0, 6.0, 7.0, np.inf])  # kT; a point without a finite label is never a start
    s = populated_starts(pts, A, 200_000, np.random.default_rng(0))
    freq = np.bincount(s[:, 0].astype(int), minlength=4) / len(s)
    expected = np.exp(-np.array([0.0, 1.0, 2.0]))
    np.testing.assert_allclose(freq[:3], expected / expected.sum(), atol=0.005)
    assert freq[3] == 0.0
    with pytest.raises(ValueError, match="3 free energies"):
        populated_starts(pts, A[:3], 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no point has a finite free energy"):
        populated_starts(pts, np.full(4, np.nan), 5, np.random.default_rng(0))


def test_walkers_start_from_the_newest_points_or_from_the_populated_labels(tmp_path, mb, monkeypatch):
    """The learner hands the walkers the points labelled last ("newest") or labelled points drawn by exp(-A) of
    the ensemble it has just fitted ("populated"); the real search runs either way."""
    calls = []
    real_explore, real_find = PMFLearner._explore, learner_module.find_uncertain

    def explore(self, rng, pmf_path):
        newest = self.points[-len(self.pending):] if self.pending is not None else self.points
        calls.append({"labelled": self.label_s.copy(), "newest": newest.copy(), "learner": self})
        return real_explore(self, rng, pmf_path)

    def find(pmf_path, starts, settings, *args):
        calls[-1]["starts"] = np.array(starts)
        calls[-1]["A_labelled"] = calls[-1]["learner"].mean_and_spread(calls[-1]["labelled"])[0]
        calls[-1]["A_starts"] = calls[-1]["learner"].mean_and_spread(calls[-1]["starts"])[0]
        return real_find(pmf_path, starts, settings, *args)

    monkeypatch.setattr(PMFLearner, "_explore", explore)
    monkeypatch.setattr(learner_module, "find_uncertain", find)
    for mode in ("newest", "populated"):
        calls.clear()
        st = LearnerSettings.for_system(mb, first_epochs=5, epochs=3, max_iterations=3, n_workers=0, seed=1,
                                        walker_steps=200, n_walkers=40, fit_steps=300, walker_starts=mode,
                                        threshold_kT=0.01)
        PMFLearner(mb, tmp_path / mode, st, progress=False, plots=False).run()
        assert len(calls) >= 2
        for c in calls:
            in_labels = [np.any(np.all(c["labelled"] == s, axis=1)) for s in c["starts"]]
            assert all(in_labels)
            if mode == "newest":
                np.testing.assert_array_equal(c["starts"], c["newest"])
            else:
                assert len(c["starts"]) == st.n_walkers
        if mode == "populated":  # drawn towards the low free energies of the labelled points
            late = calls[-1]
            assert np.mean(late["A_starts"]) < np.mean(late["A_labelled"]) - 0.5
    with pytest.raises(SettingsError, match="walker_starts must be one of"):
        LearnerSettings.for_system(mb, walker_starts="popular").validate(mb)


class _Recorder:
    """A user's reporter: keeps every record it is given."""

    def __init__(self):
        self.records, self.closed = [], 0

    def report(self, learner, record):
        assert learner.history[-1] is record  # reported after the iteration is complete
        assert os.path.exists(learner.checkpoint_path)
        self.records.append(dict(record))

    def close(self):
        self.closed += 1


def test_a_user_reporter_receives_every_iteration_record(tmp_path, mb):
    rec = _Recorder()
    st = LearnerSettings.for_system(mb, first_epochs=5, epochs=3, max_iterations=2, n_workers=0, seed=1,
                                    walker_steps=200, n_walkers=10)
    learner = PMFLearner(mb, tmp_path / "run", st, progress=False, plots=False, reporters=[rec])
    learner.run()
    assert [r["iteration"] for r in rec.records] == list(range(learner.iteration)) and len(rec.records) >= 1
    assert rec.records == _records(tmp_path / "run") == learner.history
    assert rec.closed >= 1
    assert not (tmp_path / "run" / "plots").exists()


def test_run_directory_writes_are_atomic(tmp_path):
    """A write that fails half-way leaves the previous file intact and no temporary file behind."""
    run = RunDirectory(tmp_path / "run")
    run.write_iterations([{"iteration": 0}])
    run.save_checkpoint({"iteration": 1, "points": np.zeros((2, 1))})
    before = sorted(os.listdir(run.path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run.save_checkpoint({"iteration": 2, "bad": Boom()})
    assert run.load_checkpoint()["iteration"] == 1

    def half(fh):
        fh.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run.write_bytes(run.pmf_path, half)
    assert not os.path.exists(run.pmf_path)
    assert sorted(os.listdir(run.path)) == before
    assert run.read_iterations() == [{"iteration": 0}]
    with open(run.checkpoint_path, "wb") as fh:
        fh.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        run.load_checkpoint()


def test_a_degraded_flow_is_trained_again_and_cannot_overwrite_good_labels(tmp_path, mb):
    """The guard against an iteration that makes the flow worse where it had learned (the relabelled points'
    ESS falls below half of their earlier labels'): after one iteration, the earlier labels' ESS is set
    impossibly high (as if an excellent flow had made them), so every relabel looks degraded. The second
    iteration is trained again from the previous flow at half the learning rate, and the replayed points
    keep their earlier labels."""
    st = LearnerSettings.for_system(mb, first_epochs=5, epochs=3, max_iterations=2, n_workers=0, seed=1,
                                    walker_steps=200, n_walkers=10, points_per_centre=40)  # >= 12 replayed points
    learner = PMFLearner(mb, tmp_path / "run", st, progress=False, plots=False)
    learner.pending = learner.initial_points()
    learner.step()
    assert learner.pending is not None
    learner.labels["ess"][:] = 1e6
    kept = {k: v.copy() for k, v in learner.labels.items()}
    flow_before = {k: v.clone() for k, v in learner.flow.state_dict().items()}
    state = learner._flow_state()
    rec = learner.step()
    assert rec["relabel_ess_ratio"] < 0.5
    assert rec["retrained"] == 1 and rec["lr_scale"] == 0.5 and rec["relabelled"] == 0
    n_old = len(kept["A"])
    for key in ("A", "stderr", "ess", "iteration"):
        np.testing.assert_array_equal(learner.labels[key][:n_old], kept[key])
    assert len(learner.labels["A"]) > n_old  # the new points were labelled
    # restoring a saved state gives back exactly the flow it saved
    learner._restore_flow_state(state)
    for k, v in learner.flow.state_dict().items():
        assert torch.equal(v, flow_before[k])
    learner.close()
    assert RunDirectory(tmp_path / "run").load_checkpoint()["lr_scale"] == 0.5


def test_a_run_that_stops_by_itself_ends_with_the_final_fit_loss(tmp_path, mb):
    """The loop fits with ``fit_loss`` ("squared"); the PMF published when the run stops by itself (here by the
    change rule after two iterations) is the ensemble refitted with ``final_fit_loss`` ("exp"): pmf.pt and its
    snapshot are that ensemble, and the record says so. A run stopped by a budget keeps the loop's fit."""
    st = LearnerSettings.for_system(mb, first_epochs=5, epochs=3, max_iterations=3, n_workers=0, seed=1,
                                    walker_steps=200, n_walkers=10, fit_steps=300, change_tolerance_kT=1e3,
                                    change_patience=1, final_fit_loss="exp")
    learner = PMFLearner(mb, tmp_path / "run", st, progress=False, plots=False)
    learner.run()
    recs = _records(tmp_path / "run")
    assert recs[-1]["converged"] and recs[-1]["final_fit_loss"] == "exp" and "final_fit" in recs[-1]["phase_s"]
    assert all("final_fit_loss" not in r for r in recs[:-1])
    assert learner.ensemble.fit_info["loss"] == "exp"
    with torch.no_grad():
        mine = learner.ensemble(torch.as_tensor(mb_bin_centres()[:, None])).numpy()
    k = recs[-1]["iteration"]
    for name in ("pmf.pt", f"pmfs/pmf_{k:03d}.pt"):
        np.testing.assert_allclose(_pmf_on_grid(tmp_path / "run", name), mine, atol=1e-6)

    budget = LearnerSettings.for_system(mb, first_epochs=5, epochs=3, max_iterations=1, n_workers=0, seed=1,
                                        walker_steps=200, n_walkers=10, fit_steps=300, final_fit_loss="exp")
    other = PMFLearner(mb, tmp_path / "budget", budget, progress=False, plots=False)
    other.run()
    assert other.ensemble.fit_info["loss"] == "squared"
    assert "final_fit_loss" not in _records(tmp_path / "budget")[-1]

    # final_fit_steps alone also refits (the labels fit in one batch: an epoch is one Adam step)
    longer = LearnerSettings.for_system(mb, first_epochs=5, epochs=3, max_iterations=3, n_workers=0, seed=1,
                                        walker_steps=200, n_walkers=10, fit_steps=300, change_tolerance_kT=1e3,
                                        change_patience=1, final_fit_steps=700)
    third = PMFLearner(mb, tmp_path / "longer", longer, progress=False, plots=False)
    third.run()
    assert third.ensemble.fit_info["epochs"] == 700 and third.ensemble.fit_info["loss"] == "squared"
    assert _records(tmp_path / "longer")[-1]["final_fit_loss"] == "squared"


def _polish_run(path, mb, **polish):
    st = LearnerSettings.for_system(mb, first_epochs=5, epochs=3, max_iterations=3, n_workers=0, seed=1,
                                    walker_steps=200, n_walkers=10, fit_steps=300, change_tolerance_kT=1e3,
                                    change_patience=1, **polish)
    learner = PMFLearner(mb, path, st, progress=False, plots=False)
    learner.run()
    return learner, _records(path), RunDirectory(path).load_checkpoint()


def test_a_run_that_ends_at_its_budget_is_polished_only_with_polish_at_budget(tmp_path, mb):
    """With ``polish_at_budget`` the iteration that exhausts the iteration budget polishes and refits (the same
    record fields and evaluation count as a polish at a stop by itself); without it, that run ends unpolished
    and its loop is the same as the polished one's up to the polish."""
    common = dict(first_epochs=5, epochs=3, max_iterations=2, n_workers=0, seed=1, walker_steps=200, n_walkers=10,
                  fit_steps=300, polish_epochs=20, polish_window_kT=3.0, polish_max_points=12, polish_samples=300,
                  polish_lr=3e-3)
    runs = {}
    for name, at_budget in (("kept", False), ("polished", True)):
        st = LearnerSettings.for_system(mb, polish_at_budget=at_budget, **common)
        PMFLearner(mb, tmp_path / name, st, progress=False, plots=False).run()
        runs[name] = _records(tmp_path / name)
    kept, polished = runs["kept"][-1], runs["polished"][-1]
    assert len(runs["kept"]) == len(runs["polished"]) == 2 and not polished["converged"]
    assert "polish_points" not in kept and "polish" not in kept["phase_s"]
    n = polished["polish_points"]
    assert 0 < n <= 12 and "polish" in polished["phase_s"] and polished["final_fit_loss"] == "squared"
    per_point = 20 * LearnerSettings.for_system(mb, **common).samples_per_point + 300
    assert polished["energy_evaluations"] - kept["energy_evaluations"] == n * per_point
    for key in ("energy_evaluations", "mean_ess", "max_spread_kT"):  # the same loop up to the polish
        assert runs["kept"][0][key] == runs["polished"][0][key]
    assert kept["cg_points"] == polished["cg_points"] and kept["mean_ess"] == polished["mean_ess"]
    with pytest.raises(SettingsError, match="polish_at_budget must be true or false"):
        LearnerSettings.for_system(mb, polish_at_budget="yes").validate(mb)


def test_a_run_that_stops_by_itself_is_polished_and_a_harmful_polish_is_undone(tmp_path, mb, monkeypatch):
    """The polish trains the flow at the populated labels and labels them again: against the same run without a
    polish, exactly the polished labels (the lowest of the fitted PMF) changed, the extra evaluations are
    n x (epochs x samples_per_point + polish_samples), and pmf.pt is the refit. A polish that lowers the labels'
    ESS or leaves the flow non-finite is undone."""
    plain, plain_recs, plain_ck = _polish_run(tmp_path / "plain", mb)
    polish = dict(polish_epochs=20, polish_window_kT=3.0, polish_max_points=12, polish_samples=300, polish_lr=3e-3)
    learner, recs, ck = _polish_run(tmp_path / "polished", mb, **polish)
    rec, k = recs[-1], recs[-1]["iteration"]
    assert rec["converged"] and "polish" in rec["phase_s"] and len(recs) == len(plain_recs)
    n = rec["polish_points"]
    assert 0 < n <= 12
    per_point = 20 * learner.settings.samples_per_point + 300
    assert rec["energy_evaluations"] - plain_recs[-1]["energy_evaluations"] == n * per_point
    # this flow, trained only 5 + 3 epochs, gains ESS where it is polished: the new labels are kept
    assert rec["polish_ess_ratio"] >= 1.0 and rec["polished_labels"] == n and rec["final_fit_loss"] == "squared"
    changed = np.flatnonzero(ck["labels"]["A"] != plain_ck["labels"]["A"])
    assert len(changed) == n
    np.testing.assert_array_equal(ck["labels"]["iteration"][changed], k)
    np.testing.assert_allclose(np.mean(ck["labels"]["ess"][changed]), rec["polish_ess_after"], rtol=1e-9)
    # the polished points are the lowest of the plain run's final PMF at the labels
    with torch.no_grad():
        plain_at_labels = plain.ensemble(torch.as_tensor(plain_ck["label_s"])).numpy()
    lowest = np.argsort(plain_at_labels)[:n]
    assert set(changed) == set(lowest)
    with torch.no_grad():
        mine = learner.ensemble(torch.as_tensor(mb_bin_centres()[:, None])).numpy()
    np.testing.assert_allclose(_pmf_on_grid(tmp_path / "polished"), mine, atol=1e-6)

    # A polish that harms the flow (its training is followed here by a perturbation of the flow's parameters:
    # noise, or a NaN) is undone: flow, labels and PMF are exactly those of the plain run.
    from openmm_cgflow.training import Trainer

    train = Trainer.train_by_energy
    for harm in ("noise", "nan"):
        def harmful(self, s_points, epochs, *args, **kwargs):
            logs = train(self, s_points, epochs, *args, **kwargs)
            if epochs == polish["polish_epochs"]:  # the polish (the loop trains 5 and 3 epochs)
                gen = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in self.flow.parameters():
                        if harm == "noise":
                            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
                        else:
                            p.fill_(np.nan)
            return logs

        monkeypatch.setattr(Trainer, "train_by_energy", harmful)
        _, harmed_recs, harmed_ck = _polish_run(tmp_path / harm, mb, **polish)
        rec = harmed_recs[-1]
        assert rec["polish_ess_ratio"] < 1.0 and rec["polished_labels"] == 0 and "final_fit_loss" not in rec, harm
        for key in ("A", "stderr", "ess", "iteration"):
            np.testing.assert_array_equal(harmed_ck["labels"][key], plain_ck["labels"][key])
        for name, value in plain_ck["flow_state"].items():
            assert torch.equal(harmed_ck["flow_state"][name], value), name
        np.testing.assert_allclose(_pmf_on_grid(tmp_path / harm), _pmf_on_grid(tmp_path / "plain"), atol=1e-9)
