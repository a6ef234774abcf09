"""Where the time of an active-learning run goes, per phase.

Two uses:

1. Report on a run directory (``RUN_DIR``): per iteration, energy evaluations and wall time from
   ``iterations.jsonl``; per-phase times if the records carry them (a ``timings`` / ``phase_s`` dict, or
   ``*_s`` keys besides ``wall_s``); otherwise what the run's log can tell (the elapsed time of each
   iteration's "flow by energy" progress bar, i.e. flow training including its energy evaluations, and
   the rest of the iteration). The log defaults to ``RUN_DIR.log`` or ``RUN_DIR/*.log`` when present.

2. ``--profile``: one active-learning iteration of alanine dipeptide under cProfile, with every phase
   timed exclusively (a phase's time excludes the phases it calls, so energy evaluations made during
   flow training count as "energy (bridge)", and are also listed by caller):
   flow training, energy (bridge), labels, ensemble fit (+ export), CG dynamics (walkers on pmf.pt),
   other (bridge start-up, flow/checkpoint files, plots, KLD against the reference, the rest).
   ``--quick`` uses small settings (48 first points x 6 epochs instead of 200 x 60; everything else, the
   flow, the ensemble and the CG walkers, as by default; under a minute on one core); without it the
   package's default settings for alanine dipeptide (one first iteration: ~2.4e5 energy evaluations,
   about 5 minutes on 2 cores). One-time imports are paid before timing.

  python benchmarks/profile_run.py /work/runs/aldp                  # report on a run directory
  python benchmarks/profile_run.py --profile --quick                # profile one tiny iteration
  python benchmarks/profile_run.py --profile --workers 2 --json prof.json   # default settings
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import glob
import io
import json
import os
import pstats
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

PHASES = ("flow training", "energy (bridge)", "labels", "ensemble fit", "CG dynamics", "other")


# -------------------------------------------------------------------------------- run-directory report
def read_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "iterations.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def record_phases(r: dict) -> dict:
    """Per-phase seconds carried by a record, if any."""
    for key in ("timings", "phase_s", "phases_s", "time_s"):
        if isinstance(r.get(key), dict):
            return {k: float(v) for k, v in r[key].items() if isinstance(v, (int, float))}
    return {k[:-2]: float(v) for k, v in r.items()
            if k.endswith("_s") and k != "wall_s" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _seconds(stamp: str) -> float:
    parts = [float(p) for p in stamp.split(":")]
    s = 0.0
    for p in parts:
        s = 60 * s + p
    return s


def parse_log(path: str) -> dict:
    """{iteration: seconds of its "flow by energy" bar} from a run log (tqdm output)."""
    with open(path, errors="replace") as fh:
        text = fh.read().replace("\r", "\n")
    bar = re.compile(r"flow by energy:\s+\d+%.*?\|\s*(\d+)/(\d+) \[([\d:]+)<")
    it = re.compile(r"iteration (\d+) \| evals ([\d,]+)")
    out, last = {}, None
    for line in text.split("\n"):
        for m in bar.finditer(line):
            last = _seconds(m.group(3))
        for m in it.finditer(line):
            if last is not None:
                out[int(m.group(1))] = last
            last = None
    return out


def report(run_dir: str, log: str | None) -> int:
    recs = read_records(run_dir)
    if not recs:
        print(f"{run_dir}: no iterations.jsonl records yet")
        return 1
    if log is None:
        cands = [run_dir.rstrip("/") + ".log"] + sorted(glob.glob(os.path.join(run_dir, "*.log")))
        log = next((c for c in cands if os.path.isfile(c)), None)
    flow_s = parse_log(log) if log else {}
    phases = [record_phases(r) for r in recs]
    have_phases = any(phases)
    print(f"# {run_dir}: {len(recs)} iterations" + (f"; log {log}" if log else "; no log found"))
    print()
    if have_phases:
        names = sorted({k for p in phases for k in p})
        print("| iteration | evaluations | wall (s) | " + " | ".join(f"{n} (s)" for n in names) + " |")
        print("|" + "---|" * (3 + len(names)))
    else:
        print("| iteration | evaluations (iteration) | wall (s) | flow training from log (s) | rest (s) "
              "| evaluations/s | KLD | max spread (kT) |")
        print("|---|---|---|---|---|---|---|---|")
    prev_e, prev_w = 0.0, 0.0
    tot = defaultdict(float)
    for r, p in zip(recs, phases):
        e, w = float(r.get("energy_evaluations", 0)), float(r.get("wall_s", 0.0))
        de, dw = e - prev_e, w - prev_w
        prev_e, prev_w = e, w
        tot["wall"] += dw
        if have_phases:
            cells = [f"{p.get(n, float('nan')):.1f}" for n in sorted({k for q in phases for k in q})]
            print(f"| {r['iteration']} | {de:,.0f} | {dw:.0f} | " + " | ".join(cells) + " |")
            continue
        f = flow_s.get(int(r["iteration"]))
        if f is not None:
            tot["flow"] += f
            tot["flow_wall"] += dw
        kld = f"{r['kld']:.4f}" if "kld" in r else "-"
        print(f"| {r['iteration']} | {de:,.0f} | {dw:.0f} | {'-' if f is None else f'{f:.0f}'} | "
              f"{'-' if f is None else f'{dw - f:.0f}'} | {de / max(dw, 1e-9):,.0f} | {kld} | "
              f"{r.get('max_spread_kT', float('nan')):.3f} |")
    print()
    if not have_phases:
        if tot["flow_wall"] > 0:
            print(f"flow training (progress-bar time, energy included): {tot['flow']:.0f} s of {tot['flow_wall']:.0f} s "
                  f"({100 * tot['flow'] / tot['flow_wall']:.0f} %) in the iterations the log covers; the rest is labels, "
                  "ensemble fit, CG walkers and files.")
        print("The records carry no per-phase timings: run `python benchmarks/profile_run.py --profile --quick` "
              "for a per-phase profile of one iteration.")
    return 0


# ----------------------------------------------------------------------------------------- profiler
class PhaseClock:
    """Exclusive wall time per phase through wrapped functions (nested phases are subtracted)."""

    def __init__(self):
        self.exclusive = defaultdict(float)
        self.calls = defaultdict(int)
        self.by_caller = defaultdict(float)  # (caller phase, phase) -> inclusive seconds
        self.count_by_caller = defaultdict(int)  # (caller phase, phase) -> items counted by ``count``
        self._stack: list[list] = []

    def wrap(self, name: str, fn, count=None):
        """``fn`` timed as phase ``name``; ``count(*args)`` (optional) gives the items a call handles."""
        clock = self

        @functools.wraps(fn)
        def timed(*a, **k):
            clock._stack.append([name, 0.0])
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                _, child = clock._stack.pop()
                clock.exclusive[name] += dt - child
                clock.calls[name] += 1
                parent = clock._stack[-1][0] if clock._stack else "(top)"
                clock.by_caller[(parent, name)] += dt
                if count is not None:
                    clock.count_by_caller[(parent, name)] += int(count(*a, **k))
                if clock._stack:
                    clock._stack[-1][1] += dt

        return timed


def _patch(clock: PhaseClock):
    """Wrap the phase entry points; returns a function that undoes it."""
    from openmm_cgflow import bridge, labelling, learner, metrics, reporting, run_directory, training

    targets = [
        (training.Trainer, "train_by_energy", "flow training"),
        (bridge.EnergyBridge, "energy_and_forces", "energy (bridge)", lambda self, xyz: len(xyz)),
        (learner.PMFLearner, "_trainer", "other: trainer set-up"),
        (bridge.EnergyBridge, "__init__", "other: bridge start-up"),
        (labelling, "free_energy", "labels"),
        (learner, "fit_ensemble", "ensemble fit"),
        (learner, "export_pmf", "ensemble fit"),
        (learner.PMFLearner, "_explore", "CG dynamics"),
        (run_directory.RunDirectory, "commit_iteration", "other: flow/checkpoint files"),
        (reporting.PlotReporter, "report", "other: plots"),
        (metrics, "kld_from_pmf", "other: KLD vs reference"),
        (learner.PMFLearner, "step", "total"),
    ]
    saved = []
    for owner, attr, name, *count in targets:
        orig = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        saved.append((owner, attr, orig))
        setattr(owner, attr, clock.wrap(name, orig, *count))

    def undo():
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)

    return undo


#: --quick: the default flow, ensemble and walkers, but 48 instead of 200 first points and 6 instead of 60
#: first epochs (the per-sample costs are those of a real run; the shares of training and labels are smaller).
QUICK = dict(initial_points=48, first_epochs=6)


def _warm_up() -> None:
    """Pay the one-time import costs (torch.optim pulls in torch._dynamo, matplotlib, the plugin) before timing."""
    import torch

    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    import openmm_cgflow_plugin  # noqa: F401

    from openmm_cgflow import ensemble, ensemble_fit, free_energy, training  # noqa: F401


def profile(args) -> int:
    import torch

    from openmm_cgflow.cli import build_learner

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(QUICK) if args.quick else {}
    overrides.update(max_iterations=1, seed=args.seed)
    if args.workers is not None:
        overrides["n_workers"] = args.workers
    out = tempfile.mkdtemp(prefix="cgflow_profile_")
    t_warm = time.perf_counter()
    _warm_up()
    t_warm = time.perf_counter() - t_warm
    clock = PhaseClock()
    undo = _patch(clock)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    try:
        learner = build_learner("alanine-dipeptide", out, overrides, reference="auto", progress=False,
                                plots=not args.no_plots)
        st = learner.settings
        prof.enable()
        learner.run()
        prof.disable()
        total_wall = time.perf_counter() - t0
        rec = learner.history[-1]
    finally:
        undo()
        if args.keep:
            print(f"run directory kept: {out}")
        else:
            shutil.rmtree(out, ignore_errors=True)

    step_s = clock.exclusive.pop("total", 0.0)  # step()'s own time, outside every named phase
    named = dict(clock.exclusive)
    step_total = step_s + sum(named.values())
    rows = {p: named.get(p, 0.0) for p in PHASES if p != "other"}
    other_parts = {k[len("other: "):]: v for k, v in named.items() if k.startswith("other: ")}
    other_parts["rest of the iteration"] = step_s
    rows["other"] = sum(other_parts.values())
    mode = "quick (48 points x 6 epochs)" if args.quick else "default settings"
    print(f"# One active-learning iteration of alanine dipeptide, {mode}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"torch threads {torch.get_num_threads()}, energy workers {st.n_workers if st.n_workers is not None else 'all cores'}, "
          f"flow {st.flow_kwargs or 'default'} ({st.flow_dtype}), {st.initial_points} points x {st.first_epochs} epochs x "
          f"{st.samples_per_point} samples, {st.label_samples} label samples/point, {st.n_models} models, "
          f"{st.n_walkers} walkers x <= {st.walker_steps} steps")
    print(f"energy evaluations {rec['energy_evaluations']:,}; iteration wall {step_total:.1f} s "
          f"(recorded wall_s {rec['wall_s']:.1f} s, which excludes plots and the KLD); one-time imports "
          f"{t_warm:.1f} s before timing, not counted\n")
    print("| phase | seconds | share |")
    print("|---|---|---|")
    for p in PHASES:
        print(f"| {p} | {rows[p]:.2f} | {100 * rows[p] / max(step_total, 1e-9):.1f} % |")
    for k, v in sorted(other_parts.items(), key=lambda kv: -kv[1]):
        print(f"| &nbsp;&nbsp;other: {k} | {v:.2f} | {100 * v / max(step_total, 1e-9):.1f} % |")
    print(f"| total | {step_total:.2f} | 100 % |\n")
    e_callers = {c: v for (c, n), v in clock.by_caller.items() if n == "energy (bridge)"}
    e_counts = {c: v for (c, n), v in clock.count_by_caller.items() if n == "energy (bridge)"}
    per_unit = {}
    if e_callers:
        print("| energy evaluations made by | evaluations | bridge s | evaluations / bridge s | phase s per 1000 "
              "evaluations (own + energy) |")
        print("|---|---|---|---|---|")
        for c, v in e_callers.items():
            n = e_counts.get(c, 0)
            own = rows.get(c, 0.0)
            per_unit[c] = dict(evaluations=n, bridge_s=v, evaluations_per_bridge_s=n / max(v, 1e-9),
                               s_per_1000=1000 * (own + v) / max(n, 1))
            print(f"| {c} | {n:,} | {v:.2f} | {n / max(v, 1e-9):,.0f} | {1000 * (own + v) / max(n, 1):.3f} |")
        print()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.top)
    text = s.getvalue()
    print(f"cProfile, top {args.top} by cumulative time (includes the timing wrappers 'timed'):")
    print(text[text.find("   ncalls"):] if "   ncalls" in text else text)
    if args.prof:
        prof.dump_stats(args.prof)
        print(f"wrote {args.prof}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(mode=mode, date=time.strftime("%Y-%m-%d %H:%M %Z"), phases_s=rows, other_s=other_parts,
                           total_s=step_total, energy_by_caller_s=e_callers, per_evaluation=per_unit,
                           warm_up_s=t_warm, record=rec,
                           settings={k: getattr(st, k) for k in st.__dataclass_fields__}), fh, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="run directory to report on (iterations.jsonl, log)")
    ap.add_argument("--log", default=None, help="the run's log (default RUN_DIR.log or RUN_DIR/*.log)")
    ap.add_argument("--profile", action="store_true", help="profile one active-learning iteration instead")
    ap.add_argument("--quick", action="store_true", help="with --profile: small settings (< 1 min on one core)")
    ap.add_argument("--workers", type=int, default=None,
                    help="energy worker processes (default: 0 = in-process with --quick, all cores otherwise)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true", help="do not write the iteration's plots")
    ap.add_argument("--top", type=int, default=25, help="cProfile rows to print")
    ap.add_argument("--prof", default=None, help="write the raw cProfile stats here")
    ap.add_argument("--json", default=None, help="write the phase table as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    args = ap.parse_args(argv)
    if args.profile or args.quick:
        if args.quick:
            args.workers = 0 if args.workers is None else args.workers
            args.threads = 1 if args.threads is None else args.threads
        return profile(args)
    if not args.run_dir:
        ap.error("give a run directory, or --profile")
    return report(args.run_dir, args.log)


if __name__ == "__main__":
    sys.exit(main())
