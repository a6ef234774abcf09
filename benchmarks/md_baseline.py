"""Plain-MD baseline for alanine dipeptide: forward KLD to the reference vs energy evaluations and wall time.

Same system as the reference (amber96 + OBC, NoCutoff, no constraints, 300 K), LangevinMiddleIntegrator,
one thread. One energy+force evaluation per MD step. (phi, psi) and the non-CG observables of
benchmarks/aldp_common.py are saved every --frame-every steps; the forward KLD of the smoothed (phi, psi)
histogram of all frames so far (openmm_cgflow.metrics.kld_from_samples) is computed at log-spaced
points and every --curve-ns.

Output (``--out``, default benchmarks/data/aldp_md.npz, rewritten every checkpoint, ``partial`` until
the end): time_ps, phi, psi, omega1, omega2, chi_cb, angle_ncac per frame (float32, radians);
curve_steps, curve_energy_evaluations, curve_ns, curve_wall_s, curve_kld; metadata_json.

  python benchmarks/md_baseline.py --quick                 # ~1 min -> aldp_md_quick.npz
  OMP_NUM_THREADS=1 nohup python benchmarks/md_baseline.py --minutes 30 > md.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import sys
import time

import numpy as np
import openmm
import openmm.unit as unit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aldp_common as C  # noqa: E402

from openmm_cgflow import metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1 min smoke run -> aldp_md_quick.npz")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the MD loop")
    ap.add_argument("--max-ns", type=float, default=None)
    ap.add_argument("--platform", default="Reference", help="Reference (fastest here for 22 atoms) or CPU")
    ap.add_argument("--hydrogen-mass", type=float, default=3.0, help="amu; 0 disables HMR")
    ap.add_argument("--dt", type=float, default=2.0, help="fs")
    ap.add_argument("--friction", type=float, default=1.0, help="1/ps")
    ap.add_argument("--frame-every", type=int, default=1000, help="steps between saved frames")
    ap.add_argument("--chunk-steps", type=int, default=50000, help="steps between progress checks")
    ap.add_argument("--curve-ns", type=float, default=1.0, help="KLD curve point every this many ns (plus log-spaced)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--reference", default=None, help="reference npz (default: packaged aldp_reference_pmf.npz)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.hydrogen_mass <= 0:
        args.hydrogen_mass = None
    if args.quick:
        args.minutes = min(args.minutes, 0.7)
        args.chunk_steps = 10000
        args.curve_ns = 0.2
        args.checkpoint_minutes = 100.0
    args.out = args.out or os.path.join(HERE, "data", "aldp_md_quick.npz" if args.quick else "aldp_md.npz")
    if args.chunk_steps % args.frame_every:
        raise SystemExit("chunk-steps must be a multiple of frame-every")
    reference = None
    try:
        reference = metrics.load_reference("alanine-dipeptide", path=args.reference)
    except (FileNotFoundError, OSError) as e:
        print(f"no reference ({e}); KLD curve skipped", flush=True)

    t_start = time.time()
    system, top, pos = C.build_system(args.hydrogen_mass)
    integ = openmm.LangevinMiddleIntegrator(C.TEMPERATURE * unit.kelvin, args.friction / unit.picosecond,
                                            args.dt * unit.femtosecond)
    integ.setRandomNumberSeed(args.seed)
    plat, props = C.make_platform(args.platform)
    ctx = openmm.Context(system, integ, plat, props)
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, maxIterations=500)
    ctx.setVelocitiesToTemperature(C.TEMPERATURE * unit.kelvin, args.seed)

    keys = ("phi", "psi", *C.OBSERVABLES)
    frames = {k: [] for k in ("time_ps", *keys)}
    curve = {k: [] for k in ("steps", "energy_evaluations", "ns", "wall_s", "kld")}
    steps, md_wall = 0, 0.0
    log_points = sorted({int(round(x)) for x in np.logspace(np.log10(5e4), np.log10(1e9), 40)})
    next_curve = args.curve_ns * 1e6 / args.dt

    def add_curve_point():
        if reference is None or len(frames["phi"]) < 10:
            return
        s = np.stack([frames["phi"], frames["psi"]], 1)
        k = metrics.kld_from_samples(s, reference)
        for key, v in zip(curve, (steps, steps, steps * args.dt * 1e-6, md_wall, k)):
            curve[key].append(v)

    def write(partial: bool) -> dict:
        meta = dict(command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), partial=partial,
                    platform=args.platform, threads=1, machine=f"{_platform.node()} {os.cpu_count()} cores, no GPU",
                    openmm_version=openmm.__version__,
                    forcefield="amber96.xml + amber96_obc.xml, NoCutoff, no constraints",
                    temperature_K=C.TEMPERATURE, integrator="LangevinMiddleIntegrator", friction_per_ps=args.friction,
                    dt_fs=args.dt, hydrogen_mass_amu=args.hydrogen_mass, seed=args.seed,
                    frame_every_steps=args.frame_every, ns=steps * args.dt * 1e-6, energy_evaluations=steps,
                    md_wall_s=md_wall, wall_s=time.time() - t_start, steps_per_s=steps / max(md_wall, 1e-9),
                    written=time.strftime("%Y-%m-%d %H:%M:%S"), observables=C.OBSERVABLES,
                    reference=str(args.reference or "packaged aldp_reference_pmf.npz"))
        if frames["phi"]:
            s = np.stack([frames["phi"], frames["psi"]], 1)
            meta["populations"] = metrics.basin_populations(metrics.torus_histogram(s, smooth=False))
        if curve["kld"]:
            meta["final_kld"] = curve["kld"][-1]
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in frames.items()}
        arrays.update({f"curve_{k}": np.asarray(v, dtype=np.float64) for k, v in curve.items()})
        C.save_npz_atomic(args.out, partial=np.bool_(partial), metadata_json=np.array(json.dumps(meta)), **arrays)
        return meta

    budget = args.minutes * 60.0
    last_ckpt = time.time()
    while True:
        for _ in range(args.chunk_steps // args.frame_every):
            t = time.perf_counter()
            integ.step(args.frame_every)
            x = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            md_wall += time.perf_counter() - t
            steps += args.frame_every
            obs = C.frame_observables(x[None])
            frames["time_ps"].append(steps * args.dt * 1e-3)
            for k in keys:
                frames[k].append(float(obs[k][0]))
            if steps >= next_curve or (log_points and steps >= log_points[0]):
                add_curve_point()
                while log_points and steps >= log_points[0]:
                    log_points.pop(0)
                while steps >= next_curve:
                    next_curve += args.curve_ns * 1e6 / args.dt
        ns = steps * args.dt * 1e-6
        kl = f"  KLD {curve['kld'][-1]:.4f}" if curve["kld"] else ""
        print(f"[{(time.time() - t_start) / 60:6.1f} min] {ns:.2f} ns, {steps / md_wall:.0f} steps/s{kl}", flush=True)
        if md_wall >= budget or (args.max_ns is not None and ns >= args.max_ns):
            break
        if time.time() - last_ckpt >= args.checkpoint_minutes * 60.0:
            write(partial=True)
            last_ckpt = time.time()
    add_curve_point()
    meta = write(partial=False)
    print(json.dumps(meta, indent=1, default=float), flush=True)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
