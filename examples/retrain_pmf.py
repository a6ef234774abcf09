"""Retrain a learned PMF where your own OpenMM simulation went, then swap it into the running Simulation.

    python examples/retrain_pmf.py --run runs/ala2       # a finished `cgflow run alanine-dipeptide` directory
    python examples/retrain_pmf.py --quick               # Mueller-Brown, makes its own small run in runs/example-mb-retrain (~1 min)

1. CG walkers (an OpenMM Simulation with the run's pmf.pt as a TorchForce) explore;
2. the CG points they visited go to PMFLearner.refine(): where the ensemble spread is above the threshold,
   the flow is trained there, labelled, the ensemble refitted and pmf.pt re-exported (checkpointed);
3. the refined pmf.pt is swapped into the still-running Simulation: positions and velocities are kept.
"""

import argparse

import numpy as np

import openmm_cgflow_plugin as cgplugin
from openmm_cgflow import LearnerSettings, PMFLearner, builtin

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--run", help="run directory of `cgflow run` (pmf.pt + checkpoint; default runs/ala2, or "
                                  "runs/example-mb-retrain with --quick)")
parser.add_argument("--quick", action="store_true", help="make a small Mueller-Brown run first (for tests)")
parser.add_argument("--steps", type=int, default=20_000, help="CG steps before and after the swap")
args = parser.parse_args()
args.run = args.run or ("runs/example-mb-retrain" if args.quick else "runs/ala2")

if args.quick:
    # Two iterations from the upper-left basin only: the PMF is still uncertain further out.
    molecule = builtin("mueller-brown")
    settings = LearnerSettings.for_system(molecule, first_epochs=40, epochs=20, max_iterations=1, n_workers=0)
    with PMFLearner(molecule, args.run, settings, progress=False, plots=False) as learner:
        learner.run()
    args.steps = 2_000

learner = PMFLearner.from_run(args.run, progress=False)
start = learner.points[:1]

# 1. CG dynamics on the current PMF, in OpenMM (walkers run at twice the temperature to roam further).
walkers = cgplugin.CGDynamics(learner.pmf_path, np.repeat(start, 20, axis=0), seed=1,
                              sampling_temperature=2 * learner.cgsystem.temperature)
visited, spread = walkers.run(args.steps, report_interval=50)
visited = visited.reshape(-1, visited.shape[-1])
print(f"visited {len(visited)} CG frames; max ensemble spread there {spread.max():.2f} kT")

# 2. Refine where the ensemble is uncertain (spread > threshold_kT) -> pmf.pt rewritten (atomically).
before = cgplugin.load_pmf(learner.pmf_path).mean_and_spread(visited)[1].max()
learner.refine(visited)
after = cgplugin.load_pmf(learner.pmf_path).mean_and_spread(visited)[1].max()
print(f"max spread on the visited frames: {before:.2f} kT before, {after:.2f} kT after refining")

# 3. Swap the refined PMF into the running Simulation and continue: same positions and velocities.
state = walkers.context.getState(getPositions=True, getVelocities=True)
walkers.swap_pmf(learner.pmf_path)
same = walkers.context.getState(getPositions=True, getVelocities=True)
kept = (np.array_equal(state.getPositions(asNumpy=True)._value, same.getPositions(asNumpy=True)._value)
        and np.array_equal(state.getVelocities(asNumpy=True)._value, same.getVelocities(asNumpy=True)._value))
print(f"swapped the refined PMF into the running Simulation; positions and velocities kept: {kept}")
s, spread = walkers.run(args.steps, report_interval=50)
print(f"continued {args.steps} steps on the refined PMF; mean spread now {spread.mean():.3f} kT")
