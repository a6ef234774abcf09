"""Does a run need ``OMP_NUM_THREADS=1`` to be fast on a shared machine? (issue #12)

Runs ``cgflow run mueller-brown --max-iterations 2`` (the CLI with its defaults: one energy worker per
core) next to a busy process (a Python loop spinning on one core, standing in for another job), twice in
one invocation:

* ``default``: the environment without ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``: the package chooses
  torch's thread count (:mod:`openmm_cgflow.threads`);
* ``omp1``: the same with ``OMP_NUM_THREADS=1``, the old advice.

and prints both wall times and their ratio (default / omp1; the target is <= 1.2). With
``--unmanaged`` it also runs with ``torch_threads`` = the number of cores (torch's own default, what a run
did before the package chose), for the record. The runs alternate ``--repeats`` times (ABBA order) so
that load changes hit all alike and the best of each is compared; the load averages before and after are
printed. Results go to ``--json``.

Usage:
    python benchmarks/threads.py [--repeats 2] [--unmanaged] [--json benchmarks/data/threads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIG_UNMANAGED = """[system]
builtin = "mueller-brown"
[settings]
torch_threads = {n}
"""


def _env(omp1: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp1:
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_once(kind: str, folder: str) -> float:
    """Wall seconds of two Mueller-Brown iterations through the CLI, in a fresh run directory."""
    out = os.path.join(folder, f"{kind}-{time.monotonic_ns()}")
    target = "mueller-brown"
    if kind == "unmanaged":
        target = os.path.join(folder, "unmanaged.toml")
        with open(target, "w") as fh:
            fh.write(CONFIG_UNMANAGED.format(n=os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "openmm_cgflow.cli", "run", target, "--out", out, "--max-iterations", "2",
           "--quiet", "--no-plots"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(kind == "omp1"))
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{res.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="rounds (alternating order); the best of each is kept")
    parser.add_argument("--unmanaged", action="store_true", help="also run with torch's default thread count")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "threads.json"))
    args = parser.parse_args()
    kinds = ["default", "omp1"] + (["unmanaged"] if args.unmanaged else [])
    load_before = os.getloadavg()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another job on one core
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for r in range(args.repeats):
                for kind in (kinds if r % 2 == 0 else kinds[::-1]):  # ABBA: a load drift hits both alike
                    walls[kind].append(run_once(kind, folder))
                    print(f"{kind:>9}: {walls[kind][-1]:.1f} s", flush=True)
    finally:
        busy.kill()
        busy.wait()
    best = {k: min(v) for k, v in walls.items()}
    ratio = best["default"] / best["omp1"]
    result = {"benchmark": "cgflow run mueller-brown --max-iterations 2, next to one spinning process",
              "cores": os.cpu_count(), "walls_s": walls, "best_s": best, "ratio_default_over_omp1": ratio,
              "load_before": load_before, "load_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"default threads {best['default']:.1f} s, OMP_NUM_THREADS=1 {best['omp1']:.1f} s: ratio {ratio:.2f} "
          f"({'OK' if ratio <= 1.2 else 'ABOVE'} the 1.2 target)"
          + (f"; torch's own default ({os.cpu_count()} threads) {best['unmanaged']:.1f} s" if "unmanaged" in best else ""))
    print(f"load average before {load_before}, after {result['load_after']}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
