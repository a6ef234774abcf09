"""Backmapping throughput for alanine dipeptide: CG frames per second through `backmap_file`, end to end.

One row per (flow, samples per CG frame): flow sampling, internal -> Cartesian coordinates, OpenMM energies
through the EnergyBridge (the importance weights), the chirality check, superposition onto the reference and
writing DCD + weights, timed as `cgflow backmap` runs them (the bridge's worker start-up is reported apart).
A second table splits one chunk of 4,096 samples into its parts.

    python benchmarks/backmap.py                       # default-size flow (8 x [192, 192], float64), 2,000 frames
    python benchmarks/backmap.py --flow runs/ala2      # also a trained run's flow.pt
    python benchmarks/backmap.py --quick               # a few hundred frames, seconds

CG frames: (phi, psi) drawn from the packaged reference PMF (exp(-A) on its 100 x 100 grid). The cost of a
flow does not depend on its training, so an untrained default-size flow times the production size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from openmm_cgflow.alanine_dipeptide import alanine_dipeptide
from openmm_cgflow.alignment import alignment_atoms, superpose
from openmm_cgflow.backmap_output import TrajectoryWriter, backmap_file
from openmm_cgflow.backmapping import backmap
from openmm_cgflow.bridge import EnergyBridge
from openmm_cgflow.cg_input import md_topology
from openmm_cgflow.flow import flow_for
from openmm_cgflow.metrics import load_reference, reference_grid_points
from openmm_cgflow.model_io import load_model
from openmm_cgflow_plugin.cgspace import wrap_periodic


def equilibrium_cg_frames(n: int, seed: int = 0) -> np.ndarray:
    """n (phi, psi) points [n, 2] (radians) drawn from the packaged reference: a bin by its probability, then
    uniform within the bin."""
    ref = load_reference("alanine-dipeptide")
    p = np.asarray(ref["probabilities"], dtype=np.float64).ravel()
    pts = reference_grid_points(ref)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(p), size=n, p=p / p.sum())
    width = 2 * np.pi / int(round(np.sqrt(len(p))))
    return wrap_periodic(pts[idx] + rng.uniform(-0.5, 0.5, size=(n, 2)) * width, [True, True])


def time_backmap_file(flow, cgsystem, s, n_per_frame, bridge, batch_size, folder) -> dict:
    out = os.path.join(folder, f"bench_{n_per_frame}.dcd")
    t0 = time.perf_counter()
    summary = backmap_file((flow, cgsystem), s, out, n_per_frame=n_per_frame, progress=False, bridge=bridge,
                             batch_size=batch_size)
    wall = time.perf_counter() - t0
    size = os.path.getsize(out) + os.path.getsize(out + ".weights.npz")
    return dict(n_frames=len(s), n_per_frame=n_per_frame, samples=summary.n_drawn, wall_s=wall,
                frames_per_s=len(s) / wall, samples_per_s=summary.n_drawn / wall,
                mean_frame_ess=summary.mean_frame_ess, wrong_chirality=summary.n_wrong_chirality,
                written=summary.n_written, mb_written=size / 2**20)


def time_parts(flow, cgsystem, s, bridge, n=4096, repeats=2) -> dict:
    """Seconds per sample of each stage for one chunk of n samples (best of ``repeats``)."""
    coords = cgsystem.coordinates
    s64 = torch.as_tensor(np.resize(s, (n, 2)))
    ref = np.asarray(cgsystem.positions) - np.asarray(cgsystem.positions).mean(axis=0)
    heavy = alignment_atoms(cgsystem, True)
    best = {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(repeats):
        t = {}
        with torch.no_grad():
            t0 = time.perf_counter()
            fine, log_q = flow.sample(s64.to(flow.dtype), generator=gen)
            t["flow sample + log q"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            x, log_det = coords.to_cartesian(fine.to(torch.float64), s64)
            t["internal -> Cartesian"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            bridge.energy(x)
            t["OpenMM energies (bridge)"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            coords.chirality_ok(x)
            t["chirality check"] = time.perf_counter() - t0
        xn = x.numpy()
        t0 = time.perf_counter()
        xs = superpose(xn, ref, heavy).astype(np.float32)
        t["superposition"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            w = TrajectoryWriter(os.path.join(d, "parts.dcd"), md_topology(cgsystem))
            t0 = time.perf_counter()
            w.write(xs)
            w.close()
            t["DCD write"] = time.perf_counter() - t0
        for k, v in t.items():
            best[k] = min(best.get(k, np.inf), v)
    return {k: v / n for k, v in best.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", help="a trained model: run directory or flow.pt (timed in addition)")
    ap.add_argument("--frames", type=int, default=2000, help="CG frames per row (default 2000)")
    ap.add_argument("--per-frame", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--workers", type=int, default=None, help="energy worker processes (default: every core)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="300 frames per row")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames = min(args.frames, 300)
    torch.set_num_threads(args.threads)

    aldp = alanine_dipeptide()
    flows = [("default, 8 x [192, 192], float64 (untrained)", flow_for(aldp))]
    if args.flow:
        f, system = load_model(args.flow)
        if system.n_atoms != aldp.n_atoms or list(system.cg_names) != list(aldp.cg_names):
            raise SystemExit(f"{args.flow} is not an alanine-dipeptide (phi, psi) model")
        hp = f.hparams
        flows.append((f"{args.flow}: {hp['n_layers']} x {hp['hidden']}, {str(f.dtype).replace('torch.', '')}", f))
    s = equilibrium_cg_frames(args.frames)
    t0 = time.perf_counter()
    bridge = EnergyBridge(aldp.system, aldp.temperature, n_workers=args.workers)
    startup = time.perf_counter() - t0
    n_workers = bridge.n_workers
    rows, parts = [], {}
    try:
        # warm-up (first calls allocate)
        backmap(s[:16], flows[0][1], aldp, n_per_frame=2, bridge=bridge)
        with tempfile.TemporaryDirectory() as folder:
            for name, flow in flows:
                for n in args.per_frame:
                    r = time_backmap_file(flow, aldp, s, n, bridge, args.batch_size, folder)
                    r["flow"] = name
                    rows.append(r)
                    print(f"{name:50s} n_per_frame {n}: {r['frames_per_s']:8.1f} frames/s "
                          f"({r['samples_per_s']:7.0f} samples/s, {r['wall_s']:.1f} s)", flush=True)
                parts[name] = time_parts(flow, aldp, s, bridge)
    finally:
        bridge.close()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} thread(s); "
          f"EnergyBridge with {n_workers} worker(s) (start-up {startup:.2f} s, not in the rows); "
          f"batch_size {args.batch_size}; load average {load:.1f}")
    print(f"\n| flow | samples per CG frame | CG frames | samples | wall (s) | CG frames/s | samples/s | mean ESS per frame |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['flow']} | {r['n_per_frame']} | {r['n_frames']:,} | {r['samples']:,} | {r['wall_s']:.2f} | "
              f"{r['frames_per_s']:,.0f} | {r['samples_per_s']:,.0f} | {r['mean_frame_ess']:.2f} |")
    print("\nOne chunk of 4,096 samples, stage by stage (microseconds per sample, best of 2):\n")
    names = list(parts)
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for stage in next(iter(parts.values())):
        print(f"| {stage} | " + " | ".join(f"{parts[n][stage] * 1e6:.1f}" for n in names) + " |")
    print("| total | " + " | ".join(f"{sum(parts[n].values()) * 1e6:.1f}" for n in names) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, parts_s_per_sample=parts, bridge_workers=n_workers,
                           bridge_startup_s=startup, load_average=load, argv=sys.argv[1:],
                           date=time.strftime("%Y-%m-%d %H:%M:%S %Z")), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
