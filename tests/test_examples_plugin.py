"""The plugin examples (CG dynamics with a reporter; biased all-atom MD with reweighting, both force backends) run in
their quick modes."""

import os
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run(script, *args):
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_cg_dynamics_example_quick(tmp_path):
    out = _run("cg_dynamics.py", "--quick", "--out", str(tmp_path))
    assert "walker-steps/s" in out and "phi_pos" in out
    with np.load(tmp_path / "walkers.npz") as z:
        assert z["s"].shape == (20, 200, 2) and z["spread"].shape == (20, 200) and z["time_ps"].shape == (20,)
    # sampled populations printed next to the PMF's own: the beta basin dominates in both
    beta = [float(x) for x in out.split("beta_C7eq")[1].split("\n")[0].split()]
    assert beta[0] > 0.6 and beta[1] > 0.6


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_biased_md_example_quick(tmp_path, backend):
    cap = ["--cap-kT", "12"] if backend == "python" else []   # a cap above the basins (A spans 0-24 kT here)
    out = _run("biased_md.py", "--quick", "--out", str(tmp_path), "--backend", backend, *cap)
    assert "reweighted population of phi > 0" in out and "ESS" in out
    assert (tmp_path / "biased.dcd").exists() and (tmp_path / "pmf.pt").exists()
    frac = float(out.split("biased fraction with phi > 0: ")[1].split()[0])
    assert frac > 0.02   # the flattened landscape reaches phi > 0 within picoseconds


def test_marginals_example_demo(tmp_path):
    """examples/marginals.py on its analytic six-dimensional PMF: three residue panels, and the CG walkers'
    2-D marginals agree with the PMF's own (forward KLD on 36 x 36 bins, 8,000 frames)."""
    out = _run("marginals.py", "--demo", "--quick", "--out", str(tmp_path))
    klds = [float(line.split("KLD(PMF || walkers)")[1]) for line in out.splitlines() if "KLD(PMF || walkers)" in line]
    assert len(klds) == 3, out
    assert max(klds) < 0.05, out
    assert (tmp_path / "marginals.png").stat().st_size > 10_000
