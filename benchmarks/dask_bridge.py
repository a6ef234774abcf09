"""The energy bridge through local worker processes against a Dask cluster, and a scaling model.

In one run, on the same configurations (reference structure + 0.005 nm Gaussian noise per coordinate):

* evaluations/s (energy + forces) of ``EnergyBridge.energy_and_forces`` through the local worker
  processes (``n_workers=W``) and through a Dask ``LocalCluster`` of W worker processes (1 thread each)
  on the same cores, at batch 256 and 4096; in-process (one Context, no transfer) as the per-core
  baseline. Rounds interleave the methods; each rate is the best of ``--rounds`` rounds of at least
  ``--seconds`` each, and the Dask overhead is also given as the median over rounds of the local/Dask
  ratio within a round (the machine is shared; load averages are printed);
* per-chunk latency: a chunk of 1 configuration through each executor (median of repeats), the serial
  cost per chunk (many 1-configuration chunks in one batch) and the transfer cost per configuration (an
  echo actor on a worker: chunks of 2048 and of 1 configuration);
* the same for a ~4x larger system: 4 copies of alanine dipeptide in one System (88 atoms, NoCutoff,
  OBC), a stand-in for a molecule of ~90 atoms;
* from those figures, a MODEL of the throughput at 8, 64 and 512 Dask workers (below).

Scaling model (labelled as such in the output; not a measurement). A batch of B configurations is split
into n_c = min(k W, B // min_chunk) chunks of c = B / n_c (k = chunks per worker), which the W workers
evaluate in r = ceil(n_c / W) rounds. Its wall time is

    T(B, W) = L + n_c * s + r * c * t_e + B * t_x

with L the fixed per-batch latency (a 1-configuration chunk's round trip minus its evaluation), s the
serial client cost per chunk (one actor call), t_e the evaluation time per configuration on one core and t_x
the transfer (serialisation) cost per configuration, counted as serial (the client sends and receives
every chunk), which is pessimistic. Throughput = B / T; ideal = W / t_e. It ignores network latency and bandwidth beyond the
loopback interface (add ~0.1-1 ms to L and B * bytes / bandwidth to the serial part on a real cluster).

Usage:
    python benchmarks/dask_bridge.py [--quick] [--workers 2] [--batches 256 4096] [--rounds 5] [--seconds 1.5]
        [--json benchmarks/data/dask_bridge.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import openmm  # noqa: E402
import openmm.app as app  # noqa: E402
import openmm.unit as unit  # noqa: E402

import openmm_cgflow  # noqa: E402
from openmm_cgflow import EnergyBridge, builtin  # noqa: E402
from energy_bridge import _rate  # noqa: E402  (the sibling benchmark's timer)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def four_copies():
    """4 alanine dipeptides 1 nm apart in one System (88 atoms; amber96 + OBC, NoCutoff): a stand-in for
    a ~4x larger molecule. Returns (system, positions [88, 3] nm)."""
    pdb = app.PDBFile(str(Path(openmm_cgflow.__file__).parent / "data" / "alanine-dipeptide.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    base = np.array(pdb.positions.value_in_unit(unit.nanometer))
    for k in range(1, 4):
        modeller.add(pdb.topology, (base + [1.0 * k, 0.0, 0.0]) * unit.nanometer)
    ff = app.ForceField("amber96.xml", "amber96_obc.xml")
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    return system, np.array(modeller.positions.value_in_unit(unit.nanometer))


class _Echo:
    """Actor answering like the bridge's (energy [b], forces [b, n, 3], finite [b]) without evaluating."""

    def answer(self, xyz):
        return np.zeros(xyz.shape[0]), np.zeros_like(xyz), np.ones(xyz.shape[0], dtype=bool)


