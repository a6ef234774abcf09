"""Efficiency of active learning against OpenMM MD for alanine dipeptide: PMF accuracy per energy
evaluation and per second of wall time.

Accuracy is the project's one metric, the forward KLD D(p_ref || p_est) on 100 x 100 bins of (phi, psi)
(openmm_cgflow.metrics), against the packaged well-tempered-metadynamics reference
(``metrics.load_reference("alanine-dipeptide")``). Curves, all from data already on disk:

* plain MD (benchmarks/md_baseline.py -> data/aldp_md.npz): its stored curve, KLD of the smoothed
  histogram of all frames so far; one energy evaluation per MD step; wall time = the MD loop's own time.
  Levels the run does not reach are extrapolated with KLD(n) = a / n + b, b fixed to the smoothing floor
  (the KLD of the smoothed exact reference, the limit of any sample-based estimate), a fitted (least
  squares in log KLD) to the long-time part of the curve (n >= n_last / 5).
* well-tempered metadynamics (benchmarks/reference_metad.py -> data/aldp_reference.npz), walker 0 only,
  a single-run peer: the frames up to time t reweighted with exp(bias_kT - c_kT) (Tiwary-Parrinello
  c(t)), KLD of the smoothed weighted histogram; energy evaluations = walker-0 MD steps; wall time =
  evaluations / (evaluations per second of the whole 2-walker run, from its metadata: total evaluations
  / wall_s). The reference was built from the final biases of both walkers, this one included, so the
  late part of this curve is optimistic; the divergence between the final reweighted histograms of
  walker 0 and walker 1 is reported as an honest noise level. Unreached levels extrapolated as for MD.
* this package: one or more active-learning run directories (``--run``, iterations.jsonl: kld vs
  energy_evaluations and wall_s, as recorded by the run). Never extrapolated: "not reached".
* optionally grid conditioning (``--grid FILE``, .json or .npz with arrays energy_evaluations, wall_s,
  kld); skipped if absent.

Cost to reach a KLD level: the first measured point at or below it, interpolated linearly in
(log n, log KLD) between it and the point before (wall time with the same fraction in log wall).

Outputs: a two-panel PNG (KLD vs energy evaluations and vs wall time, log-log; dashed = extrapolated),
a JSON with every curve, fit and figure, and a markdown table on stdout.

  python benchmarks/efficiency.py --quick     # whatever data exists -> data/efficiency_quick.{png,json}
  python benchmarks/efficiency.py --run /work/runs/aldp [--run DIR2 ...] [--grid grid.json]
                                              # -> data/efficiency.{png,json}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from openmm_cgflow import metrics  # noqa: E402

LEVELS = (0.02, 0.01, 0.005)
DEFAULT_RUN = "/work/runs/aldp"
TAIL_FRACTION = 5.0  # fit the extrapolation to points with n >= n_last / TAIL_FRACTION


# ------------------------------------------------------------------------------------------ helpers
def smoothing_floor(reference: dict) -> float:
    """KLD of the smoothed exact reference: the limit of any smoothed-histogram estimate (n -> inf)."""
    p = reference["probabilities"]
    h = p.copy()
    for k in range(p.ndim):
        h = metrics._smooth_axis(h, k, reference["periodic"][k])
    h = h / h.sum() + metrics.HISTOGRAM_FLOOR
    return metrics.forward_kld(p, h / h.sum())


def crossing(x, wall, kld, level):
    """Cost to reach ``level`` on a measured curve (x ascending).

    Returns None if never at or below the level, else a dict: evaluations, wall_s (interpolated in log-log
    between the first point at/below the level and the point before), first_point (reached already at the
    first point: an upper bound), stays_below (every later measured point is at/below the level too).
    """
    x, wall, kld = (np.asarray(a, dtype=np.float64) for a in (x, wall, kld))
    ok = np.flatnonzero(kld <= level)
    if len(ok) == 0:
        return None
    i = int(ok[0])
    out = {"first_point": i == 0, "stays_below": bool(np.all(kld[i:] <= level)), "index": i}
    if i == 0 or kld[i] == kld[i - 1]:
        out.update(evaluations=float(x[i]), wall_s=float(wall[i]))
        return out
    f = (math.log(level) - math.log(kld[i - 1])) / (math.log(kld[i]) - math.log(kld[i - 1]))
    ev = math.exp(math.log(x[i - 1]) + f * (math.log(x[i]) - math.log(x[i - 1])))
    w = math.exp(math.log(wall[i - 1]) + f * (math.log(wall[i]) - math.log(wall[i - 1]))) \
        if wall[i - 1] > 0 and wall[i] > 0 else float(wall[i])
    out.update(evaluations=float(ev), wall_s=float(w))
    return out


def fit_tail(x, kld, floor: float) -> dict | None:
    """Fit KLD(n) = a / n + floor to the long-time part (n >= n_last / TAIL_FRACTION, >= 3 points).

    Least squares in log KLD over a (a 1-D scan, refined). Also a free power law c n^-alpha on the same
    points, as a diagnostic of how far the 1/n law holds. Returns None with fewer than 3 usable points.
    """
    x = np.asarray(x, dtype=np.float64)
    k = np.asarray(kld, dtype=np.float64)
    sel = (x >= x[-1] / TAIL_FRACTION) & (k > floor) & np.isfinite(k)
    if sel.sum() < 3:
        sel = np.zeros_like(sel)
        good = np.flatnonzero((k > floor) & np.isfinite(k))
        sel[good[-3:]] = True
    if sel.sum() < 3:
        return None
    xs, ks = x[sel], k[sel]
    a_pts = (ks - floor) * xs
    lo, hi = np.log(a_pts.min() / 3), np.log(a_pts.max() * 3)
    for _ in range(3):
        grid = np.linspace(lo, hi, 2001)
        a = np.exp(grid)[:, None]
        sse = ((np.log(a / xs[None] + floor) - np.log(ks[None])) ** 2).sum(1)
        j = int(np.argmin(sse))
        step = grid[1] - grid[0]
        lo, hi = grid[j] - 2 * step, grid[j] + 2 * step
    a = float(np.exp(grid[j]))
    resid = np.log(a / xs + floor) - np.log(ks)
    slope, icpt = np.polyfit(np.log(xs), np.log(ks), 1)
    return {"model": "kld = a / n + b", "a": a, "b": floor, "b_is": "smoothing floor (fixed)",
            "tail_from_evaluations": float(xs[0]), "tail_to_evaluations": float(xs[-1]), "tail_points": int(sel.sum()),
            "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))),
            "power_law_alpha": float(-slope), "power_law_c": float(np.exp(icpt))}


def extrapolate(fit: dict, level: float, wall_per_eval: float) -> dict | None:
    """Cost to reach ``level`` by the a / n + b fit (None if level <= b); wall at the tail's rate."""
    if fit is None or level <= fit["b"]:
        return None
    n = fit["a"] / (level - fit["b"])
    out = {"evaluations": float(n), "wall_s": float(n * wall_per_eval), "extrapolated": True}
    if fit.get("power_law_alpha", 0) > 0:  # what the free power law would say (diagnostic only)
        out["power_law_evaluations"] = float((fit["power_law_c"] / level) ** (1.0 / fit["power_law_alpha"]))
    return out


