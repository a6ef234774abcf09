"""Observables that the CG coordinates do not contain, from backmapped equilibrium CG samples, against MD.

Alanine dipeptide, CG = (phi, psi). Equilibrium CG frames are backmapped with a trained flow (importance
weights normalised per frame, frames weighted equally) and four observables, defined exactly as in
benchmarks/aldp_common.py (omega1, omega2 peptide bonds; chi_cb the CB methyl rotor N-CA-CB-HB1; the N-CA-C
angle), are compared with

* plain MD (benchmarks/data/aldp_md.npz, 10.2 ns, a frame every 2 ps), standard errors from blocks of
  100 ps (50 frames);
* the well-tempered metadynamics reference (benchmarks/data/aldp_reference.npz, 110 ns), frames of the
  second half of each walker reweighted by exp(V(s, t) - c(t)) (standard errors from blocks of 50 frames).

Two sets of CG frames are backmapped:

* "PMF": (phi, psi) drawn from the packaged reference PMF (exp(-A) on its 100 x 100 grid, uniform within
  a bin): independent equilibrium CG samples, as CG dynamics on an exact PMF would give;
* "MD": the MD's own (phi, psi) frames: the same CG distribution as the MD, so any difference left is the
  backmapping's (the MD's basin populations differ from the reference's: it is 10 ns long).

Per observable: weighted mean and standard deviation with standard errors, and z = difference / combined
standard error. Angles in degrees; omega wrapped to [0, 360) (trans = 180); chi_cb through cos(3 chi) (its
three staggered wells make the plain mean meaningless) and its histogram.

    python benchmarks/backmap_observables.py --flow runs/ala2/flow.pt     # -> data/backmap_observables.{png,json,md}
    python benchmarks/backmap_observables.py --flow runs/ala2 --quick     # 400 frames x 4 -> *_quick.*
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import aldp_common as C  # noqa: E402

from openmm_cgflow.backmapping import iter_backmap  # noqa: E402
from openmm_cgflow.importance import weighted_estimate, weighted_histogram  # noqa: E402
from openmm_cgflow.metrics import load_reference, reference_grid_points  # noqa: E402
from openmm_cgflow.model_io import load_model  # noqa: E402
from openmm_cgflow_plugin.cgspace import wrap_periodic  # noqa: E402

NAMES = ["omega1", "omega2", "chi_cb", "angle_ncac"]
LABELS = {"omega1": "omega1 (ACE C-N), deg", "omega2": "omega2 (NME C-N), deg",
          "chi_cb": "chi_cb N-CA-CB-HB1, deg", "angle_ncac": "N-CA-C angle, deg"}


def representation(obs: dict) -> dict:
    """Continuous per-frame values for means and standard deviations: omega in [0, 360) deg, cos(3 chi_cb),
    N-CA-C in degrees."""
    deg = 180.0 / math.pi
    return {
        "omega1": np.mod(np.asarray(obs["omega1"], np.float64), 2 * math.pi) * deg,
        "omega2": np.mod(np.asarray(obs["omega2"], np.float64), 2 * math.pi) * deg,
        "cos3chi_cb": np.cos(3 * np.asarray(obs["chi_cb"], np.float64)),
        "angle_ncac": np.asarray(obs["angle_ncac"], np.float64) * deg,
    }


HIST = {"omega1": (np.linspace(140, 220, 41), lambda o: np.mod(o["omega1"], 2 * math.pi) * 180 / math.pi),
        "omega2": (np.linspace(140, 220, 41), lambda o: np.mod(o["omega2"], 2 * math.pi) * 180 / math.pi),
        "chi_cb": (np.linspace(-180, 180, 37), lambda o: np.asarray(o["chi_cb"]) * 180 / math.pi),
        "angle_ncac": (np.linspace(95, 130, 36), lambda o: np.asarray(o["angle_ncac"]) * 180 / math.pi)}


def pmf_cg_frames(n: int, seed: int) -> np.ndarray:
    ref = load_reference("alanine-dipeptide")
    p = np.asarray(ref["probabilities"], dtype=np.float64).ravel()
    pts = reference_grid_points(ref)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(p), size=n, p=p / p.sum())
    width = 2 * math.pi / int(round(math.sqrt(len(p))))
    return wrap_periodic(pts[idx] + rng.uniform(-0.5, 0.5, size=(n, 2)) * width, [True, True])


def backmapped_observables(flow, cgsystem, s, n_per_frame, seed, proposal_scale, batch_size=4096):
    """Stream the backmapping; keep only the observables [N] per sample, log weights and frame index."""
    obs = {k: [] for k in ("phi", "psi", *NAMES)}
    lw, index = [], []
    n_drawn = n_wrong = 0
    ess = np.zeros(len(s))
    for chunk in iter_backmap(s, flow, cgsystem, n_per_frame=n_per_frame, seed=seed, proposal_scale=proposal_scale,
                              batch_size=batch_size, progress=sys.stderr.isatty()):
        o = C.frame_observables(chunk.xyz.astype(np.float64))
        for k in obs:
            obs[k].append(o[k])
        lw.append(chunk.log_weights)
        index.append(chunk.index)
        ess[chunk.first_index: chunk.first_index + len(chunk.frame_ess)] = chunk.frame_ess
        n_drawn += chunk.n_drawn
        n_wrong += chunk.n_wrong_chirality
    out = {k: np.concatenate(v) for k, v in obs.items()}
    return out, np.concatenate(lw), np.concatenate(index), ess, n_drawn, n_wrong


def md_reference(path: str) -> dict:
    d = np.load(path)
    return {k: np.asarray(d[k], np.float64) for k in ("phi", "psi", *NAMES)}


def metad_reference(path: str):
    """Frames of the second half of every walker, with log weights bias - c (Tiwary-Parrinello), walker-major."""
    d = np.load(path)
    t, walker = np.asarray(d["time_ps"], np.float64), np.asarray(d["walker"])
    keep = np.zeros(len(t), bool)
    for w in np.unique(walker):
        m = walker == w
        keep |= m & (t >= 0.5 * t[m].max())
    obs = {k: np.asarray(d[k], np.float64)[keep] for k in ("phi", "psi", *NAMES)}
    lw = (np.asarray(d["bias_kT"], np.float64) - np.asarray(d["c_kT"], np.float64))[keep]
    return obs, lw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", required=True, help="trained alanine-dipeptide model: run directory or flow.pt")
    ap.add_argument("--frames", type=int, default=4000, help="CG frames drawn from the reference PMF")
    ap.add_argument("--md-frames", type=int, default=None, help="MD frames backmapped (default: all)")
    ap.add_argument("--per-frame", type=int, default=32, help="samples per CG frame (default 32)")
    ap.add_argument("--proposal-scale", type=float, default=1.3,
                    help="1: the flow; > 1 (default 1.3): defensive mixture with a widened flow (openmm_cgflow.importance.sample_proposal)")
    ap.add_argument("--md", default=os.path.join(HERE, "data", "aldp_md.npz"))
    ap.add_argument("--reference", default=os.path.join(HERE, "data", "aldp_reference.npz"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="400 frames x 4 per set")
    ap.add_argument("--out", default=None, help="output stem (default data/backmap_observables[_quick])")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.frames, args.md_frames, args.per_frame = min(args.frames, 400), 400, min(args.per_frame, 4)
    stem = args.out or os.path.join(HERE, "data", "backmap_observables" + ("_quick" if args.quick else ""))
    t_start = time.perf_counter()

    flow, cgsystem = load_model(args.flow)
    if cgsystem.n_atoms != 22 or list(cgsystem.cg_names) != ["phi", "psi"]:
        raise SystemExit(f"{args.flow}: expected an alanine-dipeptide (phi, psi) model, got {cgsystem.name}")
    md_obs = md_reference(args.md)
    mtd_obs, mtd_lw = metad_reference(args.reference)
    sets = {}
    s_pmf = pmf_cg_frames(args.frames, args.seed)
    n_md = len(md_obs["phi"]) if args.md_frames is None else min(args.md_frames, len(md_obs["phi"]))
    pick = np.linspace(0, len(md_obs["phi"]) - 1, n_md).round().astype(int)
    s_md = np.stack([md_obs["phi"][pick], md_obs["psi"][pick]], 1)
    for name, s in (("PMF", s_pmf), ("MD", s_md)):
        t0 = time.perf_counter()
        obs, lw, index, ess, n_drawn, n_wrong = backmapped_observables(flow, cgsystem, s, args.per_frame, args.seed + 1,
                                                                       args.proposal_scale)
        wall = time.perf_counter() - t0
        sets[name] = dict(obs=obs, lw=lw, index=index, ess=ess, n_drawn=n_drawn, n_wrong=n_wrong, wall=wall,
                          n_frames=len(s), s=s)
        dphi = np.abs(np.angle(np.exp(1j * (obs["phi"] - s[index, 0]))))
        print(f"{name}: {len(s)} CG frames x {args.per_frame}: {wall:.1f} s, mean ESS per frame {ess.mean():.2f}, "
              f"wrong chirality {n_wrong} of {n_drawn}, max |phi - s| {dphi.max():.1e} rad", flush=True)

    # ------------------------------------------------------------------ estimates
    rows = []
    md_rep = representation(md_obs)
    md_frame = np.arange(len(md_rep["angle_ncac"]))
    mtd_rep = representation(mtd_obs)
    results = {}
    for key in md_rep:
        md_e = weighted_estimate(md_rep[key], np.zeros(len(md_frame)), frame=md_frame, block_size=50)
        mtd_e = weighted_estimate(mtd_rep[key], mtd_lw, block_size=50)  # global weights; 100-ps blocks
        results[key] = {"MD": md_e, "metaD": mtd_e}
        for name, st in sets.items():
            rep = representation(st["obs"])[key]
            results[key][f"backmap {name}"] = weighted_estimate(rep, st["lw"], frame=st["index"])
            results[key][f"flow alone {name}"] = weighted_estimate(rep, np.zeros(len(rep)), frame=st["index"])

    # paired comparison on the MD's own CG frames: per frame, backmapped conditional mean minus the MD frame's
    # value; its mean over frames (SE from blocks of 50 frames = 100 ps) isolates the backmapping's error from
    # the MD's CG sampling noise
    paired = {}
    st = sets["MD"]
    w = np.exp(st["lw"])
    tot = np.bincount(st["index"], weights=w, minlength=st["n_frames"])
    ok = tot > 0
    for key in md_rep:
        rep = representation(st["obs"])[key]
        cond = np.bincount(st["index"], weights=w * rep, minlength=st["n_frames"])[ok] / tot[ok]
        d = cond - md_rep[key][pick][ok]
        paired[key] = weighted_estimate(d, np.zeros(len(d)), frame=np.arange(len(d)), block_size=50)

    def z(a, b, what):
        m, se = (a.mean, a.stderr) if what == "mean" else (a.std, a.std_stderr)
        m2, se2 = (b.mean, b.stderr) if what == "mean" else (b.std, b.std_stderr)
        return (m - m2) / math.hypot(se, se2)

    lines = ["| observable | source | mean | sd | z(mean) vs MD | z(sd) vs MD | z(mean) vs metaD | ESS |",
             "|---|---|---|---|---|---|---|---|"]
    unit = {"omega1": "deg", "omega2": "deg", "cos3chi_cb": "", "angle_ncac": "deg"}
    label = {"omega1": "omega1 [0, 360) deg", "omega2": "omega2 [0, 360) deg", "cos3chi_cb": "cos(3 chi_cb)",
             "angle_ncac": "N-CA-C angle, deg"}
    for key, res in results.items():
        fmt = "{:.3f}" if key == "cos3chi_cb" else "{:.2f}"
        for src, e in res.items():
            zm = "" if src == "MD" else f"{z(e, res['MD'], 'mean'):+.1f}"
            zs = "" if src == "MD" else f"{z(e, res['MD'], 'sd'):+.1f}"
            zt = "" if src in ("MD", "metaD") else f"{z(e, res['metaD'], 'mean'):+.1f}"
            lines.append(f"| {label[key]} | {src} | {fmt.format(e.mean)} +- {fmt.format(e.stderr)} | "
                         f"{fmt.format(e.std)} +- {fmt.format(e.std_stderr)} | {zm} | {zs} | {zt} | {e.ess:,.0f} |")
            rows.append(dict(observable=key, source=src, mean=e.mean, stderr=e.stderr, sd=e.std, sd_stderr=e.std_stderr,
                             ess=e.ess, z_mean_vs_md=None if src == "MD" else z(e, res["MD"], "mean"),
                             z_sd_vs_md=None if src == "MD" else z(e, res["MD"], "sd")))
    lines += ["", "Paired: backmapped conditional mean at each MD frame's (phi, psi) minus that frame's value, averaged "
              "over the MD frames:", "", "| observable | mean difference | z |", "|---|---|---|"]
    for key, e in paired.items():
        fmt = "{:+.4f}" if key == "cos3chi_cb" else "{:+.3f}"
        lines.append(f"| {label[key]} | {fmt.format(e.mean)} +- {fmt.format(e.stderr).lstrip('+')} | "
                     f"{e.mean / e.stderr:+.1f} |")
        rows.append(dict(observable=key, source="paired backmap MD - MD", mean=e.mean, stderr=e.stderr))
    table = "\n".join(lines)
    # CG populations of the sources (phi, psi basins as in aldp_common / md_baseline)
    def pops(phi, psi, w=None):
        w = np.ones(len(phi)) / len(phi) if w is None else w / w.sum()
        a = (phi < 0) & (psi > -2.0) & (psi < 1.0)
        return {"beta_C7eq": float(w[(phi < 0) & ~a].sum()), "alpha_R": float(w[a].sum()), "phi_pos": float(w[phi >= 0].sum())}

    mw = np.exp(mtd_lw - mtd_lw.max())
    pop = {"MD": pops(md_obs["phi"], md_obs["psi"]), "metaD": pops(mtd_obs["phi"], mtd_obs["psi"], mw),
           "PMF frames": pops(s_pmf[:, 0], s_pmf[:, 1])}
    pop_lines = ["| CG frames | beta/C7eq | alpha_R | phi > 0 |", "|---|---|---|---|"]
    for k, v in pop.items():
        pop_lines.append(f"| {k} | {v['beta_C7eq']:.3f} | {v['alpha_R']:.3f} | {v['phi_pos']:.4f} |")
    print("\n" + table + "\n\n" + "\n".join(pop_lines))

    # ------------------------------------------------------------------ plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key in zip(axes, NAMES):
        edges, f = HIST[key]
        centres = 0.5 * (edges[1:] + edges[:-1])
        width = np.diff(edges)
        h_md = np.histogram(f(md_obs), bins=edges)[0] / len(md_obs["phi"]) / width
        ax.step(centres, h_md, where="mid", color="k", lw=1.6, label=f"plain MD ({len(md_obs['phi'])} frames)")
        h_mtd = np.histogram(f(mtd_obs), bins=edges, weights=mw / mw.sum())[0] / width
        ax.step(centres, h_mtd, where="mid", color="0.55", lw=1.2, ls="--", label="metaD, reweighted")
        for (name, st), col in zip(sets.items(), ("C0", "C3")):
            v = f(st["obs"])
            h, se, _ = weighted_histogram(v, st["lw"], frame=st["index"], bins=edges)
            ax.errorbar(centres, h, yerr=se, fmt="o", ms=2.5, color=col, lw=0.8,
                        label=f"backmapped, CG from {name}")
            if name == "PMF":
                hq = np.histogram(v, bins=edges)[0] / len(v) / width
                ax.step(centres, hq, where="mid", color=col, lw=0.8, alpha=0.5, label="flow alone (unweighted)")
        ax.set_xlabel(LABELS[key])
        ax.set_ylabel("density")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"alanine dipeptide: backmapped observables vs MD ({os.path.basename(os.path.abspath(args.flow))}, "
                 f"{args.per_frame} samples per CG frame)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    fig.savefig(stem + ".png", dpi=120)

    meta = dict(flow=os.path.abspath(args.flow), argv=sys.argv[1:], date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                per_frame=args.per_frame, proposal_scale=args.proposal_scale, populations=pop,
                sets={k: dict(n_frames=v["n_frames"], n_drawn=v["n_drawn"], n_wrong_chirality=v["n_wrong"],
                              mean_frame_ess=float(v["ess"].mean()), wall_s=v["wall"]) for k, v in sets.items()},
                rows=rows, wall_s=time.perf_counter() - t_start)
    with open(stem + ".json", "w") as fh:
        json.dump(meta, fh, indent=1, default=float)
    with open(stem + ".md", "w") as fh:
        fh.write(table + "\n\n" + "\n".join(pop_lines) + "\n")
    print(f"\nwrote {stem}.png, {stem}.json, {stem}.md ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
