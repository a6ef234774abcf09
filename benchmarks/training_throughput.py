"""Flow training throughput for alanine dipeptide, energy included: float64 vs float32, and where the time goes.

One training step as the Trainer runs it (reverse KL + importance-weighted forward KL at 64 CG points x 16
samples): flow samples with log q, internal -> Cartesian with log|det J|, OpenMM energies and forces through the
EnergyBridge, backward through all of it, Adam step. Reported: samples/s of ``Trainer.train_by_energy`` end to end
(interleaved rounds, best round), and a breakdown of one step into flow forward, coordinate transform, energy,
backward + optimiser (timed separately on the same batch).

    OMP_NUM_THREADS=1 python benchmarks/training_throughput.py            # ~2 min
    python benchmarks/training_throughput.py --threads 2                  # both cores for the flow
    python benchmarks/training_throughput.py --quick
    python benchmarks/training_throughput.py --device cuda              # the flow on a GPU (rates only)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from openmm_cgflow import builtin
from openmm_cgflow.bridge import EnergyBridge
from openmm_cgflow.flow import flow_for, resolve_device
from openmm_cgflow.training import Trainer, reverse_kl_loss

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def end_to_end(cg, bridge, dtype, points, epochs, device="cpu") -> float:
    flow = flow_for(cg, dtype=dtype).to(resolve_device(device))
    tr = Trainer(flow, cg, bridge, samples_per_point=16, points_per_batch=64, forward_weight=0.5, drop_worst=2,
                 progress=False)
    tr.train_by_energy(points[:8], 1)  # warm-up
    t = time.perf_counter()
    tr.train_by_energy(points, epochs)
    return epochs * len(points) * 16 / (time.perf_counter() - t)


def breakdown(cg, bridge, dtype, repeats=3) -> dict:
    flow = flow_for(cg, dtype=dtype)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    s = torch.as_tensor(np.random.default_rng(0).uniform(-np.pi, np.pi, (64, 2))).repeat_interleave(16, 0)
    coords = cg.coordinates
    out = {"flow_forward": 0.0, "transform": 0.0, "energy": 0.0, "backward_and_step": 0.0, "full_step": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        fine, log_q = flow.sample(s.to(dtype))
        t1 = time.perf_counter()
        x, log_det = coords.to_cartesian(fine.to(torch.float64), s)
        t2 = time.perf_counter()
        u = bridge.energy(x)
        t3 = time.perf_counter()
        loss = (log_q.to(torch.float64) + u - log_det).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t4 = time.perf_counter()
        loss, _ = reverse_kl_loss(flow, coords, bridge, s.to(dtype), drop_worst=2, forward_weight=0.5,
                                  samples_per_point=16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t5 = time.perf_counter()
        for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            out[k] += v / repeats
    n = s.shape[0]
    return {k: 1e6 * v / n for k, v in out.items()}  # microseconds per sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="OpenMM energy worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--device", default="cpu", help="where the flow trains: cpu or cuda (the breakdown is CPU only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cg = builtin("alanine-dipeptide")
    bridge = EnergyBridge(cg.system, cg.temperature, n_workers=args.workers)
    points = np.random.default_rng(1).uniform(-np.pi, np.pi, (64 if args.quick else 256, 2))
    epochs, rounds = (1, 1) if args.quick else (2, 3)
    rates = {k: [] for k in DTYPES}
    for _ in range(rounds):
        for name, dt in DTYPES.items():
            rates[name].append(end_to_end(cg, bridge, dt, points, epochs, args.device))
    parts = ({name: breakdown(cg, bridge, dt, 1 if args.quick else 3) for name, dt in DTYPES.items()}
             if args.device == "cpu" else {})
    bridge.close()
    load = os.getloadavg()[0]
    print(f"alanine dipeptide, default flow (8 x [192, 192]), 64 points x 16 samples per step, torch {args.threads} "
          f"thread(s), "
          f"{args.workers} energy workers, flow on {args.device}, load average {load:.1f}")
    print("\n| flow dtype | samples/s end to end (best of rounds) | all rounds |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {max(r):,.0f} | {', '.join(f'{x:,.0f}' for x in r)} |")
    if parts:
        print("\n| microseconds per sample | " + " | ".join(DTYPES) + " |\n|---|---|---|")
    for key in (next(iter(parts.values())) if parts else ()):
        print(f"| {key} | " + " | ".join(f"{parts[n][key]:.0f}" for n in DTYPES) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "threads": args.threads, "rates": rates, "breakdown_us_per_sample": parts, "load_average": load,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, fh, indent=1)


if __name__ == "__main__":
    main()
