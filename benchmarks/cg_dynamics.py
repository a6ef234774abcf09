"""CG-walker throughput: the pmf.pt ensemble in OpenMM (TorchForce; Reference and CPU platforms) against the same
ensemble in a pure-torch Langevin loop, for 1, 100, 1,000 and 10,000 walkers; and walker throughput against the
number d of CG coordinates (--dims, default d = 2 and 6, 1,000 walkers, TorchForce and PythonForce).

Both sides integrate the same equations with the same scheme: OpenMM's LangevinMiddleIntegrator (BAOAB with
the force at the start of the step: v += dt F/m; x += dt/2 v; v = a v + sqrt(1 - a^2) sqrt(kT/m) R; x += dt/2 v;
one force evaluation per step), dt = 0.02 ps, friction 2/ps, mass kT / (1 nm/ps)^2 (the plugin's defaults),
float64, on the module TorchForce runs (CGWalkerEnergyPBC wrapping the loaded pmf.pt, scripted). Every walker
is ceil(d / 3) 3-D particles on both sides (one for d <= 3; unused coordinates feel no force). The figure is
walker-steps per second of the stepping alone (no frames written); set-up and a warm-up are excluded. Rounds are
interleaved (every configuration once per round, in turn) and the best round is reported, so a load spike from
other jobs hits one round of every configuration rather than one configuration.

    OMP_NUM_THREADS=1 python benchmarks/cg_dynamics.py                 # ~3-5 min
    python benchmarks/cg_dynamics.py --quick                           # ~20 s smoke run
    python benchmarks/cg_dynamics.py --pmf runs/ala2/pmf.pt --json out.json
    python benchmarks/cg_dynamics.py --skip-main --dims 2,6 --seconds 1 --rounds 2   # only the d table, ~1 min

PMF: --pmf, or (default) an ensemble of 10 MLPs [64, 64] fitted to the packaged alanine-dipeptide reference
by openmm_cgflow.reference_pmf.fit_to_reference (the architecture, not the fit quality, sets the cost). The d table
uses unfitted ensembles of the same architecture (10 MLPs [64, 64] on (cos, sin) of d periodic coordinates).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as _platform
import sys
import tempfile
import time

import numpy as np
import openmm
import torch

from openmm_cgflow_plugin import CGDynamics, CGSpace, load_pmf
from openmm_cgflow_plugin.dynamics import DEFAULT_FRICTION_PER_PS, DEFAULT_TIMESTEP_PS
from openmm_cgflow_plugin.forces import walker_positions
from openmm_cgflow_plugin.modules import CGWalkerEnergyPBC


class TorchLangevin:
    """Pure-torch LangevinMiddle integrator for W walkers on the PMF module (same scheme and constants as OpenMM)."""

    def __init__(self, pmf, s0: np.ndarray, seed: int = 0, dtype=torch.float64):
        self.energy = torch.jit.script(CGWalkerEnergyPBC(pmf.module, pmf.n_cg, pmf.periodic, pmf.kT))
        self.box = torch.eye(3, dtype=dtype) * 2 * math.pi
        self.dt = DEFAULT_TIMESTEP_PS
        self.mass = pmf.kT                                # amu: kT / (1 nm/ps)^2, as walker_mass()
        self.a = math.exp(-DEFAULT_FRICTION_PER_PS * self.dt)
        self.b = math.sqrt(1.0 - self.a * self.a) * math.sqrt(pmf.kT / self.mass)
        self.gen = torch.Generator().manual_seed(seed)
        self.x = torch.as_tensor(walker_positions(s0, pmf.periodic), dtype=dtype)    # [W * ceil(d / 3), 3]
        self.v = torch.randn(self.x.shape, generator=self.gen, dtype=dtype) * math.sqrt(pmf.kT / self.mass)
        self.f = self.forces(self.x)

    def forces(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        e = self.energy(x, self.box)
        (g,) = torch.autograd.grad(e, x)
        return -g

    def step(self, n: int) -> None:
        x, v, f = self.x, self.v, self.f
        half = 0.5 * self.dt
        for _ in range(n):
            v = v + (self.dt / self.mass) * f
            x = x + half * v
            v = self.a * v + self.b * torch.randn(v.shape, generator=self.gen, dtype=v.dtype)
            x = x + half * v
            f = self.forces(x)
        self.x, self.v, self.f = x, v, f


class OpenMMWalkers:
    def __init__(self, pmf_path, s0, platform: str, seed: int = 0, backend=None):
        self.dyn = CGDynamics(pmf_path, s0, platform=platform, seed=seed, properties={"Threads": "1"}
                              if platform == "CPU" else None, backend=backend)

    def step(self, n: int) -> None:
        self.dyn.simulation.step(n)


def make_runner(method: str, pmf_path: str, pmf, s0, seed: int):
    """``torch`` (pure-torch loop), ``openmm-PLATFORM`` (TorchForce) or ``openmm-PLATFORM-python`` (PythonForce)."""
    if method == "torch":
        return TorchLangevin(pmf, s0, seed)
    parts = method.split("-")
    return OpenMMWalkers(pmf_path, s0, parts[1], seed, backend=parts[2] if len(parts) > 2 else None)


def timed(runner, n_steps: int) -> float:
    t = time.perf_counter()
    runner.step(n_steps)
    return time.perf_counter() - t


def measure(runners: dict, steps: dict, rounds: int, t_start: float):
    """Best and per-round walker-steps/s of each runner (keys (method, walkers, ...)), rounds interleaved."""
    best = {k: 0.0 for k in runners}
    per_round = {k: [] for k in runners}
    for rnd in range(rounds):
        for key, runner in runners.items():
            n = steps[key]
            rate = key[1] * n / timed(runner, n)
            per_round[key].append(rate)
            best[key] = max(best[key], rate)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"round {rnd + 1}/{rounds} done ({time.time() - t_start:.0f} s, load {load:.1f})", flush=True)
    return best, per_round


def calibrated(runner, seconds: float) -> int:
    """Warm up ``runner`` (TorchScript profiling runs, first-call allocations) and return the step count of a
    timed run of about ``seconds``."""
    runner.step(3)
    n = 3
    while True:
        dt = timed(runner, n)
        if dt > 0.2 * seconds or n >= 10**7:
            break
        n *= 4
    return max(1, int(n * seconds / max(dt, 1e-6)))


def random_ensemble_pmf(d: int, path: str, seed: int = 0) -> str:
    """A pmf.pt of an unfitted ensemble of 10 MLPs [64, 64] on d periodic CG coordinates (cost as a fitted one)."""
    from openmm_cgflow.ensemble import PMFEnsemble, export_pmf

    ens = PMFEnsemble([True] * d, n_models=10, hidden=(64, 64))
    ens.reset_parameters(torch.Generator().manual_seed(seed))
    return export_pmf(ens, path, CGSpace([f"x{k}" for k in range(d)], [True] * d, 300.0))


def dims_table(args, t_start: float) -> list:
    """Walker-steps/s against the number d of CG coordinates (``args.dims``), ``args.dims_walkers`` walkers."""
    dims = [int(d) for d in args.dims.split(",")]
    methods = args.dims_methods.split(",")
    w = int(args.dims_walkers)
    folder = tempfile.mkdtemp(prefix="cgbench-d-")
    runners, steps = {}, {}
    for d in dims:
        path = random_ensemble_pmf(d, os.path.join(folder, f"pmf{d}.pt"), args.seed)
        pmf = load_pmf(path)
        s0 = np.random.default_rng(args.seed).uniform(-math.pi, math.pi, size=(w, d))
        for m in methods:
            r = make_runner(m, path, pmf, s0, args.seed)
            runners[(m, w, d)] = r
            steps[(m, w, d)] = calibrated(r, args.seconds)
    best, per_round = measure(runners, steps, args.rounds, t_start)
    print(f"\nwalker throughput against d ({w:,} walkers, ceil(d / 3) particles each; walker-steps/s)\n")
    print("| d | particles per walker | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    rows = []
    for d in dims:
        print(f"| {d} | {(d + 2) // 3} | " + " | ".join(f"{best[(m, w, d)]:,.0f}" for m in methods) + " |")
        rows.append({"d": d, "walkers": w, **{m: best[(m, w, d)] for m in methods},
                     "rounds": {m: per_round[(m, w, d)] for m in methods}})
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    return rows


def main_table(args, t_start: float):
    """The OpenMM-vs-torch table over ``args.walkers`` on ``args.pmf`` (fitted here if None): (rows, pmf name)."""
    walkers = [int(w) for w in args.walkers.split(",")]
    methods = args.methods.split(",")

    tmp = None
    if args.pmf is None:
        from openmm_cgflow.ensemble import export_pmf
        from openmm_cgflow.reference_pmf import fit_to_reference

        t = time.perf_counter()
        ens, kw = fit_to_reference("alanine-dipeptide", steps=200 if args.quick else 3000)
        tmp = tempfile.mkdtemp(prefix="cgbench-")
        args.pmf = export_pmf(ens, os.path.join(tmp, "pmf.pt"), **kw)
        print(f"fitted the PMF ensemble (10 x [64, 64]) in {time.perf_counter() - t:.1f} s", flush=True)
    pmf = load_pmf(args.pmf)

    rng = np.random.default_rng(args.seed)
    runners, steps = {}, {}
    for w in walkers:
        s0 = rng.uniform(-math.pi, math.pi, size=(w, pmf.n_cg))
        for m in methods:
            r = make_runner(m, args.pmf, pmf, s0, args.seed)
            steps[(m, w)] = calibrated(r, args.seconds)
            runners[(m, w)] = r
    best, per_round = measure(runners, steps, args.rounds, t_start)
    print()
    print("| walkers | " + " | ".join(methods) + " | OpenMM Reference / torch | OpenMM CPU / torch |")
    print("|---|" + "---|" * (len(methods) + 2))
    rows = []
    for w in walkers:
        cells = [f"{best[(m, w)]:,.0f}" for m in methods]
        ratio = []
        for m in ("openmm-Reference", "openmm-CPU"):
            if (m, w) in best and ("torch", w) in best:
                ratio.append(f"{best[(m, w)] / best[('torch', w)]:.2f}x")
            else:
                ratio.append("-")
        print(f"| {w:,} | " + " | ".join(cells) + " | " + " | ".join(ratio) + " |")
        rows.append({"walkers": w, **{m: best[(m, w)] for m in methods},
                     "rounds": {m: per_round[(m, w)] for m in methods}})
    name = os.path.basename(args.pmf)
    if tmp is not None:
        os.remove(args.pmf)
        os.rmdir(tmp)
    return rows, name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 and 100 walkers, short rounds")
    ap.add_argument("--pmf", default=None, help="pmf.pt to use (default: fit one to the packaged reference)")
    ap.add_argument("--walkers", default="1,100,1000,10000")
    ap.add_argument("--methods", default="openmm-Reference,openmm-CPU,torch",
                    help="comma-separated: torch, openmm-PLATFORM (TorchForce), openmm-PLATFORM-python (PythonForce)")
    ap.add_argument("--seconds", type=float, default=3.0, help="target duration of one timed run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--dims", default="2,6", help="CG dimensions of the throughput-against-d table ('' skips it)")
    ap.add_argument("--dims-walkers", type=int, default=1000, help="walkers per configuration of the d table")
    ap.add_argument("--dims-methods", default="openmm-Reference,openmm-Reference-python",
                    help="methods of the d table (as --methods)")
    ap.add_argument("--skip-main", action="store_true", help="only the d table")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.walkers, args.seconds, args.rounds = "1,100,1000", 0.5, 2
    t_start = time.time()
    rows, pmf_name = main_table(args, t_start) if not args.skip_main else ([], None)
    dim_rows = dims_table(args, t_start) if args.dims else []
    meta = dict(command=" ".join(["benchmarks/cg_dynamics.py"] + (argv if argv is not None else sys.argv[1:])),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=f"{_platform.machine()} {os.cpu_count()} cores",
                openmm=openmm.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                pmf=pmf_name, seconds_per_run=args.seconds, rounds=args.rounds,
                wall_s=time.time() - t_start, dtype="float64", timestep_ps=DEFAULT_TIMESTEP_PS,
                friction_per_ps=DEFAULT_FRICTION_PER_PS)
    print(f"\nwall {meta['wall_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "dims_rows": dim_rows}, fh, indent=1)


if __name__ == "__main__":
    main()
