"""Steps per second of biased all-atom MD with each way the plugin can put a PMF into OpenMM, side by side.

System: alanine dipeptide (openmm_cgflow/data/alanine-dipeptide.pdb), amber96.xml + amber96_obc.xml, NoCutoff,
no constraints, hydrogen mass 4 amu with a 2 fs LangevinMiddleIntegrator (or, with --light-h, 1 amu and 1 fs),
300 K, friction 1/ps, OpenMM Reference platform (or --platform CPU, one thread), torch one thread. Bias:
``-kT A(phi, psi)`` of the committed learned PMF (benchmarks/data/aldp_al/pmf.pt) as

* ``torch``: ``add_pmf_bias(..., backend="torch")`` (openmm-torch TorchForce);
* ``python``: ``add_pmf_bias(..., backend="python")`` (openmm.PythonForce running the same TorchScript module
  through torch in Python, float64);
* ``cmap``: ``pmf_cmap_force(..., n_grid=24)`` (OpenMM's CMAPTorsionForce on a 24 x 24 grid of the PMF);
* ``none``: no bias (the force field alone).

Every configuration starts from the same minimised structure; after a warm-up of 50 steps, ``--steps`` steps
are timed per round, rounds are interleaved (each configuration once per round) and the best round is
reported, so a load spike from other jobs hits one round of each rather than one configuration.

    OMP_NUM_THREADS=1 python benchmarks/bias_backends.py                 # ~1-2 min
    python benchmarks/bias_backends.py --steps 500 --rounds 1            # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import sys
import time

import openmm
import openmm.app as app
import openmm.unit as unit
import torch

from openmm_cgflow_plugin import add_pmf_bias, load_pmf, pmf_cmap_force

HERE = os.path.dirname(os.path.abspath(__file__))
PDB = os.path.join(HERE, os.pardir, "openmm_cgflow", "data", "alanine-dipeptide.pdb")
PMF = os.path.join(HERE, "data", "aldp_al", "pmf.pt")
TEMPERATURE = 300.0   # K
METHODS = ("none", "cmap", "torch", "python")


def build(method: str, pmf_path: str, heavy_h: bool, platform: str):
    """An openmm.Context of alanine dipeptide with the bias of ``method``, minimised, velocities at 300 K."""
    pdb = app.PDBFile(PDB)
    ff = app.ForceField("amber96.xml", "amber96_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                             hydrogenMass=(4.0 if heavy_h else 1.0) * unit.amu)
    if method in ("torch", "python"):
        add_pmf_bias(system, pmf_path, factor=-1, temperature=TEMPERATURE, backend=method)
    elif method == "cmap":
        system.addForce(pmf_cmap_force(pmf_path, n_grid=24, factor=-1, temperature=TEMPERATURE))
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
                                                 (2.0 if heavy_h else 1.0) * unit.femtosecond)
    integrator.setRandomNumberSeed(7)
    plat = openmm.Platform.getPlatformByName(platform)
    ctx = openmm.Context(system, integrator, plat, {"Threads": "1"} if platform == "CPU" else {})
    ctx.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, maxIterations=200)
    ctx.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 7)
    return ctx, integrator


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="timed MD steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--platform", default="Reference", help="Reference or CPU (one thread)")
    ap.add_argument("--light-h", action="store_true", help="hydrogen mass 1 amu and 1 fs (default: 4 amu, 2 fs)")
    ap.add_argument("--pmf", default=PMF)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    heavy_h = not args.light_h
    dt_fs = 2.0 if heavy_h else 1.0
    load_pmf(args.pmf, expected_cg=2, temperature=TEMPERATURE)
    t_start = time.time()
    runs = {m: build(m, args.pmf, heavy_h, args.platform) for m in methods}
    for ctx, integrator in runs.values():
        integrator.step(50)
    best = {m: 0.0 for m in methods}
    per_round = {m: [] for m in methods}
    for rnd in range(args.rounds):
        for m in methods:
            ctx, integrator = runs[m]
            t = time.perf_counter()
            integrator.step(args.steps)
            ctx.getState(getEnergy=True)           # make sure the steps are done
            rate = args.steps / (time.perf_counter() - t)
            per_round[m].append(rate)
            best[m] = max(best[m], rate)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"round {rnd + 1}/{args.rounds} done ({time.time() - t_start:.0f} s, load {load:.1f})", flush=True)
    ns_day = {m: best[m] * dt_fs * 1e-6 * 86400 for m in methods}
    print()
    print(f"| bias | steps/s | ns/day | / no bias | / TorchForce |")
    print("|---|---|---|---|---|")
    for m in methods:
        rel_none = f"{best[m] / best['none']:.2f}" if "none" in best else "-"
        rel_torch = f"{best[m] / best['torch']:.2f}" if "torch" in best else "-"
        print(f"| {m} | {best[m]:,.0f} | {ns_day[m]:.1f} | {rel_none} | {rel_torch} |")
    meta = dict(command=" ".join(["benchmarks/bias_backends.py"] + (argv if argv is not None else sys.argv[1:])),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=f"{_platform.machine()} {os.cpu_count()} cores",
                openmm=openmm.__version__, torch=torch.__version__, platform=args.platform,
                hydrogen_mass_amu=4.0 if heavy_h else 1.0, timestep_fs=dt_fs, steps_per_round=args.steps,
                rounds=args.rounds, pmf=os.path.relpath(args.pmf), steps_per_s=best, ns_per_day=ns_day,
                per_round=per_round, wall_s=time.time() - t_start)
    print(f"\nwall {meta['wall_s']:.0f} s ({meta['date']}, {meta['machine']}, OpenMM {openmm.__version__}, "
          f"torch {torch.__version__}, {args.platform})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)


if __name__ == "__main__":
    main()
