"""Coarse-grained dynamics of alanine dipeptide on a learned PMF, run by OpenMM.

Every walker is one particle moving in (phi, psi) space (radians, read as nm) under the force -kT grad A of
the ensemble-mean PMF in a pmf.pt; 1,000 walkers are one OpenMM Context with one TorchForce. The reporter
writes walkers.npz: s [frames, walkers, 2], spread [frames, walkers] (kT), time_ps [frames].

    python examples/cg_dynamics.py runs/ala2/pmf.pt --walkers 1000 --steps 20000
    python examples/cg_dynamics.py --quick            # the committed learned PMF, a few hundred steps
    python examples/cg_dynamics.py --quick --backend python   # openmm.PythonForce instead of TorchForce

Needs only openmm_cgflow_plugin (torch, openmm; openmm-torch for the default backend). --quick uses the
learned alanine-dipeptide PMF committed in benchmarks/data/aldp_al/pmf.pt (copied into --out).
"""

import argparse
import os
import shutil
import time

import numpy as np
from openmm_cgflow_plugin import CGDynamics, CGReporter, load_pmf

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("pmf", nargs="?", help="pmf.pt of a (phi, psi) PMF")
parser.add_argument("--out", default="cg_dynamics", help="output folder")
parser.add_argument("--walkers", type=int, default=1000)
parser.add_argument("--steps", type=int, default=20000, help="steps of 0.02 ps")
parser.add_argument("--report", type=int, default=50, help="steps between frames")
parser.add_argument("--equilibrate", type=int, default=1000, help="steps before recording")
parser.add_argument("--start", default="boltzmann", help="boltzmann, uniform, or PHI,PSI in radians")
parser.add_argument("--platform", default="Reference", help="Reference, CPU, CUDA, ...")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--backend", default=None, help="force backend: torch (TorchForce) or python (PythonForce)")
parser.add_argument("--quick", action="store_true", help="use the committed learned pmf.pt, a few hundred steps")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

if args.quick:
    committed = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks", "data", "aldp_al",
                             "pmf.pt")
    args.pmf = shutil.copyfile(committed, os.path.join(args.out, "pmf.pt"))
    args.walkers, args.steps, args.report, args.equilibrate = 200, 400, 20, 100
if args.pmf is None:
    parser.error("give a pmf.pt (or --quick)")

pmf = load_pmf(args.pmf, expected_cg=2)
print(f"{pmf}  kT = {pmf.kT:.4f} kJ/mol")

# Starting points: by default drawn from exp(-A) on a 100 x 100 grid (an equilibrium start, so the recorded
# populations need no long relaxation out of basins the walkers happen to start in); "uniform" spreads them
# over the torus; "PHI,PSI" (radians) puts every walker at one point.
rng = np.random.default_rng(args.seed)
(c_phi, c_psi), A, _ = pmf.grid(100)
P, S = np.meshgrid(c_phi, c_psi, indexing="ij")
p_grid = np.exp(-(A - A.min()))
p_grid /= p_grid.sum()
if args.start == "boltzmann":
    idx = rng.choice(p_grid.size, size=args.walkers, p=p_grid.ravel())
    width = 2 * np.pi / 100
    s0 = np.stack([P.ravel()[idx], S.ravel()[idx]], axis=1) + rng.uniform(-width / 2, width / 2, (args.walkers, 2))
elif args.start == "uniform":
    s0 = rng.uniform(-np.pi, np.pi, size=(args.walkers, 2))
else:
    s0 = np.tile(np.array([float(v) for v in args.start.split(",")]), (args.walkers, 1))
dynamics = CGDynamics(pmf, s0, platform=args.platform, seed=args.seed, backend=args.backend)
simulation = dynamics.simulation                     # an ordinary openmm.app.Simulation
simulation.step(args.equilibrate)

walkers_file = os.path.join(args.out, "walkers.npz")
reporter = CGReporter(walkers_file, args.report)
simulation.reporters.append(reporter)
t0 = time.perf_counter()
simulation.step(args.steps)
wall = time.perf_counter() - t0
reporter.close()
ps = args.steps * dynamics.timestep
print(f"{args.walkers} walkers x {args.steps} steps ({ps:g} ps each) on {args.platform}: {wall:.1f} s, "
      f"{args.walkers * args.steps / wall:,.0f} walker-steps/s -> {walkers_file}")

with np.load(walkers_file) as data:
    s, spread, time_ps = data["s"], data["spread"], data["time_ps"]
phi, psi = s[..., 0].ravel(), s[..., 1].ravel()
# Basins (radians): phi > 0 (alpha_L, C7ax); alpha_R: phi < 0 and -2 < psi < 1; beta/C7eq: the rest of phi < 0.
alpha_r = (phi < 0) & (psi > -2.0) & (psi < 1.0)
sampled = {"beta_C7eq": np.mean((phi < 0) & ~alpha_r), "alpha_R": np.mean(alpha_r), "phi_pos": np.mean(phi >= 0)}
# The same populations straight from the PMF: exp(-A) on the 100 x 100 grid.
p = p_grid
grid_alpha = (P < 0) & (S > -2.0) & (S < 1.0)
from_pmf = {"beta_C7eq": p[(P < 0) & ~grid_alpha].sum(), "alpha_R": p[grid_alpha].sum(), "phi_pos": p[P >= 0].sum()}
print(f"{len(time_ps)} frames ({time_ps[0]:g}-{time_ps[-1]:g} ps); mean ensemble spread at the walkers "
      f"{spread.mean():.3f} kT (max {spread.max():.3f})")
print("basin populations   walkers   exp(-A) on the grid")
for name in sampled:
    print(f"  {name:10s}       {sampled[name]:.4f}    {from_pmf[name]:.4f}")