def fmt_n(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2e}"


def fmt_t(s) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_ratio(a, b) -> str:
    if a is None or b is None or b <= 0:
        return "-"
    r = a / b
    return f"{r:.1f}x" if r < 100 else f"{r:.0f}x"


# ------------------------------------------------------------------------------------------- curves
def md_curve(path: str, reference, floor: float) -> dict:
    with np.load(path) as z:
        meta = json.loads(str(z["metadata_json"]))
        n = np.array(z["curve_energy_evaluations"], dtype=np.float64)
        wall = np.array(z["curve_wall_s"], dtype=np.float64)
        kld = np.array(z["curve_kld"], dtype=np.float64)
        partial = bool(z["partial"]) if "partial" in z.files else bool(meta.get("partial", False))
        if len(kld) == 0 and "phi" in z.files and len(z["phi"]) > 10:  # no stored curve: from the frames
            phi, psi = np.array(z["phi"], np.float64), np.array(z["psi"], np.float64)
            every = int(meta.get("frame_every_steps", 1000))
            idx = np.unique(np.geomspace(10, len(phi), 30).astype(int))
            n = idx * float(every)
            kld = np.array([metrics.kld_from_samples(np.stack([phi[:i], psi[:i]], 1), reference) for i in idx])
            wall = n / float(meta["steps_per_s"])
    order = np.argsort(n)
    n, wall, kld = n[order], wall[order], kld[order]
    rate = float(n[-1] / wall[-1]) if len(n) and wall[-1] > 0 else float(meta.get("steps_per_s", np.nan))
    return {"name": "plain MD", "short": "MD", "key": "md", "path": path, "partial": partial, "evaluations": n, "wall_s": wall,
            "kld": kld, "evaluations_per_s": rate, "fit": fit_tail(n, kld, floor) if len(n) >= 3 else None,
            "source": (f"{os.path.basename(path)}: {meta.get('ns', float('nan')):.2f} ns, LangevinMiddle "
                       f"{meta.get('dt_fs')} fs, {meta.get('platform')} platform, 1 thread, "
                       f"{rate:.0f} evaluations/s (MD loop time)"),
            "metadata": {k: meta.get(k) for k in ("command", "ns", "energy_evaluations", "md_wall_s", "steps_per_s",
                                                  "platform", "dt_fs", "written", "final_kld", "populations")}}


