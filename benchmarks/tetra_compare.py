"""Alanine tetrapeptide: a learned six-dimensional PMF against the plain-MD reference, per residue (issue #14).

For each residue r (ALA2, ALA3, ALA4: CG columns (phi_r, psi_r) = (0, 1), (2, 3), (4, 5)) the metric is the
project's forward KLD D(p_ref || p) on 100 x 100 bins of [-pi, pi)^2 (smoothed histograms, openmm_cgflow.metrics).

* The learned PMF's 2-D marginals come from importance samples of exp(-A) over the 6-torus
  (:func:`openmm_cgflow_plugin.marginals.importance_samples`; its ESS is printed), smoothed as the metric
  smooths sample histograms.
* The reference is benchmarks/tetra_md.py's plain MD (``--reference``, its walker directories). Its own error:
  the forward KLD between the two halves of every walker's frames (as tetra_md.py --report prints).
* Plain MD at the same cost: a run spends one energy evaluation per MD step, so the learned run's E energy
  evaluations buy E steps of 2 fs, split over two walkers (two cores). The MD estimate takes whole walkers'
  frames up to E steps in all (walkers in order, rotated ``--rotations`` times), and is scored against a
  reference made of the *other* walkers only (held out: the estimate is never compared with itself). The
  learned PMF is scored against the same held-out references, so both columns share their reference noise.

Beside the KLD it prints, per residue, the basin populations of both marginals (alpha_R, beta/PPII, phi > 0 as
:func:`openmm_cgflow.metrics.basin_populations` defines them) and the free-energy differences between basins
(kT), which say where a KLD comes from.

Writes a JSON (``--json``) and a PNG (``--png``): per residue the reference's and the learned marginal free
energies (kT) side by side. ``--all-iterations`` also scores every pmfs/pmf_NNN.pt of the run against the full
reference (KLD against energy evaluations).

    python benchmarks/tetra_compare.py --run runs/tetra --reference runs/tetra_md --json tetra_compare.json \
        --png tetra_marginals.png
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from openmm_cgflow import metrics  # noqa: E402
from openmm_cgflow_plugin import load_pmf  # noqa: E402
from openmm_cgflow_plugin.marginals import importance_samples, marginal_free_energy  # noqa: E402

import tetra_md  # noqa: E402

RESIDUES = ("ALA2", "ALA3", "ALA4")
BINS = 100
STEP_PS = 0.002


def learned_probabilities(pmf_path: str, n_samples: int, seed: int):
    """(per residue the learned PMF's marginal probabilities [100, 100], Kish ESS of the importance samples)."""
    pmf = load_pmf(pmf_path)
    smp = importance_samples(pmf, n_samples=n_samples, seed=seed)
    out = [marginal_free_energy(pmf, (2 * r, 2 * r + 1), BINS, method="importance", samples=smp).probabilities
           for r in range(3)]
    return out, smp.ess


def md_subsets(walkers: list[np.ndarray], n_steps: float, frame_ps: float, rotations: int):
    """Yield (estimate frames, held-out frames): whole walkers in rotated order up to ``n_steps`` MD steps."""
    frames_needed = int(round(n_steps * STEP_PS / frame_ps))
    n = len(walkers)
    for k in range(rotations):
        order = [(k * max(1, n // rotations) + i) % n for i in range(n)]
        est, used = [], 0
        for i in order:
            if used >= frames_needed:
                break
            take = walkers[i][: frames_needed - used]
            est.append(take)
            used += len(take)
        rest = [walkers[i] for i in order[len(est):]]
        if used < frames_needed or not rest:
            return
        yield np.concatenate(est), np.concatenate(rest)


def plot(ref: list[np.ndarray], learned: list[np.ndarray], klds: list[float], png: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 7.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, squeeze=False)
    c = 0.5 * (np.linspace(-math.pi, math.pi, BINS + 1)[1:] + np.linspace(-math.pi, math.pi, BINS + 1)[:-1])
    for r in range(3):
        for row, (p, what) in enumerate(((ref[r], "plain MD"), (learned[r], "learned"))):
            f = -np.log(p)
            f -= f.min()
            ax = axes[row, r]
            im = ax.pcolormesh(c, c, np.minimum(f, 8.0).T, shading="auto", cmap="viridis", vmin=0, vmax=8)
            ax.contour(c, c, f.T, levels=np.arange(1, 8), colors="white", linewidths=0.4, alpha=0.6)
            ax.set_title(f"{RESIDUES[r]} {what}" + (f", KLD {klds[r]:.3f}" if row else ""), fontsize=10)
            ax.set_xlabel(f"phi {RESIDUES[r]} (rad)")
            ax.set_ylabel(f"psi {RESIDUES[r]} (rad)")
            ax.set_aspect("equal")
        fig.colorbar(im, ax=axes[:, r], label="free energy (kT)", shrink=0.6)
    fig.suptitle(title)
    fig.savefig(png, dpi=100)


BASINS = ("alpha_R", "beta_C7eq", "phi_pos")


def basin_rows(ref: list, learned: list) -> list[dict]:
    """Per residue: the basins' populations (reference, learned) and the learned - reference free-energy
    difference of beta/PPII and of phi > 0 against alpha_R (kT)."""
    rows = []
    for r in range(3):
        pr, pl = metrics.basin_populations(ref[r]), metrics.basin_populations(learned[r])
        dd = {b: float(-math.log(pl[b] / pl["alpha_R"]) + math.log(pr[b] / pr["alpha_R"])) if min(pl[b], pr[b]) > 0
              else float("nan") for b in BASINS[1:]}
        rows.append({"residue": RESIDUES[r], "reference": pr, "learned": pl, "dA_vs_alpha_R_error_kT": dd})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory of cgflow run alanine-tetrapeptide")
    ap.add_argument("--reference", required=True,
                    help="benchmarks/tetra_md.py output directory or its --pack file (data/tetrapeptide_md.npz)")
    ap.add_argument("--frame-ps", type=float, default=1.0, help="the reference's frame interval (ps)")
    ap.add_argument("--samples", type=int, default=400_000, help="importance samples of the learned PMF")
    ap.add_argument("--rotations", type=int, default=4, help="held-out walker subsets for the MD comparison")
    ap.add_argument("--all-iterations", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()

    walkers = [w for w in tetra_md.load_frames(args.reference) if len(w)]
    allf = np.concatenate(walkers)
    halves = tetra_md.halves_kld(walkers)
    ref = tetra_md.residue_probabilities(allf)
    records = [json.loads(line) for line in open(os.path.join(args.run, "iterations.jsonl"))]
    evals = int(records[-1]["energy_evaluations"])
    learned, ess = learned_probabilities(os.path.join(args.run, "pmf.pt"), args.samples, args.seed)
    kld = [metrics.forward_kld(ref[r], learned[r]) for r in range(3)]

    md_rows = []
    for est, rest in md_subsets(walkers, evals, args.frame_ps, args.rotations):
        held = tetra_md.residue_probabilities(rest)
        md_rows.append({"md": [metrics.forward_kld(held[r], p) for r, p in enumerate(tetra_md.residue_probabilities(est))],
                        "learned": [metrics.forward_kld(held[r], learned[r]) for r in range(3)],
                        "md_frames": len(est), "held_out_frames": len(rest)})

    curve = []
    if args.all_iterations:
        for path in sorted(glob.glob(os.path.join(args.run, "pmfs", "pmf_*.pt"))):
            it = int(os.path.basename(path)[4:7])
            probs, e = learned_probabilities(path, args.samples, args.seed)
            curve.append({"iteration": it, "energy_evaluations": records[it]["energy_evaluations"] if it < len(records)
                          else None, "kld": [metrics.forward_kld(ref[r], probs[r]) for r in range(3)], "ess": e})
            print(f"iteration {it}: KLD " + ", ".join(f"{k:.4f}" for k in curve[-1]["kld"]), flush=True)

    ns = len(allf) * args.frame_ps / 1000.0
    print(f"reference: {len(walkers)} walkers, {ns:.1f} ns; run: {len(records)} iterations, {evals:,} energy "
          f"evaluations, wall {records[-1]['wall_s'] / 60:.1f} min; importance samples ESS {ess:,.0f}")
    print("\n| residue | learned PMF KLD (full reference) | reference error (halves KLD) | learned vs held-out "
          "(mean) | plain MD, same evaluations, vs held-out (mean, min-max) |\n|---|---|---|---|---|")
    for r in range(3):
        md = [row["md"][r] for row in md_rows]
        ln = [row["learned"][r] for row in md_rows]
        md_txt = f"{np.mean(md):.4f} ({min(md):.4f}-{max(md):.4f})" if md else "n/a"
        print(f"| {RESIDUES[r]} | {kld[r]:.4f} | {halves[r]:.4f} | {np.mean(ln) if ln else float('nan'):.4f} | "
              f"{md_txt} |")
    basins = basin_rows(ref, learned)
    print("\n| residue | alpha_R: learned / reference | beta/PPII | phi > 0 | error of A(beta) - A(alpha_R) (kT) | "
          "error of A(phi > 0) - A(alpha_R) (kT) |\n|---|---|---|---|---|---|")
    for row in basins:
        pops = " | ".join(f"{row['learned'][b]:.3f} / {row['reference'][b]:.3f}" for b in BASINS)
        err = row["dA_vs_alpha_R_error_kT"]
        print(f"| {row['residue']} | {pops} | {err['beta_C7eq']:+.2f} | {err['phi_pos']:+.2f} |")
    if args.png:
        plot(ref, learned, kld, args.png, f"alanine tetrapeptide: {evals / 1e6:.1f}e6 energy evaluations, "
             f"reference {ns:.0f} ns plain MD")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "machine": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} cores",
                       "run_iterations": len(records), "run_energy_evaluations": evals,
                       "run_wall_s": records[-1]["wall_s"], "reference_ns": ns, "reference_walkers": len(walkers),
                       "reference_halves_kld": halves, "learned_kld": kld, "importance_ess": ess,
                       "md_same_evaluations": md_rows, "basins": basins, "curve": curve}, fh, indent=1)


if __name__ == "__main__":
    main()
