"""Run-directory safety with real processes (issue #12): a folder of another run is refused, a live run's
folder is locked, crafted pickles are refused without running, workers import nothing from the working
directory, nothing non-finite is exported, and a kill at any file write of an iteration resumes to the
same PMF in a consistent, temp-free folder. Mueller-Brown with tiny settings throughout."""

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
from openmm_cgflow.run_directory import CHECKPOINT_FORMAT, RunDirectoryError, RunLockedError, sha256_file
from openmm_cgflow.safe_files import UnsafeFileError, load_plain
from openmm_cgflow_plugin.files import TEMP_PREFIX

CLI = [sys.executable, "-m", "openmm_cgflow.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
TINY = dict(first_epochs=5, epochs=3, n_workers=0, seed=1, walker_steps=200, n_walkers=10, label_samples=100,
            n_models=3)


def _cli(*args, cwd=None, timeout=120):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=cwd)


def _tiny(mb, **over):
    return LearnerSettings.for_system(mb, **{**TINY, **over})


def _bytes(folder, names=("pmf.pt", "flow.pt", "checkpoint.pt", "iterations.jsonl")):
    return {n: (folder / n).read_bytes() for n in names if (folder / n).exists()}


def _temp_files(folder):
    return [os.path.join(root, n) for root, _, files in os.walk(folder) for n in files if n.startswith(TEMP_PREFIX)]


# ---------------------------------------------------------------------------------------------- the folder
def test_a_run_refuses_a_folder_holding_another_runs_results(tmp_path, mb):
    out = tmp_path / "ala2"
    out.mkdir()
    for name in ("pmf.pt", "flow.pt", "iterations.jsonl"):  # a copied result, its checkpoint deleted
        (out / name).write_bytes(b"another run's " + name.encode())
    before = _bytes(out)
    res = _cli("run", "mueller-brown", "--out", out, "--quiet")  # a real process through the CLI
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "was not created by this run and is not empty" in res.stderr
    assert "flow.pt, iterations.jsonl, pmf.pt" in res.stderr and "another run's results" in res.stderr
    assert "overwrite" in res.stderr and "Traceback" not in res.stderr
    assert _bytes(out) == before and sorted(os.listdir(out)) == [".lock", "flow.pt", "iterations.jsonl", "pmf.pt"]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match=r"holds notes.txt \(files that are not an openmm-cgflow run's\)"):
        PMFLearner(mb, other, _tiny(mb), progress=False, plots=False)

    # marked as a run of another system
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "run.json").write_text(json.dumps({"format": "openmm-cgflow-run/1", "system": "alanine-dipeptide"}))
    with pytest.raises(RunDirectoryError, match="holds a run of system 'alanine-dipeptide' \\(run.json\\), not 'mueller-brown'"):
        PMFLearner(mb, marked, _tiny(mb), progress=False, plots=False)
    # this system's marker, results but no checkpoint (the user deleted a corrupt one)
    (marked / "run.json").write_text(json.dumps({"format": "openmm-cgflow-run/1", "system": "mueller-brown"}))
    (marked / "pmf.pt").write_bytes(b"result")
    with pytest.raises(RunDirectoryError, match=r"holds results \(pmf.pt\) but no checkpoint.pt to resume from"):
        PMFLearner(mb, marked, _tiny(mb), progress=False, plots=False)

    # overwrite=True deletes the run files only; other files stay
    (out / "notes.txt").write_text("keep me")
    learner = PMFLearner(mb, out, _tiny(mb), progress=False, plots=False, overwrite=True)
    assert sorted(os.listdir(out)) == [".lock", "notes.txt", "run.json"]
    assert json.loads((out / "run.json").read_text())["system"] == "mueller-brown"
    learner.close()


LONG_RUN = """
[system]
builtin = "mueller-brown"
[settings]
first_epochs = 400
epochs = 400
n_workers = 0
max_iterations = 50
"""