def metad_curve(path: str, reference, floor: float, n_points: int, walker: int = 0) -> dict:
    with np.load(path) as z:
        meta = json.loads(str(z["metadata_json"]))
        w = np.array(z["walker"])
        fr = {k: np.array(z[k], dtype=np.float64) for k in ("time_ps", "phi", "psi", "bias_kT", "c_kT")}
        walker_p = np.array(z["walker_probabilities"], dtype=np.float64) if "walker_probabilities" in z.files else None
        partial = bool(z["partial"]) if "partial" in z.files else bool(meta.get("partial", False))
    dt_ps = float(meta["dt_fs"]) * 1e-3
    rate = float(meta["energy_evaluations"]) / float(meta["wall_s"])

    def frames_of(i):
        m = w == i
        o = np.argsort(fr["time_ps"][m])
        return {k: v[m][o] for k, v in fr.items()}

    def weighted(f, upto):
        lw = f["bias_kT"][:upto] - f["c_kT"][:upto]
        s = np.stack([f["phi"][:upto], f["psi"][:upto]], 1)
        return s, np.exp(lw - lw.max())

    walkers = sorted(set(int(v) for v in np.unique(w)))
    other = ([i for i in walkers if i != walker] or [None])[0]
    # an independent check: the same curve against the other walker's own bias-based estimate alone
    indep_ref = None
    if other is not None and walker_p is not None and len(walker_p) > other:
        indep_ref = {"probabilities": walker_p[other] / walker_p[other].sum(), "edges": reference["edges"],
                     "periodic": reference["periodic"]}
    f0 = frames_of(walker)
    nf = len(f0["time_ps"])
    idx = np.unique(np.concatenate([np.geomspace(20, nf, n_points).astype(int), [nf]]))
    idx = idx[idx >= 20]
    kld, kld_indep = [], []
    for i in idx:
        s, wt = weighted(f0, i)
        kld.append(metrics.kld_from_samples(s, reference, weights=wt))
        if indep_ref is not None:
            kld_indep.append(metrics.kld_from_samples(s, indep_ref, weights=wt))
    n = f0["time_ps"][idx - 1] / dt_ps
    wall = n / rate
    kld = np.asarray(kld)
    noise = {}
    if other is not None:
        edges = reference["edges"]
        hists = {}
        for i in (walker, other):
            s, wt = weighted(frames_of(i), None)
            hists[i] = metrics.histogram_probabilities(s, [len(e) - 1 for e in edges], [(e[0], e[-1]) for e in edges],
                                                       reference["periodic"], smooth=True, weights=wt)
        s1, wt1 = weighted(frames_of(other), None)
        noise = {
            f"kld_walker{other}_vs_walker{walker}_reweighted": metrics.forward_kld(hists[other], hists[walker]),
            f"kld_walker{walker}_vs_walker{other}_reweighted": metrics.forward_kld(hists[walker], hists[other]),
            f"kld_ref_vs_walker{other}_reweighted": metrics.kld_from_samples(s1, reference, weights=wt1),
            "note": ("D(p_w1 || p_w0) of the two walkers' final reweighted smoothed histograms: two independent runs "
                     "of the same length, so about twice the error of either; compare with the curve's last point"),
        }
    figs = meta.get("figures", {})
    noise.update({"reference_self_consistency_kld (bias-based, walker 0 vs 1)": figs.get("self_consistency_kld"),
                  "reference_estimated_error_kld": figs.get("estimated_reference_error_kld")})
    # the metadynamics bias itself (snapshots every ns) vs the final reference: the reference's own estimator,
    # tautologically close to it at the end; kept in the JSON only
    conv = meta.get("convergence") or []
    bias_curve = [[float(t) * 1e6 / float(meta["dt_fs"]), float(k)] for t, k in conv[walker]] if len(conv) > walker else []
    return {"name": f"WT metadynamics (walker {walker})", "short": f"metaD w{walker}", "key": "metad", "path": path, "partial": partial,
            "evaluations": n, "wall_s": wall, "kld": kld, "evaluations_per_s": rate,
            "fit": fit_tail(n, kld, floor) if len(n) >= 3 else None, "noise": noise,
            "bias_estimate_curve_evaluations_kld": bias_curve,
            "kld_vs_other_walker_reference": np.asarray(kld_indep) if kld_indep else None,
            "kld_vs_other_walker_reference_note": (
                f"the same reweighted walker-{walker} histograms scored against walker {other}'s final bias alone "
                f"(a reference that does not contain walker {walker}; its own error is about half the walkers' "
                "mutual bias-based KLD)") if kld_indep else None,
            "source": (f"{os.path.basename(path)}: walker {walker} of {len(walkers)}, {n[-1] * dt_ps * 1e-3:.1f} ns, "
                       f"frames reweighted by exp(bias_kT - c_kT); wall = evaluations / {rate:.0f} per s "
                       f"(the whole run's energy_evaluations / wall_s from its metadata; plain-MD platform speed "
                       f"measured at its start: {meta.get('platform_speed_steps_per_s')})"),
            "metadata": {k: meta.get(k) for k in ("command", "ns_per_walker", "energy_evaluations", "wall_s", "walkers",
                                                  "bias_factor", "sigma_rad", "pace_steps", "platform", "written")}}


