"""The active-learning examples run end to end in their quick modes (real OpenMM, real TorchForce)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run(script, *args):
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                         timeout=400, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_learn_pmf_example_quick(tmp_path):
    out = _run("learn_pmf.py", "--quick", "--out", str(tmp_path / "run"))
    assert "energy evaluations" in out
    assert (tmp_path / "run" / "pmf.pt").exists() and (tmp_path / "run" / "iterations.jsonl").exists()


def test_retrain_example_refines_and_swaps_keeping_state(tmp_path):
    out = _run("retrain_pmf.py", "--quick", "--run", str(tmp_path / "run"))
    assert "positions and velocities kept: True" in out
    before, after = [float(x) for x in out.split("max spread on the visited frames: ")[1].split(" kT after")[0]
                     .replace(" kT before,", "").split()]
    assert after < before
