"""Learn the PMF of alanine dipeptide along (phi, psi) by active learning, from a Python script.

    python examples/learn_pmf.py                            # the full run into runs/example-ala2 (about an hour on two cores)
    python examples/learn_pmf.py --quick                    # Mueller-Brown, two iterations, seconds, into runs/example-mb

Writes the run directory: pmf.pt (load it with openmm_cgflow_plugin), flow.pt (for backmapping),
iterations.jsonl, plots/ and a checkpoint (running the script again resumes).
"""

import argparse

from openmm_cgflow import LearnerSettings, PMFLearner, builtin

parser = argparse.ArgumentParser()
parser.add_argument("--out", help="run directory (default: runs/example-ala2, or runs/example-mb with --quick)")
parser.add_argument("--quick", action="store_true", help="tiny Mueller-Brown run (for tests)")
args = parser.parse_args()
out = args.out or ("runs/example-mb" if args.quick else "runs/example-ala2")

if args.quick:
    molecule = builtin("mueller-brown")
    settings = LearnerSettings.for_system(molecule, first_epochs=20, epochs=10, max_iterations=2, n_workers=0)
    reference = "mueller-brown"
else:
    molecule = builtin("alanine-dipeptide")  # amber96 + OBC implicit solvent, 300 K, CG = (phi, psi)
    settings = LearnerSettings.for_system(molecule, threshold_kT=0.2)
    reference = "alanine-dipeptide"  # the packaged metadynamics reference, for the KLD log only

learner = PMFLearner(molecule, out, settings, reference=reference)
pmf_path = learner.run()
print(f"{learner.iteration} iterations, {learner.evaluations:,} energy evaluations -> {pmf_path}")
