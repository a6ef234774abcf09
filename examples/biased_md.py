"""All-atom alanine dipeptide biased by minus its learned PMF, then reweighted back to 300 K.

The bias -kT A(phi, psi) (add_pmf_bias, factor -1) flattens the free-energy landscape along (phi, psi), so
the molecule crosses into phi > 0 (alpha_L, C7ax; ~0.3 % populated, rarely visited by plain MD) within
picoseconds. Frames are unbiased with weights exp(-A(s)) (reweight); the effective sample size says how
much of the run the estimate rests on.

    python examples/biased_md.py runs/ala2/pmf.pt --ps 2000
    python examples/biased_md.py --quick              # the committed learned PMF, a few ps
    python examples/biased_md.py --quick --backend python   # the bias as an openmm.PythonForce
    python examples/biased_md.py runs/ala2/pmf.pt --cap-kT 12    # flat only where A < 12 kT

System: amber96 + OBC implicit solvent, no cutoff, hydrogen mass 3 amu (no constraints), Langevin 300 K,
1/ps, 2 fs; trajectory written as DCD and read back with mdtraj.
"""

import argparse
import os
import shutil
import time
import warnings

import mdtraj
import mdtraj.reporters
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openmm_cgflow_plugin import add_pmf_bias, load_pmf, reweight

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("pmf", nargs="?", help="pmf.pt of alanine dipeptide's (phi, psi) PMF at 300 K")
parser.add_argument("--pdb", default=None, help="default: the packaged alanine-dipeptide.pdb")
parser.add_argument("--out", default="biased_md", help="output folder")
parser.add_argument("--ps", type=float, default=2000.0, help="length of the biased run")
parser.add_argument("--frame-fs", type=float, default=100.0, help="fs between saved frames")
parser.add_argument("--platform", default="Reference", help="Reference is fastest for 22 atoms")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--backend", default=None, help="force backend of the bias: torch (TorchForce) or python")
parser.add_argument("--quick", action="store_true", help="use the committed learned pmf.pt and run a few ps")
parser.add_argument("--cap-kT", type=float, default=None,
                    help="flatten only where A < this (kT): the bias is -kT min(A, cap), the weights exp(-min(A, cap))")
args = parser.parse_args()
warnings.filterwarnings("ignore", message="Casting xyz dtype")   # mdtraj's DCD writer stores float32
os.makedirs(args.out, exist_ok=True)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
if args.quick:
    args.pmf = shutil.copyfile(os.path.join(REPO, "benchmarks", "data", "aldp_al", "pmf.pt"),
                               os.path.join(args.out, "pmf.pt"))
    args.ps, args.frame_fs = 4.0, 20.0
if args.pmf is None:
    parser.error("give a pmf.pt (or --quick)")
pdb_path = args.pdb or os.path.join(REPO, "openmm_cgflow", "data", "alanine-dipeptide.pdb")

temperature = 300 * unit.kelvin
pdb = app.PDBFile(pdb_path)
forcefield = app.ForceField("amber96.xml", "amber96_obc.xml")
system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                 hydrogenMass=3 * unit.amu)
pmf = load_pmf(args.pmf, expected_cg=2, temperature=temperature)   # two CG dihedrals, at 300 K
# The file carries the atom quadruples of phi and psi; factor -1 flattens the landscape along them.
add_pmf_bias(system, pmf, factor=-1, temperature=temperature, force_group=1, backend=args.backend,
             cap_kT=args.cap_kT)

integrator = openmm.LangevinMiddleIntegrator(temperature, 1 / unit.picosecond, 2 * unit.femtoseconds)
integrator.setRandomNumberSeed(args.seed)
platform = openmm.Platform.getPlatformByName(args.platform)
simulation = app.Simulation(pdb.topology, system, integrator, platform)
simulation.context.setPositions(pdb.positions)
simulation.minimizeEnergy(maxIterations=500)
simulation.context.setVelocitiesToTemperature(temperature, args.seed)

frame_steps = max(1, int(round(args.frame_fs / 2.0)))
n_steps = int(round(args.ps * 1000 / 2.0))
dcd = os.path.join(args.out, "biased.dcd")
dcd_reporter = mdtraj.reporters.DCDReporter(dcd, frame_steps)
simulation.reporters.append(dcd_reporter)
t0 = time.perf_counter()
simulation.step(n_steps)
wall = time.perf_counter() - t0
dcd_reporter.close()
print(f"biased MD: {args.ps:g} ps ({n_steps} steps) in {wall:.1f} s, {n_steps / wall:,.0f} steps/s")

# (phi, psi) of every frame with mdtraj, then unbiasing weights exp(factor * A) = exp(-A(phi, psi)).
traj = mdtraj.load(dcd, top=pdb_path)
_, phi = mdtraj.compute_phi(traj)
_, psi = mdtraj.compute_psi(traj)
s = np.stack([phi[:, 0], psi[:, 0]], axis=1).astype(np.float64)
weights = reweight(s, pmf, factor=-1, cap_kT=args.cap_kT)   # the same cap as the bias
pos = s[:, 0] > 0
p_pos, se = weights.population(pos)
print(f"{len(s)} frames; biased fraction with phi > 0: {pos.mean():.3f}")
print(f"reweighted population of phi > 0: {p_pos:.4f} +- {se:.4f} (ESS {weights.ess:.0f}, "
      f"{100 * weights.ess_fraction:.1f} % of the frames)")
alpha_r = (s[:, 0] < 0) & (s[:, 1] > -2.0) & (s[:, 1] < 1.0)
print(f"reweighted population of alpha_R: {weights.population(alpha_r)[0]:.4f}")