def run_curve(run_dir: str) -> dict:
    path = os.path.join(run_dir, "iterations.jsonl")
    name = os.path.basename(os.path.normpath(run_dir))
    out = {"name": f"active learning ({name})", "short": f"ours ({name})", "key": f"run:{name}", "path": run_dir, "records": 0}
    if not os.path.isfile(path):
        out["skipped"] = "no iterations.jsonl yet"
        return out
    recs = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written
                    pass
    out["records"] = len(recs)
    recs = [r for r in recs if "kld" in r and r.get("energy_evaluations")]
    if not recs:
        out["skipped"] = "no record with kld and energy_evaluations yet"
        return out
    recs.sort(key=lambda r: r["energy_evaluations"])
    last = recs[-1]
    out.update(evaluations=np.array([r["energy_evaluations"] for r in recs], dtype=np.float64),
               wall_s=np.array([r["wall_s"] for r in recs], dtype=np.float64),
               kld=np.array([r["kld"] for r in recs], dtype=np.float64),
               iterations=[int(r["iteration"]) for r in recs],
               cg_points=[int(r.get("cg_points", 0)) for r in recs],
               max_spread_kT=[float(r.get("max_spread_kT", np.nan)) for r in recs],
               converged=bool(last.get("converged", False)),
               evaluations_per_s=float(last["energy_evaluations"] / max(last["wall_s"], 1e-9)),
               source=(f"{path}: {len(recs)} iterations, last {last['iteration']} "
                       f"({'converged' if last.get('converged') else 'not converged: in progress or stopped on a budget'})"
                       f", wall_s as recorded by the run (all phases)"))
    return out


