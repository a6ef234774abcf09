"""All-atom alanine dipeptide biased by minus a good PMF (TorchForce), reweighted, against plain MD of the same length.

System and dynamics as benchmarks/md_baseline.py (aldp_common.build_system): amber96 + OBC implicit solvent,
NoCutoff, no constraints, hydrogen mass 3 amu, LangevinMiddleIntegrator 300 K, friction 1/ps, 2 fs, OpenMM
Reference platform, one thread. The biased run adds ``add_pmf_bias(system, pmf.pt, factor=-1)``: the potential
becomes U(x) - kT A(phi, psi), flat along (phi, psi) where A is right. Frames ((phi, psi) every --frame-steps
steps) are unbiased with weights exp(-A(phi, psi)) (``reweight(s, pmf, factor=-1)``); populations come with
Kish's ESS and a block standard error (10 contiguous blocks, each block's reweighted population). Plain MD
of the same number of steps and the same seed is run alongside.

The PMF (default) is ``fit_to_reference("alanine-dipeptide")``: 10 MLPs [64, 64] fitted to 2,000 labels of the
packaged well-tempered-metadynamics reference (benchmarks/data/aldp_reference.log: phi > 0 population 0.0034,
alpha_R 0.141), exported to a temporary pmf.pt.

Success: the reweighted phi > 0 population is within 20 % of the reference's, and plain MD's is not.

    OMP_NUM_THREADS=1 python benchmarks/biased_md.py --ns 1.5        # ~10 min on one core
    python benchmarks/biased_md.py --quick                            # ~1 min smoke run (0.05 ns)
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import sys
import tempfile
import time

import numpy as np
import openmm
import openmm.unit as unit
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aldp_common as C  # noqa: E402

from openmm_cgflow import metrics  # noqa: E402
from openmm_cgflow_plugin import add_pmf_bias, load_pmf, reweight  # noqa: E402

BIAS_GROUP = 1


def populations(s: np.ndarray, weights: np.ndarray) -> dict:
    """Basin populations (metrics.basin_populations' definitions, per frame) of frames s [F, 2] with weights [F]."""
    w = weights / weights.sum()
    phi, psi = s[:, 0], s[:, 1]
    alpha = (phi < 0) & (psi > -2.0) & (psi < 1.0)
    return {"beta_C7eq": float(w[(phi < 0) & ~alpha].sum()), "alpha_R": float(w[alpha].sum()),
            "phi_pos": float(w[phi >= 0].sum())}


def block_error(s: np.ndarray, weights: np.ndarray, key: str, n_blocks: int = 10) -> float:
    """Standard error of a population from n_blocks contiguous blocks (each block reweighted on its own)."""
    vals = [populations(sb, wb)[key] for sb, wb in zip(np.array_split(s, n_blocks), np.array_split(weights, n_blocks))]
    return float(np.std(vals, ddof=1) / np.sqrt(n_blocks))


def run_md(pmf_path, n_steps: int, frame_steps: int, seed: int, label: str, platform: str = "Reference",
           backend=None):
    """(s [F, 2] radians, MD wall seconds) of a run with (pmf_path given) or without the PMF bias.

    ``backend``: force backend of the bias ("torch": TorchForce, "python": openmm.PythonForce; None: default)."""
    system, _, pos = C.build_system(hydrogen_mass=3.0)
    if pmf_path is not None:
        add_pmf_bias(system, pmf_path, factor=-1, temperature=C.TEMPERATURE, force_group=BIAS_GROUP, backend=backend)
    integrator = openmm.LangevinMiddleIntegrator(C.TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
                                                 2.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed)
    plat, props = C.make_platform(platform)
    ctx = openmm.Context(system, integrator, plat, props)
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, maxIterations=500)
    ctx.setVelocitiesToTemperature(C.TEMPERATURE * unit.kelvin, seed)
    n_frames = n_steps // frame_steps
    x = np.empty((n_frames, system.getNumParticles(), 3))
    t0 = time.perf_counter()
    report = max(1, n_frames // 10)
    for f in range(n_frames):
        integrator.step(frame_steps)
        x[f] = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        if (f + 1) % report == 0:
            el = time.perf_counter() - t0
            print(f"  {label}: {(f + 1) * frame_steps * 2e-6:.3f} ns, {(f + 1) * frame_steps / el:,.0f} steps/s",
                  flush=True)
    wall = time.perf_counter() - t0
    return C.dihedrals(x, [C.PHI, C.PSI]), wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.05 ns smoke run with a small PMF fit")
    ap.add_argument("--ns", type=float, default=1.5, help="length of each run (biased and plain)")
    ap.add_argument("--pmf", default=None, help="pmf.pt (default: fit_to_reference, exported to a temp file)")
    ap.add_argument("--frame-steps", type=int, default=10, help="MD steps between frames")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--backend", default=None, help="force backend of the bias: torch (default) or python")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    if args.quick:
        args.ns = min(args.ns, 0.05)

    tmp = None
    if args.pmf is None:
        from openmm_cgflow.ensemble import export_pmf
        from openmm_cgflow.reference_pmf import fit_to_reference

        t = time.perf_counter()
        ens, kw = fit_to_reference("alanine-dipeptide", **(dict(steps=300) if args.quick else {}))
        tmp = tempfile.mkdtemp(prefix="biased-md-")
        args.pmf = export_pmf(ens, os.path.join(tmp, "pmf.pt"), **kw)
        print(f"PMF: fit_to_reference in {time.perf_counter() - t:.1f} s, KLD to the reference "
              f"{metrics.kld_from_pmf(ens, 'alanine-dipeptide'):.4f}", flush=True)
    pmf = load_pmf(args.pmf, expected_cg=[list(C.PHI), list(C.PSI)], temperature=C.TEMPERATURE)
    reference = metrics.load_reference("alanine-dipeptide")
    ref_pop = metrics.basin_populations(reference["probabilities"])
    grid_A = pmf.mean(metrics.reference_grid_points(reference)).reshape(reference["probabilities"].shape)
    pmf_pop = metrics.basin_populations(metrics.pmf_to_probabilities(grid_A))

    n_steps = int(round(args.ns * 1e6 / 2.0))
    s_b, wall_b = run_md(args.pmf, n_steps, args.frame_steps, args.seed, "biased", backend=args.backend)
    s_p, wall_p = run_md(None, n_steps, args.frame_steps, args.seed, "plain")

    rw = reweight(s_b, pmf, factor=-1)
    pop_b = populations(s_b, rw.weights)
    raw_b = populations(s_b, np.ones(len(s_b)))
    pop_p = populations(s_p, np.ones(len(s_p)))
    err_b = {k: block_error(s_b, rw.weights, k) for k in pop_b}
    err_p = {k: block_error(s_p, np.ones(len(s_p)), k) for k in pop_p}
    kld_b = metrics.kld_from_samples(s_b, reference, weights=rw.weights)
    kld_p = metrics.kld_from_samples(s_p, reference)
    rel_b = abs(pop_b["phi_pos"] / ref_pop["phi_pos"] - 1)
    rel_p = abs(pop_p["phi_pos"] / ref_pop["phi_pos"] - 1)

    ns = n_steps * 2e-6
    print()
    print(f"{ns:g} ns per run, frames every {args.frame_steps} steps ({len(s_b)} frames); biased MD "
          f"{n_steps / wall_b:,.0f} steps/s ({wall_b:.0f} s), plain MD {n_steps / wall_p:,.0f} steps/s ({wall_p:.0f} s)")
    print(f"reweighting: ESS {rw.ess:,.0f} ({100 * rw.ess_fraction:.1f} % of the frames)")
    print()
    print("| run | phi > 0 | alpha_R | beta/C7eq | KLD to reference (100 x 100) |")
    print("|---|---|---|---|---|")
    print(f"| reference (WT-metaD) | {ref_pop['phi_pos']:.4f} | {ref_pop['alpha_R']:.3f} | {ref_pop['beta_C7eq']:.3f} | - |")
    print(f"| exp(-A) of the PMF used for the bias | {pmf_pop['phi_pos']:.4f} | {pmf_pop['alpha_R']:.3f} | "
          f"{pmf_pop['beta_C7eq']:.3f} | {metrics.forward_kld(reference['probabilities'], metrics.pmf_to_probabilities(grid_A)):.4f} |")
    print(f"| biased MD, reweighted | {pop_b['phi_pos']:.4f} +- {err_b['phi_pos']:.4f} | {pop_b['alpha_R']:.3f} +- "
          f"{err_b['alpha_R']:.3f} | {pop_b['beta_C7eq']:.3f} | {kld_b:.4f} |")
    print(f"| biased MD, raw (not reweighted) | {raw_b['phi_pos']:.3f} | {raw_b['alpha_R']:.3f} | {raw_b['beta_C7eq']:.3f} | - |")
    print(f"| plain MD | {pop_p['phi_pos']:.4f} +- {err_p['phi_pos']:.4f} | {pop_p['alpha_R']:.3f} +- "
          f"{err_p['alpha_R']:.3f} | {pop_p['beta_C7eq']:.3f} | {kld_p:.4f} |")
    print()
    ok_b, ok_p = rel_b <= 0.2, rel_p > 0.2
    print(f"phi > 0: biased + reweighted off by {100 * rel_b:.1f} % ({'within' if ok_b else 'NOT within'} 20 %); "
          f"plain MD off by {100 * rel_p:.1f} % ({'does not reach' if ok_p else 'also reaches'} it)")
    meta = dict(command=" ".join(["benchmarks/biased_md.py"] + (argv if argv is not None else sys.argv[1:])),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=f"{_platform.machine()} {os.cpu_count()} cores",
                openmm=openmm.__version__, torch=torch.__version__, backend=args.backend or "default", ns_per_run=ns, frames=len(s_b),
                biased_steps_per_s=n_steps / wall_b, plain_steps_per_s=n_steps / wall_p, biased_wall_s=wall_b,
                plain_wall_s=wall_p, ess=rw.ess, ess_fraction=rw.ess_fraction, reference=ref_pop, pmf_exp_minus_A=pmf_pop,
                biased_reweighted=pop_b, biased_block_se=err_b, biased_raw=raw_b, plain=pop_p, plain_block_se=err_p,
                kld_biased_reweighted=kld_b, kld_plain=kld_p, phi_pos_rel_error_biased=rel_b,
                phi_pos_rel_error_plain=rel_p, success=bool(ok_b and ok_p), wall_s=time.time() - t_start)
    print(f"total wall {meta['wall_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)
    if tmp is not None:
        os.remove(args.pmf)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
