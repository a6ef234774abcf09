"""Throughput of the OpenMM energy bridge for alanine dipeptide (energy + forces per second).

Compares, in one run on the same configurations:

* a plain Python loop over one OpenMM Context (Reference platform): setPositions, getState(energy, forces),
  value_in_unit -- what a user would write without the package;
* ``openmm_cgflow.bridge.EnergyBridge.energy_and_forces`` with n_workers = 0, 1 (both in-process: one
  worker process would only add transfer cost) and 2 (one worker process with its own Context per core),
  at several batch sizes;
* the autograd plumbing: ``EnergyBridge.energy(x)`` on a torch tensor with ``requires_grad`` followed by
  ``backward()`` against ``energy_and_forces`` alone on the same batch (the gradient reuses the forces of
  the same call: no second evaluation, so the overhead is tensor conversion only).

Configurations: the reference structure plus Gaussian noise of 0.005 nm per coordinate (finite energies,
a realistic spread of forces). Rates are evaluations/s; each figure is the best of ``--rounds`` rounds of
at least ``--seconds`` each (rounds interleave the methods so that load changes hit all of them alike).
The machine is shared: the 1-, 5- and 15-minute load averages are printed before and after.

Usage:
    python benchmarks/energy_bridge.py [--quick] [--batches 256 4096] [--workers 0 1 2] [--rounds 3]
        [--seconds 2] [--json benchmarks/data/energy_bridge.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import openmm  # noqa: E402
import openmm.unit as unit  # noqa: E402
import torch  # noqa: E402

from openmm_cgflow.bridge import EnergyBridge  # noqa: E402
from openmm_cgflow.alanine_dipeptide import alanine_dipeptide  # noqa: E402

_KJ = unit.kilojoule_per_mole
_FORCE = unit.kilojoule_per_mole / unit.nanometer


def _rate(fn, n_per_call: int, seconds: float) -> float:
    """Evaluations/s of fn() (n_per_call evaluations per call), timed for at least ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += n_per_call
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="one round of 0.5 s per figure")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 0.5
    torch.set_num_threads(1)

    aldp = alanine_dipeptide()
    rng = np.random.default_rng(0)
    n_conf = max(args.batches)
    xyz = aldp.positions[None] + 0.005 * rng.standard_normal((n_conf, aldp.n_atoms, 3))
    load_before = os.getloadavg()
    print(f"machine: {_platform.machine()}, {os.cpu_count()} cores; OpenMM {openmm.__version__}, torch {torch.__version__}")
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    # --- plain loop over one Context (the baseline)
    context = openmm.Context(aldp.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    loop_batch = min(1024, n_conf)

    def plain_loop():
        for i in range(loop_batch):
            context.setPositions(xyz[i])
            state = context.getState(getEnergy=True, getForces=True)
            state.getPotentialEnergy().value_in_unit(_KJ)
            state.getForces(asNumpy=True).value_in_unit(_FORCE)

    # --- bridges (start-up time measured, not part of the rates)
    bridges, startup = {}, {}
    for w in args.workers:
        t0 = time.perf_counter()
        bridges[w] = EnergyBridge(aldp.system, aldp.temperature, n_workers=w)
        startup[w] = time.perf_counter() - t0
        bridges[w].energy_and_forces(xyz[:256])  # warm-up (first call pays lazy initialisation)

    def bridge_call(w, b):
        return lambda: bridges[w].energy_and_forces(xyz[:b])

    def autograd_call(w, b):
        def fn():
            x = torch.as_tensor(xyz[:b]).requires_grad_(True)
            u = bridges[w].energy(x)
            u.sum().backward()
        return fn

    results = {"plain_loop": []}
    keys = [(w, b) for w in args.workers for b in args.batches]
    for key in keys:
        results[f"bridge w={key[0]} b={key[1]}"] = []
    auto_keys = [(w, b) for w in sorted({min(args.workers), max(args.workers)}) for b in args.batches]
    for key in auto_keys:
        results[f"autograd w={key[0]} b={key[1]}"] = []
        results[f"plain w={key[0]} b={key[1]}"] = []

    for r in range(args.rounds):
        results["plain_loop"].append(_rate(plain_loop, loop_batch, args.seconds))
        for w, b in keys:
            results[f"bridge w={w} b={b}"].append(_rate(bridge_call(w, b), b, args.seconds))
        for w, b in auto_keys:
            # interleaved pairs for the overhead ratio
            results[f"plain w={w} b={b}"].append(_rate(bridge_call(w, b), b, args.seconds))
            results[f"autograd w={w} b={b}"].append(_rate(autograd_call(w, b), b, args.seconds))
        print(f"round {r + 1}/{args.rounds} done; load {os.getloadavg()[0]:.2f}", flush=True)

    for bridge in bridges.values():
        bridge.close()
    load_after = os.getloadavg()
    best = {k: max(v) for k, v in results.items()}
    base = best["plain_loop"]

    print()
    print(f"Plain loop over one Reference Context: {base:,.0f} evaluations/s (best of {args.rounds})")
    print()
    print("| method | n_workers | batch | evaluations/s | vs one-Context loop | start-up (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| plain loop, one Context | - | {loop_batch} | {base:,.0f} | 1.00x | - |")
    for w, b in keys:
        v = best[f"bridge w={w} b={b}"]
        print(f"| EnergyBridge.energy_and_forces | {w} | {b} | {v:,.0f} | {v / base:.2f}x | {startup[w]:.2f} |")
    print()
    print("| autograd plumbing | n_workers | batch | energy_and_forces (evals/s) | energy + backward (evals/s) | overhead |")
    print("|---|---|---|---|---|---|")
    overhead = {}
    for w, b in auto_keys:
        p, a = best[f"plain w={w} b={b}"], best[f"autograd w={w} b={b}"]
        overhead[f"w={w} b={b}"] = p / a - 1.0
        print(f"| EnergyBridge.energy + backward | {w} | {b} | {p:,.0f} | {a:,.0f} | {100 * (p / a - 1):+.1f} % |")
    print()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rates_all_rounds": results, "best": best, "startup_s": {str(k): v for k, v in startup.items()},
                       "autograd_overhead": overhead, "load_before": load_before, "load_after": load_after,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