def grid_curve(path: str) -> dict:
    out = {"name": f"grid conditioning ({os.path.basename(path)})", "short": "ours (grid)", "key": "grid", "path": path}
    if not os.path.isfile(path):
        out["skipped"] = "file not found"
        return out
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                d = {k: np.array(z[k], dtype=np.float64) for k in ("energy_evaluations", "wall_s", "kld")}
        else:
            with open(path) as fh:
                raw = json.load(fh)
            d = {k: np.asarray(raw[k], dtype=np.float64) for k in ("energy_evaluations", "wall_s", "kld")}
    except (KeyError, ValueError, OSError) as exc:
        out["skipped"] = f"unreadable ({exc})"
        return out
    o = np.argsort(d["energy_evaluations"])
    out.update(evaluations=d["energy_evaluations"][o], wall_s=d["wall_s"][o], kld=d["kld"][o],
               source=f"{path}: {len(o)} points")
    return out


# -------------------------------------------------------------------------------------------- main
def level_costs(curve: dict, levels, extrapolate_missing: bool) -> dict:
    res = {}
    if "kld" not in curve:
        return res
    for L in levels:
        c = crossing(curve["evaluations"], curve["wall_s"], curve["kld"], L)
        if c is not None:
            c["extrapolated"] = False
        elif extrapolate_missing and curve.get("fit") is not None:
            c = extrapolate(curve["fit"], L, curve["wall_s"][-1] / curve["evaluations"][-1])
        res[str(L)] = c
    return res


def cell(c) -> tuple[str, str]:
    if c is None:
        return "not reached", "not reached"
    mark = "*" if c.get("extrapolated") else ("<=" if c.get("first_point") else "")
    tail = "" if c.get("extrapolated") or c.get("stays_below", True) else " †"
    pre = "<= " if mark == "<=" else ""
    suf = " *" if mark == "*" else ""
    return f"{pre}{fmt_n(c['evaluations'])}{suf}{tail}", f"{pre}{fmt_t(c['wall_s'])}{suf}{tail}"


