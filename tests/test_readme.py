"""The README's Python snippets run as written (issue #12).

Each ```python block of README.md is extracted and run in a fresh interpreter in a temporary directory. The
code is never changed: where a snippet needs data it did not make (a run directory, a PDB file, an array of
positions), a *preamble* documented below puts a quick stand-in where the snippet looks for it, and runs
before the snippet. Snippets that the README presents as one script run together, in order.

* ``openmm-script`` ("Using it from an OpenMM script", snippets 1-3): the README says to run
  ``cgflow run alanine-dipeptide --out runs/ala2`` first; the preamble makes ``runs/ala2`` a one-iteration
  alanine-dipeptide run with tiny settings (a small flow, few points; ~5 s) instead of the 45-minute one.
* ``reporter`` (a user reporter on a short Mueller-Brown run): no preamble.
* ``own-molecule`` and ``register`` ("Your own molecule"): the preamble copies the packaged alanine-dipeptide
  PDB to ``mine.pdb``. The snippets start full active-learning runs (tens of minutes), so they run for
  ``START_S`` seconds and pass if they have not failed by then (or finished with exit code 0).
* ``local-cluster`` (Dask LocalCluster, 2 workers): runs as written (it makes its own configurations).
  Skipped without ``distributed``.
* ``slurm``: needs a SLURM cluster (an external service): not run.

A README snippet without an entry here fails the test, so new snippets cannot go untested.
"""

import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
#: Seconds a snippet that starts a long run must survive without an error.
START_S = 15

TINY_ALDP_RUN = '''
def _stand_in_for_cgflow_run():
    """runs/ala2: a one-iteration alanine-dipeptide run with tiny settings (stand-in for the 45-minute run)."""
    from openmm_cgflow import LearnerSettings, PMFLearner, builtin

    aldp = builtin("alanine-dipeptide")
    st = LearnerSettings.for_system(
        aldp, first_epochs=2, epochs=2, initial_points=8, new_centres=2, points_per_centre=4, samples_per_point=4,
        points_per_batch=8, label_samples=16, n_models=2, n_walkers=8, walker_steps=200, report_interval=20,
        warmup_steps=1, flow_kwargs={"n_layers": 2, "hidden": [16]}, n_workers=0, max_iterations=1)
    with PMFLearner(aldp, "runs/ala2", st, progress=False, plots=False) as learner:
        learner.run()


_stand_in_for_cgflow_run()
'''

COPY_PDB = '''
import shutil as _shutil
from openmm_cgflow.systems import data_path as _data_path

_shutil.copy(_data_path("alanine-dipeptide.pdb"), "mine.pdb")   # stand-in for the reader's molecule
'''

# (text that identifies the snippet, group, preamble of the group, mode: "complete" or "start" or "skip: why")
SNIPPETS = [
    ('CGDynamics("runs/ala2/pmf.pt"', "openmm-script", TINY_ALDP_RUN, "complete"),
    ('backmap("walkers.npz", "runs/ala2"', "openmm-script", TINY_ALDP_RUN, "complete"),
    ('PMFLearner.from_run("runs/ala2")', "openmm-script", TINY_ALDP_RUN, "complete"),
    ("class PrintKLD", "reporter", "", "complete"),
    ("molecule = from_openmm(", "own-molecule", COPY_PDB, "start"),
    ('register_system("my-peptide"', "register", COPY_PDB, "start"),
    ("LocalCluster(", "local-cluster", "", "complete"),
    ("SLURMCluster(", "slurm", "", "skip: needs a SLURM cluster"),
]


def readme_snippets() -> list[str]:
    """The ```python blocks of README.md, in order."""
    with open(README) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


def _entry(code: str):
    hits = [e for e in SNIPPETS if e[0] in code]
    assert len(hits) == 1, f"README snippet without exactly one entry in tests/test_readme.py:\n{code}"
    return hits[0]


def _groups() -> dict:
    groups = {}
    for code in readme_snippets():
        _, group, preamble, mode = _entry(code)
        groups.setdefault(group, {"preamble": preamble, "mode": mode, "code": []})["code"].append(code)
    return groups


def test_every_readme_snippet_has_an_entry():
    snippets = readme_snippets()
    assert len(snippets) >= 7
    for code in snippets:
        _entry(code)


def _run(tmp_path, group: dict):
    script = tmp_path / "snippet.py"
    script.write_text("# --- preamble (stand-ins, see tests/test_readme.py) ---\n" + group["preamble"]
                      + "\n# --- README ---\n" + "\n".join(group["code"]))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    limit = START_S if group["mode"] == "start" else 600
    try:
        out, err = proc.communicate(timeout=limit)
        return proc.returncode, out, err, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the snippet and the energy workers it started
        out, err = proc.communicate()
        return proc.returncode, out, err, True


@pytest.mark.parametrize("name", list(dict.fromkeys(e[1] for e in SNIPPETS if not e[3].startswith("skip"))))
def test_readme_snippet_runs_as_written(tmp_path, name):
    group = _groups()[name]
    if name == "local-cluster":
        pytest.importorskip("distributed")
    rc, out, err, timed_out = _run(tmp_path, group)
    if timed_out:  # a long run: it must not have failed so far, and it must have started its run directory
        assert group["mode"] == "start", f"{name} did not finish in time:\n{err[-3000:]}"
        assert "Traceback" not in err, err[-4000:]
        run_dirs = [p.parent for p in (tmp_path / "runs").glob("*/run.json")]
        assert run_dirs, f"{name}: no run directory was started within {START_S} s:\n{err[-3000:]}"
    else:  # (Dask may log a traceback of a connection closed at shutdown: the exit code is what counts)
        assert rc == 0, err[-4000:]
    if name == "openmm-script":
        assert (tmp_path / "walkers.npz").exists() and (tmp_path / "ala2.dcd").exists()
        assert "ess" in out.lower() or "mean" in out.lower(), out
    if name == "reporter":
        assert re.search(r"^0 \d+ ", out, flags=re.M), out


def test_slurm_snippet_is_skipped_for_a_reason():
    assert "slurm" in _groups()
    pytest.skip("the SLURM snippet needs a SLURM cluster (an external service)")
