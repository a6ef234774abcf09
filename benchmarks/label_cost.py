"""Where labelling time goes, flow against energy: does shipping labels to cluster workers pay?

Free-energy labels at M CG points x N flow samples (the active-learning default: 256 samples per point) with
the committed alanine-dipeptide flow (``benchmarks/data/aldp_al/flow.pt``). The energy bridge is wrapped by a
timer, so the labelling wall time splits into energy evaluation (what the Dask executor already distributes)
and the rest (flow sampling, the internal-coordinate transform and importance weights, all on the client).
From the measured split, Amdahl's law gives the labelling time on W cluster workers with the flow on the
client (today) and with whole label tasks on the workers (flow shipped once per iteration), and the share of
an iteration that labelling is (from the profile in RESULTS.md), which is what shipping could save at most.

  OMP_NUM_THREADS=1 python benchmarks/label_cost.py --points 40 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from openmm_cgflow.bridge import EnergyBridge
from openmm_cgflow.free_energy import free_energy
from openmm_cgflow.model_io import load_model

HERE = os.path.dirname(os.path.abspath(__file__))


class TimedEnergy:
    """An energy object for free_energy that times the bridge and passes everything through."""

    def __init__(self, bridge):
        self.bridge = bridge
        self.seconds = 0.0

    @property
    def n_evaluations(self) -> int:
        return self.bridge.n_evaluations

    def energy(self, x):
        t0 = time.perf_counter()
        try:
            return self.bridge.energy(x)
        finally:
            self.seconds += time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", default=os.path.join(HERE, "data", "aldp_al", "flow.pt"))
    ap.add_argument("--points", type=int, default=40, help="CG points to label")
    ap.add_argument("--samples", type=int, default=256, help="flow samples per point")
    ap.add_argument("--workers", type=int, default=2, help="local energy worker processes")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    flow, cgsystem = load_model(args.flow)
    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(args.points, cgsystem.n_cg, generator=gen, dtype=torch.float64) * 2 - 1) * torch.pi
    with EnergyBridge(cgsystem.system, cgsystem.temperature, n_workers=args.workers) as bridge:
        free_energy(flow, cgsystem, bridge, s[:2], 64, generator=gen)  # warm-up (workers, first calls)
        timed = TimedEnergy(bridge)
        t0 = time.perf_counter()
        labels = free_energy(flow, cgsystem, timed, s, args.samples, generator=gen)
        wall = time.perf_counter() - t0
    n = labels.n_evaluations
    t_energy, t_client = timed.seconds, wall - timed.seconds
    out = {"points": args.points, "samples_per_point": args.samples, "evaluations": n, "wall_s": wall,
           "energy_s": t_energy, "client_s": t_client, "workers": args.workers,
           "client_us_per_sample": 1e6 * t_client / n, "energy_us_per_sample_on_workers": 1e6 * t_energy / n}
    # Amdahl: energy time scales with workers (it ran on args.workers processes), the client's part does not.
    e1 = t_energy * args.workers / n  # seconds per evaluation on one worker
    c1 = t_client / n
    model = {}
    for w in (8, 64, 512):
        today = c1 + e1 / w
        shipped = (c1 + e1) / w
        model[w] = {"client_flow_s_per_1e5": 1e5 * today, "shipped_s_per_1e5": 1e5 * shipped,
                    "speedup_of_labelling": today / shipped}
    out["model_per_1e5_label_samples"] = model
    print(f"{n:,} label samples ({args.points} points x {args.samples}) in {wall:.2f} s on {args.workers} energy "
          f"workers: energy {t_energy:.2f} s ({100 * t_energy / wall:.0f} %), client (flow, transform, weights) "
          f"{t_client:.2f} s ({100 * t_client / wall:.0f} %)")
    print(f"per sample: client {1e6 * c1:.0f} us, energy {1e6 * e1:.0f} us on one worker")
    for w, m in model.items():
        print(f"model, {w} workers: labelling 1e5 samples {m['client_flow_s_per_1e5']:.2f} s with the flow on the client, "
              f"{m['shipped_s_per_1e5']:.3f} s with label tasks on the workers ({m['speedup_of_labelling']:.0f}x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