def test_a_second_run_on_a_live_runs_folder_is_refused(tmp_path, mb):
    cfg = tmp_path / "long.toml"
    cfg.write_text(LONG_RUN)
    out = tmp_path / "run"
    first = subprocess.Popen(CLI + ["run", str(cfg), "--out", str(out), "--quiet", "--no-plots"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.time() + 60
        while True:  # until the first run holds the lock (it writes its PID into the lock file)
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the first run never took the lock"
            try:
                if json.loads((out / ".lock").read_text() or "{}").get("pid") == first.pid and (out / "run.json").exists():
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # alive, holding the lock, but leaving the cores to the checks
        res = _cli("run", cfg, "--out", out, "--quiet", "--no-plots")
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert f"is in use by another live run (PID {first.pid}" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        with pytest.raises(RunLockedError, match=f"PID {first.pid}"):  # the Python API in this process too
            PMFLearner(mb, out, LearnerSettings.for_system(mb, first_epochs=400, epochs=400, n_workers=0,
                                                          max_iterations=50), progress=False, plots=False)
        assert first.poll() is None  # the first run was not disturbed
        os.kill(first.pid, signal.SIGCONT)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # the OS released the dead run's lock: the folder can be taken again (here: nothing committed yet)
    learner = PMFLearner(mb, out, LearnerSettings.for_system(mb, first_epochs=400, epochs=400, n_workers=0,
                                                            max_iterations=50), progress=False, plots=False)
    assert learner.run_directory.locked
    learner.close()
    assert not learner.run_directory.locked


# ---------------------------------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling this creates the file ``path``: a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_checkpoint_and_flow_are_refused_without_running_them(tmp_path, mb):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "iteration": 1, "x": _Payload(marker)}, run / "checkpoint.pt")
    torch.save({"format": "openmm-cgflow-model/1", "system": _Payload(marker)}, run / "flow.pt")
    np.save(tmp_path / "cg.npy", np.array([[-1.5], [-1.0], [0.5]]))

    res = _cli("run", "mueller-brown", "--out", run, "--quiet")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert f"checkpoint {run / 'checkpoint.pt'} cannot be loaded safely" in res.stderr, res.stderr
    assert "python -m openmm_cgflow.safe_files" in res.stderr and "Traceback" not in res.stderr
    res = _cli("backmap", run, tmp_path / "cg.npy", "-o", tmp_path / "out.pdb", "--quiet")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert f"model file {run / 'flow.pt'} cannot be loaded safely" in res.stderr, res.stderr
    assert not marker.exists()

    from openmm_cgflow.model_io import load_model

    with pytest.raises(UnsafeFileError, match="cannot be loaded safely"):
        load_model(run)
    with pytest.raises(UnsafeFileError, match="cannot be loaded safely"):
        PMFLearner.from_run(run)
    assert not marker.exists()
    torch.load(run / "flow.pt", weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


DECOY = "open({marker!r}, 'a').write(__name__ + ' imported from the working directory\\n')\n"

WORKER_SCRIPT = """
import numpy as np, sys
from openmm_cgflow import builtin
from openmm_cgflow.bridge import EnergyBridge
mb = builtin("mueller-brown")
bridge = EnergyBridge(mb.system, mb.temperature, n_workers=2)
x = np.random.default_rng(0).normal(size=(200, 1, 3)) * 0.3
e, f, fin = bridge.energy_and_forces(x)
ok = bridge.n_workers == 2 and len(bridge.executor.pids) == 2 and np.isfinite(np.asarray(e)).all()
bridge.close()
print("workers ok" if ok else "workers missing")
"""


def test_energy_workers_import_nothing_from_the_working_directory(tmp_path):
    cwd = tmp_path / "cwd"
    marker = tmp_path / "imported.txt"
    for name in ("openmm_cgflow", "openmm", "numpy"):  # each would write the marker if a worker imported it
        (cwd / name).mkdir(parents=True)
        (cwd / name / "__init__.py").write_text(DECOY.format(marker=str(marker)))
    script = tmp_path / "scripts" / "bridge.py"  # outside cwd: the main process imports the real packages
    script.parent.mkdir()
    script.write_text(WORKER_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "workers ok" in res.stdout
    assert not marker.exists(), marker.read_text()
    from openmm_cgflow._openmm_worker import _sanitise_path

    assert _sanitise_path(["", ".", os.getcwd(), "/usr/lib/python3"]) == ["/usr/lib/python3"]


# ---------------------------------------------------------------------------------------------- non-finite
def test_overflowing_labels_or_a_non_finite_pmf_are_never_exported(tmp_path, mb, monkeypatch):
    import openmm_cgflow.labelling as labelling_module
    import openmm_cgflow.learner as learner_module

    out = tmp_path / "run"
    PMFLearner(mb, out, _tiny(mb, max_iterations=1), progress=False, plots=False).run()
    good = _bytes(out)
    assert set(good) == {"pmf.pt", "flow.pt", "checkpoint.pt", "iterations.jsonl"}
    real = labelling_module.free_energy

    def overflowing(*args, **kwargs):  # energies far outside the explored region: astronomically large labels
        labels = real(*args, **kwargs)
        labels.A = labels.A + 1e200
        return labels

    monkeypatch.setattr(labelling_module, "free_energy", overflowing)
    learner = PMFLearner(mb, out, _tiny(mb, max_iterations=2), progress=False, plots=False)
    with pytest.raises(FloatingPointError, match=r"labels overflowed in iteration 1: \d+ labels with \|A\| > 1e\+06 kT"
                                                 r".*the files of iteration 0 in .* are intact"):
        learner.run()
    assert _bytes(out) == good
    assert not (out / "pmfs" / "pmf_001.pt").exists() and not _temp_files(out)

    monkeypatch.setattr(labelling_module, "free_energy", real)
    real_fit = learner_module.fit_ensemble

    def broken_fit(*args, **kwargs):
        ensemble = real_fit(*args, **kwargs)
        with torch.no_grad():
            next(ensemble.parameters()).fill_(float("nan"))
        return ensemble

    monkeypatch.setattr(learner_module, "fit_ensemble", broken_fit)
    learner = PMFLearner(mb, out, _tiny(mb, max_iterations=2), progress=False, plots=False)
    with pytest.raises(FloatingPointError, match=r"non-finite PMF in iteration 1: the fitted ensemble's mean or spread "
                                                 r"is not finite at \d+ of \d+ CG points.*iteration 0 .* are intact"):
        learner.run()
    assert _bytes(out) == good
    assert not (out / "pmfs" / "pmf_001.pt").exists() and not _temp_files(out)

    # the real thing: a domain far beyond the physics, labels overflow in the first iteration; nothing written
    fresh = tmp_path / "far"
    with pytest.raises(FloatingPointError, match=r"labels overflowed in iteration 0: .*no iteration had finished"):
        PMFLearner(mb, fresh, _tiny(mb, max_iterations=1, domain=[[-50, 50]], start=[40]), progress=False,
                   plots=False).run()
    assert sorted(os.listdir(fresh)) == [".lock", "run.json"]


def test_a_non_finite_kld_is_written_as_null_with_a_flag(tmp_path, mb, monkeypatch):
    import openmm_cgflow.learner as learner_module

    monkeypatch.setattr(learner_module.metrics, "kld_from_pmf", lambda *a, **k: float("inf"))
    out = tmp_path / "run"
    learner = PMFLearner(mb, out, _tiny(mb, max_iterations=1), reference="mueller-brown", progress=False, plots=False)
    learner.run()
    line = (out / "iterations.jsonl").read_text().splitlines()[0]
    assert "Infinity" not in line and "NaN" not in line
    rec = json.loads(line)
    assert rec["kld"] is None and rec["kld_nonfinite"] == "inf"


# ---------------------------------------------------------------------------------------------- crash anywhere
DRIVER = r"""
import json, os, shutil, sys
import torch
torch.set_num_threads(1)
from openmm_cgflow import LearnerSettings, PMFLearner, builtin
from openmm_cgflow_plugin import files

root = sys.argv[1]
mb = builtin("mueller-brown")
TINY = json.loads(sys.argv[2])
LOG = []
real_commit = files.AtomicPath.commit


def run(out, iterations, die_at=None, base=None):
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:
        count = [0]

        def commit(self):
            count[0] += 1
            if count[0] == die_at:
                os._exit(9)  # killed with the temp file written, before the rename
            real_commit(self)
            name = os.path.relpath(self.path, out)
            with open(os.path.join(root, "writes.log"), "a") as fh:
                fh.write(name + "\n")
            if base and name == "iterations.jsonl" and not os.path.exists(base):
                shutil.copytree(out, base)  # the folder as iteration 0 committed it

        files.AtomicPath.commit = commit
        st = LearnerSettings.for_system(mb, max_iterations=iterations, **TINY)
        PMFLearner(mb, out, st, progress=False, plots=False).run()
        os._exit(0)
    except BaseException as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        os._exit(3)


assert run(os.path.join(root, "reference"), 2, base=os.path.join(root, "base")) == 0  # uninterrupted
with open(os.path.join(root, "writes.log")) as fh:
    log = fh.read().split()
writes = log[log.index("iterations.jsonl") + 1:]  # the file writes of iteration 1
# a kill before the rename of write j leaves the folder as a kill just after write j - 1 did, plus a temp file
scenarios = [(j, "before") for j in range(1, len(writes) + 1)]
for j, when in scenarios:
    out = os.path.join(root, f"kill_{j}_{when}")
    shutil.copytree(os.path.join(root, "base"), out)
    status = run(out, 2, die_at=j)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9, status
    with open(os.path.join(out, "killed_temps.json"), "w") as fh:
        json.dump([n for _, _, names in os.walk(out) for n in names if n.startswith(files.TEMP_PREFIX)], fh)
    assert run(out, 2) == 0  # resume
print(json.dumps({"writes": writes, "scenarios": scenarios}))
"""


def test_a_kill_at_any_file_write_of_an_iteration_resumes_to_the_same_pmf(tmp_path):
    from openmm_cgflow.mueller_brown import bin_centres
    from openmm_cgflow_plugin import load_pmf

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    res = subprocess.run([sys.executable, str(driver), str(tmp_path), json.dumps(TINY)], capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["writes"] == ["pmfs/pmf_001.pt", "checkpoint.pt", "pmf.pt", "flow.pt", "iterations.jsonl"]

    def grid(folder):
        return np.asarray(load_pmf(str(folder / "pmf.pt")).mean_and_spread(bin_centres()[:, None])[0])

    expected = grid(tmp_path / "reference")
    ref_records = [json.loads(x) for x in (tmp_path / "reference" / "iterations.jsonl").read_text().splitlines()]
    for j, when in summary["scenarios"]:
        out = tmp_path / f"kill_{j}_{when}"
        left = json.loads((out / "killed_temps.json").read_text())
        assert len(left) == 1, (j, when, left)  # the kill left a temp file
        np.testing.assert_allclose(grid(out), expected, rtol=0, atol=1e-9, err_msg=f"kill at write {j} {when}")
        records = [json.loads(x) for x in (out / "iterations.jsonl").read_text().splitlines()]
        assert [r["energy_evaluations"] for r in records] == [r["energy_evaluations"] for r in ref_records]
        ck = load_plain(out / "checkpoint.pt")  # torch.load(weights_only=True) + numeric NumPy arrays
        assert ck["iteration"] == 2
        for name, digest in ck["files"].items():  # the committed set is what the folder holds
            assert sha256_file(out / name) == digest, (j, when, name)
        assert sorted(os.listdir(out / "pmfs")) == ["pmf_000.pt", "pmf_001.pt"]
        assert not _temp_files(out), (j, when)