def model_rate(B: int, W: int, L: float, s: float, t_e: float, t_x: float, min_chunk: int, per_worker: int,
               n_chunks: int | None = None) -> float:
    """Modelled evaluations/s of a batch of B on W Dask workers (see the module docstring)."""
    n_c = n_chunks or max(1, min(per_worker * W, B // min_chunk))
    rounds = -(-n_c // W)  # chunks each worker evaluates one after the other
    T = L + n_c * s + rounds * (B / n_c) * t_e + B * t_x
    return B / T


def measure(label, system, positions, temperature, client, args, rng):
    n_atoms = positions.shape[0]
    n_conf = max(max(args.batches), 2048)
    xyz = positions[None] + 0.005 * rng.standard_normal((n_conf, n_atoms, 3))
    W = args.workers
    t0 = time.perf_counter()
    local = EnergyBridge(system, temperature, n_workers=W)
    startup_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    dask = EnergyBridge(system, temperature, scheduler=client)
    startup_dask = time.perf_counter() - t0
    inproc = EnergyBridge(system, temperature, n_workers=0)
    for b in (local, dask, inproc):
        b.energy_and_forces(xyz[:256])  # warm-up: Contexts built on every worker
    np.testing.assert_allclose(dask.energy_and_forces(xyz[:512])[0], inproc.energy_and_forces(xyz[:512])[0], rtol=1e-12)

    rates = {f"{m} b={b}": [] for m in ("local", "dask") for b in args.batches}
    rates["in-process"] = []
    for r in range(args.rounds):
        rates["in-process"].append(_rate(lambda: inproc.energy_and_forces(xyz[:1024]), 1024, args.seconds / 2))
        for b in args.batches:
            rates[f"local b={b}"].append(_rate(lambda: local.energy_and_forces(xyz[:b]), b, args.seconds))
            rates[f"dask b={b}"].append(_rate(lambda: dask.energy_and_forces(xyz[:b]), b, args.seconds))
        print(f"  [{label}] round {r + 1}/{args.rounds}; load {os.getloadavg()[0]:.2f}", flush=True)
    best = {k: max(v) for k, v in rates.items()}
    t_e = 1.0 / best["in-process"]

    # per-chunk latency and serial costs, straight through the executors
    lat = {}
    one = [xyz[:1]]
    for name, bridge in (("local", local), ("dask", dask)):
        ex, key = bridge.executor, bridge.system_key
        lat[f"{name} 1-config chunk (s)"] = _median_time(lambda: ex.evaluate_chunks(key, one), args.repeats)
    n_tasks = 64
    tiny = [xyz[i:i + 1] for i in range(n_tasks)]
    t_tasks = _median_time(lambda: dask.executor.evaluate_chunks(dask.system_key, tiny), max(3, args.repeats // 10))
    # the workers evaluate n_tasks configurations in parallel: what is left is serial per-task cost
    s = max(0.0, (t_tasks - lat["dask 1-config chunk (s)"] - n_tasks * t_e / W) / n_tasks)
    # transfer: an actor on a worker that answers like the bridge's (energy, forces, finite) without
    # evaluating, for chunks of 2048 and of 1 configuration
    with client.as_current():
        echo = client.submit(_Echo, actor=True, pure=False).result()
    t_echo = {n: _median_time(lambda: echo.answer(xyz[:n]).result(), max(5, args.repeats // 5)) for n in (1, 2048)}
    del echo
    L = max(0.0, lat["dask 1-config chunk (s)"] - t_e)
    t_x = max(0.0, (t_echo[2048] - t_echo[1]) / 2047)
    for bridge in (local, dask, inproc):
        bridge.close()
    return {
        "label": label, "n_atoms": n_atoms, "rates_all_rounds": rates, "best": best,
        "startup_s": {"local": startup_local, "dask": startup_dask},
        "t_eval_s": t_e, "latency_s": lat, "per_task_serial_s": s, "transfer_per_config_s": t_x,
        "echo_chunk_s": {str(k): v for k, v in t_echo.items()},
        "model_params": {"L": L, "s": s, "t_e": t_e, "t_x": t_x},
    }


def report(res, args, min_chunk, per_worker):
    best, W = res["best"], args.workers
    print()
    print(f"### {res['label']} ({res['n_atoms']} atoms): in-process {best['in-process']:,.0f} evaluations/s per core "
          f"(t_e = {1e6 * res['t_eval_s']:.0f} us)")
    print()
    print(f"| batch | local ({W} processes) evals/s | Dask ({W} workers) evals/s | Dask overhead (best rounds) | "
          f"Dask overhead (median of paired rounds) | Dask / in-process |")
    print("|---|---|---|---|---|---|")
    overhead, paired = {}, {}
    rates = res["rates_all_rounds"]
    for b in args.batches:
        lo, da = best[f"local b={b}"], best[f"dask b={b}"]
        overhead[b] = lo / da - 1.0
        paired[b] = statistics.median(x / y - 1.0 for x, y in zip(rates[f"local b={b}"], rates[f"dask b={b}"]))
        print(f"| {b} | {lo:,.0f} | {da:,.0f} | {100 * overhead[b]:+.1f} % | {100 * paired[b]:+.1f} % | "
              f"{da / best['in-process']:.2f}x |")
    lat = res["latency_s"]
    print()
    print(f"start-up: local {res['startup_s']['local']:.2f} s, "
          f"Dask (connect + register System) {res['startup_s']['dask']:.2f} s")
    print(f"per-chunk latency (1-configuration chunk, median): local {1e3 * lat['local 1-config chunk (s)']:.2f} ms, "
          f"Dask {1e3 * lat['dask 1-config chunk (s)']:.2f} ms")
    print(f"Dask serial cost per chunk s = {1e3 * res['per_task_serial_s']:.2f} ms; transfer per configuration "
          f"t_x = {1e6 * res['transfer_per_config_s']:.2f} us (positions in, energy + forces out, float64; an echo "
          f"actor: {1e3 * res['echo_chunk_s']['2048']:.2f} ms for 2048 configurations, "
          f"{1e3 * res['echo_chunk_s']['1']:.2f} ms for 1)")
    p = res["model_params"]
    print()
    print(f"MODEL (not measured): T = L + n_c s + c t_e + B t_x with L = {1e3 * p['L']:.2f} ms, s = {1e3 * p['s']:.2f} ms, "
          f"t_e = {1e6 * p['t_e']:.0f} us, t_x = {1e6 * p['t_x']:.2f} us, min_chunk = {min_chunk}, "
          f"chunks per worker = {per_worker}")
    print()
    print("| workers | batch | model evals/s | ideal (W / t_e) | efficiency | best chunk count: n_c, evals/s |")
    print("|---|---|---|---|---|---|")
    model = {}
    for Wm in [W] + args.model_workers:
        for B in sorted({4096, 32768, 256 * Wm}):
            m = model_rate(B, Wm, p["L"], p["s"], p["t_e"], p["t_x"], min_chunk, per_worker)
            ideal = Wm / p["t_e"]
            model[f"W={Wm} B={B}"] = m
            best_n = max(range(1, min(B, per_worker * Wm) + 1),
                         key=lambda n: model_rate(B, Wm, p["L"], p["s"], p["t_e"], p["t_x"], min_chunk, per_worker, n))
            mb = model_rate(B, Wm, p["L"], p["s"], p["t_e"], p["t_x"], min_chunk, per_worker, best_n)
            print(f"| {Wm} | {B} | {m:,.0f} | {ideal:,.0f} | {100 * m / ideal:.0f} % | {best_n}, {mb:,.0f} |")
    res["model"] = model
    res["dask_overhead_best"] = {str(k): v for k, v in overhead.items()}
    res["dask_overhead_paired_median"] = {str(k): v for k, v in paired.items()}
    for b in args.batches:
        m = model_rate(b, W, p["L"], p["s"], p["t_e"], p["t_x"], min_chunk, per_worker)
        print(f"(model check at W = {W}, B = {b}: model {m:,.0f} vs measured {best[f'dask b={b}']:,.0f} evals/s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--model-workers", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-large", action="store_true", help="skip the 4x larger system")
    ap.add_argument("--quick", action="store_true", help="one round of 0.5 s per figure")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.repeats = 1, 0.5, 10

    import distributed

    from openmm_cgflow.dask_executor import DaskExecutor

    load_before = os.getloadavg()
    print(f"machine: {_platform.machine()}, {os.cpu_count()} cores; OpenMM {openmm.__version__}, "
          f"distributed {distributed.__version__}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    rng = np.random.default_rng(0)
    results = []
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster, set_as_default=False) as client:
        aldp = builtin("alanine-dipeptide")
        results.append(measure("alanine dipeptide", aldp.system, aldp.positions, aldp.temperature, client, args, rng))
        if not args.no_large:
            system, positions = four_copies()
            results.append(measure("4x alanine dipeptide (stand-in for a ~4x larger molecule)", system, positions,
                                   aldp.temperature, client, args, rng))
    defaults = DaskExecutor.__init__.__kwdefaults__
    for res in results:
        report(res, args, defaults["min_chunk"], defaults["chunks_per_worker"])
    load_after = os.getloadavg()
    print()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"results": results, "load_before": load_before, "load_after": load_after, "workers": args.workers,
                       "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cores": os.cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