def plot(curves, extrap, levels, png: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    colours = {"md": "tab:blue", "metad": "tab:orange", "grid": "tab:purple"}
    run_colours = iter(["tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for c in curves:
        if "kld" not in c:
            continue
        col = colours.get(c["key"]) or next(run_colours)
        style = dict(marker="o", ms=4) if c["key"].startswith("run:") or c["key"] == "grid" else {}
        for ax, xk in zip(axes, ("evaluations", "wall_s")):
            ax.loglog(c[xk], c["kld"], "-", color=col, label=c["name"], **style)
            if c.get("kld_vs_other_walker_reference") is not None:
                ax.loglog(c[xk], c["kld_vs_other_walker_reference"], ":", color=col, lw=1.0,
                          label="  same, scored against the other walker's bias" if xk == "evaluations" else None)
            ex = extrap.get(c["key"]) or []
            if ex:  # the fit over its tail and beyond, to the extrapolated crossings
                fit = c["fit"]
                scale = c["evaluations"][-1] / c["wall_s"][-1] if xk == "wall_s" else 1.0
                xx = np.geomspace(fit["tail_from_evaluations"] / scale, max(e[xk] for e in ex), 60)
                ax.loglog(xx, fit["a"] / (xx * scale) + fit["b"], "--", color=col, lw=1.2)
                ax.plot([e[xk] for e in ex], [e["level"] for e in ex], "x", color=col, ms=7)
    for ax, xl in zip(axes, ("energy evaluations", "wall time (s)")):
        for L in levels:
            ax.axhline(L, color="grey", ls=":", lw=0.9)
            ax.text(1.005, L, f"{L:g}", transform=ax.get_yaxis_transform(), fontsize=7, va="center", color="grey")
        ax.set_xlabel(xl)
        ax.set_ylabel("forward KLD to reference (nats)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[0].set_title("KLD vs energy evaluations", fontsize=10)
    axes[1].set_title("KLD vs wall time (dashed: extrapolated a/n + b)", fontsize=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=130)


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="use whatever data exists (falls back to *_quick.npz, skips missing inputs), coarser metaD "
                         "curve; writes data/efficiency_quick.{png,json}")
    ap.add_argument("--run", action="append", default=None, help=f"active-learning run directory (repeatable; default {DEFAULT_RUN})")
    ap.add_argument("--grid", default=None, help="grid-conditioning curve: .json or .npz with energy_evaluations, wall_s, kld")
    ap.add_argument("--md", default=os.path.join(HERE, "data", "aldp_md.npz"))
    ap.add_argument("--metad", default=os.path.join(HERE, "data", "aldp_reference.npz"))
    ap.add_argument("--walker", type=int, default=0, help="metadynamics walker used as the single-run peer")
    ap.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    ap.add_argument("--metad-points", type=int, default=None, help="points on the metaD curve (quick 60, full 200)")
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.png = args.png or os.path.join(HERE, "data", f"efficiency{suffix}.png")
    args.json = args.json or os.path.join(HERE, "data", f"efficiency{suffix}.json")
    args.metad_points = args.metad_points or (60 if args.quick else 200)
    runs = args.run or [DEFAULT_RUN]
    levels = sorted(args.levels, reverse=True)

    reference = metrics.load_reference("alanine-dipeptide")
    floor = smoothing_floor(reference)
    notes, curves = [], []

    def find(path, quick_name):
        if os.path.isfile(path):
            return path
        alt = os.path.join(HERE, "data", quick_name)
        if args.quick and os.path.isfile(alt):
            notes.append(f"{path} missing: used {alt} (smoke-run data)")
            return alt
        if args.quick:
            notes.append(f"{path} missing: curve skipped")
            return None
        raise SystemExit(f"{path} not found (run the baseline first, or use --quick)")

    p = find(args.md, "aldp_md_quick.npz")
    md = md_curve(p, reference, floor) if p else None
    p = find(args.metad, "aldp_reference_quick.npz")
    metad = metad_curve(p, reference, floor, args.metad_points, args.walker) if p else None
    ours = [run_curve(r) for r in runs]
    if args.grid:
        ours.append(grid_curve(args.grid))
    for c in ours:
        if "skipped" in c:
            notes.append(f"{c['name']}: skipped ({c['skipped']})")
    for c in (md, metad):
        if c is not None and c["partial"]:
            notes.append(f"{c['name']}: input marked partial (run stopped before its end); curve as far as it went")
    curves = [c for c in (md, metad) if c is not None] + ours

    costs = {c["key"]: level_costs(c, levels, extrapolate_missing=c["key"] in ("md", "metad")) for c in curves}
    if metad is not None and metad.get("kld_vs_other_walker_reference") is not None:
        indep = dict(metad, kld=metad["kld_vs_other_walker_reference"])
        costs["metad_vs_other_walker_reference"] = level_costs(indep, levels, extrapolate_missing=False)
    extrap = {}
    for c in (md, metad):
        if c is None:
            continue
        extrap[c["key"]] = [dict(level=float(L), **v) for L, v in costs[c["key"]].items() if v and v.get("extrapolated")]

    # ---------------------------------------------------------------- table
    date = time.strftime("%Y-%m-%d %H:%M %Z")
    lines = []
    base = [c for c in (md, metad) if c is not None]
    mine = list(ours)

    def our_cell(c, L):
        if "kld" not in c:
            return ("no data yet", "no data yet")
        got = costs[c["key"]].get(str(L))
        if got is None:
            nr = f"not reached (best {np.min(c['kld']):.3g})"
            return (nr, nr)
        return cell(got)

    head = ["KLD level"] + [f"{c['short']} {q}" for c in base + mine for q in ("evals", "wall")]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for L in levels:
        row = [f"{L:g}"]
        for c in base:
            row += list(cell(costs[c["key"]].get(str(L))))
        for c in mine:
            row += list(our_cell(c, L))
        lines.append("| " + " | ".join(row) + " |")
    ratio_lines = []
    if mine and base:
        head = ["KLD level", "curve"] + [f"{b['short']}/ours {q}" for b in base for q in ("evals", "wall")]
        ratio_lines.append("| " + " | ".join(head) + " |")
        ratio_lines.append("|" + "---|" * len(head))
        for L in levels:
            for c in mine:
                o = costs[c["key"]].get(str(L))
                row = [f"{L:g}", c["short"]]
                if "kld" not in c:
                    ratio_lines.append("| " + " | ".join(row + ["no data yet"] * (2 * len(base))) + " |")
                    continue
                for b in base:
                    bc = costs[b["key"]].get(str(L))
                    for q in ("evaluations", "wall_s"):
                        if o is None:
                            row.append("not reached")
                        elif bc is None:
                            row.append("-")
                        else:
                            r = fmt_ratio(bc[q], o[q])
                            if bc.get("extrapolated"):
                                r += " *"
                            if o.get("first_point"):
                                r = ">= " + r
                            row.append(r)
                ratio_lines.append("| " + " | ".join(row) + " |")

    print(f"# Efficiency: forward KLD to the WT-metaD reference vs cost, alanine dipeptide ({date})\n")
    print("\n".join(lines))
    print()
    if ratio_lines:
        print("\n".join(ratio_lines))
        print()
    print("* extrapolated with KLD = a/n + b (b = smoothing floor, a fitted to n >= n_last/5); "
          "'<=' reached at the first measured point (upper bound); "
          "† the curve rises above the level again later.")
    for c in curves:
        if "source" in c:
            print(f"- {c['name']}: {c['source']}")
    for c in (md, metad):
        if c is not None and c.get("fit"):
            f = c["fit"]
            print(f"- {c['name']} fit: a = {f['a']:.3g}, b = {f['b']:.4f} on {f['tail_points']} points "
                  f"{f['tail_from_evaluations']:.2e}..{f['tail_to_evaluations']:.2e} evaluations, rms log residual "
                  f"{f['rms_log_residual']:.3f}; a free power law there has exponent -{f['power_law_alpha']:.2f}")
    if metad is not None and metad.get("noise"):
        nz = metad["noise"]
        ks = [k for k in nz if k.startswith("kld_walker") and k.endswith("_reweighted")]
        print(f"- metaD noise level: " + ", ".join(f"{k} = {nz[k]:.4f}" for k in ks)
              + f"; reference's own error estimate {nz.get('reference_estimated_error_kld') or float('nan'):.4f}")
    if "metad_vs_other_walker_reference" in costs:
        kk = metad["kld_vs_other_walker_reference"]
        print("- metaD check against the other walker's bias alone (independent of this walker): final KLD "
              f"{kk[-1]:.4f} (vs {metad['kld'][-1]:.4f} against the reference); levels reached at "
              + ", ".join(f"{L:g}: {cell(costs['metad_vs_other_walker_reference'].get(str(L)))[0]}" for L in levels))
    print(f"- smoothing floor of any sample-based curve (MD, metaD): {floor:.4f}; a PMF model has no such floor")
    for n in notes:
        print(f"- note: {n}")

    caveats = [
        "metaD curve: walker 0 alone; the reference is the average of both walkers' final biases (walker 0 included), "
        "so the late part of the metaD curve is optimistic; see noise for the walker-0 vs walker-1 divergence.",
        "metaD wall time is derived (evaluations / the whole run's evaluations per second), not measured per walker.",
        "MD and metaD ran in one thread (Reference platform); the active-learning run uses its energy workers on all "
        "cores and its wall_s covers every phase (flow training, labels, ensemble, CG walkers); machine load differed "
        "between the runs, so wall-time ratios are indicative.",
        f"sample-based KLDs (MD, metaD) cannot go below the smoothing floor {floor:.4f}; the PMF KLD has no floor.",
        "extrapolations assume KLD = a/n + b beyond the measured range; a free power-law fit on the same tail is "
        "given as power_law_evaluations.",
    ]
    result = {"date": date, "command": " ".join(["efficiency.py"] + (argv if argv is not None else sys.argv[1:])),
              "levels": levels, "reference": {"name": "alanine-dipeptide (packaged WT-metaD)",
                                              "self_consistency_kld": reference.get("self_consistency_kld")},
              "smoothing_floor_kld": floor, "notes": notes, "caveats": caveats,
              "curves": [{k: v for k, v in c.items()} for c in curves], "costs": costs,
              "table_markdown": "\n".join(lines), "ratios_markdown": "\n".join(ratio_lines)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(_jsonable(result), fh, indent=1, allow_nan=False)
    if any("kld" in c for c in curves):
        plot(curves, extrap, levels, args.png, f"alanine dipeptide, forward KLD to the WT-metaD reference ({date})")
        print(f"\nwrote {args.png} and {args.json}")
    else:
        print(f"\nno curve to plot; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
