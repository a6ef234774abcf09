"""The backmapping example (CG dynamics -> backmap -> DCD + weights -> weighted observables) in quick mode."""

import os
import subprocess
import sys
import time

import mdtraj as md
import numpy as np

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def test_backmap_trajectory_example_quick(tmp_path):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, "backmap_trajectory.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300, env=ENV)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    assert "CG dynamics: 20 walkers" in out and "backmapped 400 CG frames x 8 samples" in out
    # the files: CG reporter output, the all-atom DCD with its topology, the weights
    with np.load(tmp_path / "walkers.npz") as z:
        assert z["s"].shape == (20, 20, 2)
    w = np.load(tmp_path / "backmapped.dcd.weights.npz")
    traj = md.load(str(tmp_path / "backmapped.dcd"), top=str(tmp_path / "backmapped.top.pdb"))
    assert traj.n_frames == len(w["log_weights"]) > 0.99 * 3200 and traj.n_atoms == 22
    phi = md.compute_phi(traj)[1][:, 0]
    assert np.abs(np.angle(np.exp(1j * (phi - w["s"][:, 0])))).max() < 1e-6
    # a weighted N-CA-C angle with its standard error, in a physical range (degrees)
    line = next(l for l in out.splitlines() if "N-CA-C angle" in l)
    mean, se = float(line.split()[3]), float(line.split()[5])
    assert 105 < mean < 120 and 0 < se < 3
    assert "Kish ESS" in out
    assert wall < 60, wall  # < 30 s on an idle 2-core machine
