"""Backmap a coarse-grained trajectory of alanine dipeptide to Boltzmann-weighted all-atom structures.

1. CG dynamics: walkers in (phi, psi) (radians) on the learned PMF of a run (its pmf.pt), one OpenMM
   Context with a TorchForce, recorded by the plugin's CGReporter -> walkers.npz (s [frames, walkers, 2]).
2. Backmapping: the run's flow.pt draws all-atom structures that have exactly each frame's (phi, psi),
   each with a log importance weight log p~/q normalised within its frame; structures with the wrong
   chirality (D-alanine) are dropped -> backmapped.dcd (superposed onto the reference structure),
   backmapped.dcd.weights.npz and backmapped.top.pdb. The same as
   ``cgflow backmap RUN walkers.npz -o backmapped.dcd --per-frame N``.
3. Observables that the CG coordinates do not contain (the N-CA-C angle, the two peptide-bond dihedrals),
   as Boltzmann-weighted averages with standard errors, read back from the written files.

    python examples/backmap_trajectory.py --run runs/ala2            # a run of `cgflow run alanine-dipeptide`
    python examples/backmap_trajectory.py --quick                    # makes a tiny PMF and flow itself (< 30 s)

Units: nm, ps, K; angles in radians inside, degrees where printed.
"""

import argparse
import math
import os
import time

import mdtraj as md
import numpy as np

from openmm_cgflow.backmap_output import backmap_file
from openmm_cgflow.importance import weighted_estimate
from openmm_cgflow_plugin import CGDynamics, CGReporter, load_pmf

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", help="run directory with pmf.pt and flow.pt (from `cgflow run alanine-dipeptide`)")
parser.add_argument("--out", default="backmap_example", help="output folder")
parser.add_argument("--walkers", type=int, default=100)
parser.add_argument("--steps", type=int, default=10000, help="CG steps of 0.02 ps after equilibration")
parser.add_argument("--report", type=int, default=50, help="steps between recorded frames")
parser.add_argument("--equilibrate", type=int, default=500, help="CG steps before recording")
parser.add_argument("--per-frame", type=int, default=4, help="all-atom samples per CG frame")
parser.add_argument("--workers", type=int, default=None, help="OpenMM worker processes for energies (default: all cores)")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--quick", action="store_true", help="tiny PMF and flow made here, short CG run (< 30 s)")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

if args.quick and args.run is None:
    # A small PMF fitted to the packaged reference free energy and a flow trained by energy for a few seconds:
    # enough to show the pipeline. The importance weights correct what the small flow gets wrong (ESS says how
    # well); a real run's flow.pt gives far higher ESS.
    import torch

    from openmm_cgflow import builtin, save_model
    from openmm_cgflow.bridge import EnergyBridge
    from openmm_cgflow.ensemble import export_pmf
    from openmm_cgflow.flow import flow_for
    from openmm_cgflow.reference_pmf import fit_to_reference
    from openmm_cgflow.training import Trainer

    torch.set_num_threads(1)
    args.run = os.path.join(args.out, "quick_run")
    os.makedirs(args.run, exist_ok=True)
    ensemble, export_kwargs = fit_to_reference("alanine-dipeptide", n_labels=400, steps=300, n_models=4,
                                               hidden=(32, 32))
    export_pmf(ensemble, os.path.join(args.run, "pmf.pt"), **export_kwargs)
    molecule = builtin("alanine-dipeptide")
    flow = flow_for(molecule, dtype=torch.float32, n_layers=4, hidden=(64, 64))
    points = [[-1.4, 1.3], [-1.4, 2.8], [-1.2, -0.6], [-2.6, 2.7], [1.0, -0.8], [-1.7, 0.3], [-0.9, -0.3], [-2.0, 1.0]]
    with EnergyBridge(molecule.system, molecule.temperature, n_workers=0) as bridge:
        Trainer(flow, molecule, bridge, lr=2e-3, warmup_steps=20, samples_per_point=16, points_per_batch=8,
                forward_weight=0.5, drop_worst=2, progress=False).train_by_energy(points, 200)
    save_model(os.path.join(args.run, "flow.pt"), flow, molecule)
if args.quick:
    args.walkers, args.steps, args.report, args.equilibrate, args.per_frame = 20, 400, 20, 100, 8
    args.workers = 0 if args.workers is None else args.workers
if args.run is None:
    parser.error("give --run RUN_DIR (with pmf.pt and flow.pt) or --quick")

# ---------------------------------------------------------------- 1. CG dynamics on the PMF (OpenMM)
pmf = load_pmf(os.path.join(args.run, "pmf.pt"), expected_cg=2)
rng = np.random.default_rng(args.seed)
(c_phi, c_psi), A, _ = pmf.grid(100)            # start the walkers from exp(-A) on a 100 x 100 grid
P, S = np.meshgrid(c_phi, c_psi, indexing="ij")
p_grid = np.exp(-(A - A.min())).ravel()
idx = rng.choice(p_grid.size, size=args.walkers, p=p_grid / p_grid.sum())
s0 = np.stack([P.ravel()[idx], S.ravel()[idx]], axis=1) + rng.uniform(-np.pi / 100, np.pi / 100, (args.walkers, 2))
dynamics = CGDynamics(pmf, s0, seed=args.seed)
simulation = dynamics.simulation                  # an ordinary openmm.app.Simulation
simulation.step(args.equilibrate)
walkers_file = os.path.join(args.out, "walkers.npz")
reporter = CGReporter(walkers_file, args.report)
simulation.reporters.append(reporter)
t0 = time.perf_counter()
simulation.step(args.steps)
reporter.close()
n_frames = args.steps // args.report
print(f"CG dynamics: {args.walkers} walkers x {args.steps * dynamics.timestep:g} ps, {n_frames} frames each "
      f"({time.perf_counter() - t0:.1f} s) -> {walkers_file}")

# ---------------------------------------------------------------- 2. backmapping (streams to disk)
out = os.path.join(args.out, "backmapped.dcd")
summary = backmap_file(args.run, walkers_file, out, n_per_frame=args.per_frame, seed=args.seed,
                       n_workers=args.workers, progress=not args.quick)
print(summary)

# ---------------------------------------------------------------- 3. weighted observables from the files
w = np.load(out + ".weights.npz")
traj = md.load(out, top=summary.topology_path)  # a long trajectory: md.iterload(out, top=..., chunk=...)
tau = md.compute_angles(traj, [[6, 8, 14]])[:, 0]                  # N-CA-C of ALA
omega = md.compute_dihedrals(traj, [[1, 4, 6, 8], [8, 14, 16, 18]])  # CH3-C-N-CA (ACE), CA-C-N-CH3 (NME)
values = np.column_stack([np.degrees(tau), np.degrees(np.mod(omega, 2 * math.pi))])  # omega around 180 deg
# frames are flattened time-major (frame, walker): blocks of 5 time frames of all walkers for the errors
est = weighted_estimate(values, w["log_weights"], frame=w["index"], block_size=5 * args.walkers)
flow_alone = weighted_estimate(values, np.zeros(len(values)), frame=w["index"], block_size=5 * args.walkers)
print(f"\n{len(values)} weighted all-atom samples of {int(w['n_frames'])} CG frames; Kish ESS {est.ess:.0f}; "
      f"mean ESS per frame {w['frame_ess'].mean():.2f} of {args.per_frame}")
print("observable (deg)           Boltzmann-weighted          flow alone (unweighted)")
for k, name in enumerate(["N-CA-C angle (tau)", "omega1 (ACE C-N)", "omega2 (NME C-N)"]):
    print(f"  {name:22s}  {est.mean[k]:8.2f} +- {est.stderr[k]:.2f} (sd {est.std[k]:5.2f})"
          f"      {flow_alone.mean[k]:8.2f} (sd {flow_alone.std[k]:5.2f})")
