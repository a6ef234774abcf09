"""Grid conditioning for alanine dipeptide: the conditional flow trained by energy at a fixed grid of CG points.

No active learning: a regular G x G grid of (phi, psi) points (the centres of G x G cells of [-pi, pi)^2,
radians, IUPAC sign) is fixed once, and the conditional flow q(fine | phi, psi) is trained by energy
(reverse KL + importance-weighted forward KL, :class:`openmm_cgflow.training.Trainer`) at all of them, in
rounds. After every round: free-energy labels at every grid point (:func:`openmm_cgflow.free_energy.free_energy`,
``--label-samples`` flow samples each), a PMF ensemble fitted to them and exported to ``pmf.pt``, the forward
KLD to the packaged well-tempered-metadynamics reference (:func:`openmm_cgflow.metrics.kld_from_pmf`), and
the energy evaluations (training + labels) and wall time so far. This is the "grid" curve of the
efficiency benchmark (``python benchmarks/efficiency.py --grid OUT/efficiency_curve.npz``) and the check of
the energy-trained conditional flow:

* mean ESS/N over the grid, logged per epoch, >= 0.3 at the end. Two figures are reported: the last
  training epoch's mean Kish ESS/N (``--samples-per-point`` samples per point, as logged per epoch) and the
  final labels' mean ESS/N (``--label-samples`` per point). With few samples Kish ESS/N is biased upwards,
  so the label figure is the stricter one;
* >= 99 % of all raw samples (training + labels, before any filter) are L-alanine. Strict count: a
  sample is L only if its geometry is finite and has the reference handedness (non-finite samples count
  as not L);
* the free energies at the C7eq/beta, alpha_R and alpha_L minima agree with the reference within 0.3 kT
  after aligning at the reference's global minimum (in the C7eq/beta basin). The minima are the
  reference's own: the lowest bin of its 100 x 100 free energy in the boxes C7eq/beta (phi < 0 and
  0.5 < psi < 3.1 or psi < -2.5), alpha_R (phi < 0, -1.5 < psi < 0.5), alpha_L (phi > 0, -0.5 < psi < 1.5).
  Primary figure: the ensemble mean at those minima. Also reported: the labels at the grid point nearest
  to each minimum against the reference interpolated (bilinear, periodic) at that same grid point, and
  basin free energies -ln sum exp(-A) over each box (ensemble on the 100 x 100 bin centres against the
  reference's probabilities).

The reference is OpenMM's: amber96 + OBC implicit solvent, 300 K, the same System as
``builtin("alanine-dipeptide")`` (benchmarks/reference_metad.py).

Hyperparameters default to those of active learning (:class:`openmm_cgflow.settings.LearnerSettings`):
float32 flow of the package's default size, Adam lr 1e-3 with 50 warm-up steps decaying geometrically to 1e-4
(here over all epochs of all rounds, continued across rounds and resumes), drop_worst 2, forward_weight 0.5,
16 samples per point per epoch, at most 64 points per optimiser step (the batches of an epoch are balanced:
400 points -> 7 steps, six of 58 points and one of 52).

Cost estimate of the full default (G = 20, 400 points, 12 rounds x 50 epochs, 128 label samples):
600 epochs x 400 points x 16 = 3.84 M training samples in 4,200 optimiser steps of ~910 samples, plus
12 x 51,200 = 0.61 M label samples; energy evaluations 4.45 M in all. Training dominates: at 2,000-2,700
samples/s end to end (the float32 flow step with its forward-KL pass, 1,500-3,500 samples/s on the
machine's cores, plus ~45,000 energies/s from 2 OpenMM workers; the first epochs of an active-learning run
on an idle 2-core machine took 1.2 s per 3,200 samples, ~2,700/s; this script with 1 torch thread at load
average 5.4 on 2 cores: 8 s per 6,400-sample epoch, ~800/s) training takes 24-32 min; labels (no backward
pass) ~1-2 min and 12 ensemble fits of 400 labels ~1-1.5 min. Expected: ~30-35 min on an otherwise idle
2-core machine (2-3x longer when other jobs share the cores). Why ESS/N >= 0.3 is expected within that: the
first active-learning iteration (200 points, 4 steps per epoch, same hyperparameters) reached a training
mean ESS/N of ~0.2 after ~120 optimiser steps and still rising; the full grid run takes 4,200 steps. This is
an estimate, not a measurement: epochs.jsonl records what the run reached.

Outputs (``--out``, default benchmarks/data/aldp_grid/, quick mode benchmarks/data/aldp_grid_quick/):

* ``epochs.jsonl``: one line per epoch: round, epoch, loss, mean/min ESS/N over the grid, raw
  wrong-chirality and non-finite fractions of that epoch's samples, learning rate, cumulative energy
  evaluations and wall time;
* ``rounds.jsonl``: one line per round: energy_evaluations (cumulative, training + labels), wall_s
  (cumulative: training, labels, ensemble fit, export; not the KLD measurement), kld, mean_ess (labels),
  epoch_mean_ess (last epoch), wrong_chirality_fraction (cumulative, all raw samples), basin comparison;
* ``efficiency_curve.npz``: arrays energy_evaluations, wall_s, kld (one entry per round);
* ``labels.npz``: the latest labels (s, A, stderr, ess_fraction, n_wrong_chirality, n_nonfinite);
* ``pmf.pt``: the latest ensemble (TorchScript, for openmm_cgflow_plugin); ``flow.pt``: the latest flow
  (openmm_cgflow.model_io.load_model);
* ``checkpoint.pt``: flow + optimiser + all round results, written atomically after every round
  (``--resume`` continues after the last finished round; same seed, same result);
* ``summary.json``: settings, final figures and the three checks.

``checkpoint.pt`` and ``flow.pt`` (~20 MB) are listed in the folder's own ``.gitignore``.

  python benchmarks/aldp_grid.py --quick --overwrite     # G = 4, 1 round of 2 epochs, 16 label samples (< 1 min)
  OMP_NUM_THREADS=1 nohup python benchmarks/aldp_grid.py --no-progress > aldp_grid.log 2>&1 &   # full, ~30-35 min
  OMP_NUM_THREADS=1 nohup python benchmarks/aldp_grid.py --no-progress --resume >> aldp_grid.log 2>&1 &
                                                         # continue an interrupted full run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as _platform
import sys
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from aldp_common import save_npz_atomic  # noqa: E402

from openmm_cgflow import builtin, metrics  # noqa: E402
from openmm_cgflow.bridge import EnergyBridge  # noqa: E402
from openmm_cgflow.ensemble import export_pmf  # noqa: E402
from openmm_cgflow.ensemble_fit import fit_ensemble  # noqa: E402
from openmm_cgflow.flow import flow_for  # noqa: E402
from openmm_cgflow.free_energy import free_energy  # noqa: E402
from openmm_cgflow.model_io import save_model  # noqa: E402
from openmm_cgflow.settings import DTYPES  # noqa: E402
from openmm_cgflow.training import Trainer  # noqa: E402
from openmm_cgflow_plugin.files import atomic_write  # noqa: E402

CHECKPOINT_FORMAT = "openmm-cgflow-aldp-grid/1"
SYSTEM = "alanine-dipeptide"
#: Settings that define the run (a resumed run must use the same ones).
RUN_KEYS = ("grid", "rounds", "epochs_per_round", "label_samples", "lr", "lr_final", "warmup_steps", "drop_worst",
            "forward_weight", "samples_per_point", "points_per_batch", "n_models", "flow_dtype", "path_gradient",
            "seed")
#: Basin boxes (radians) in which the reference's minima are looked up.
BASINS = {
    "C7eq_beta": lambda phi, psi: (phi < 0) & (((psi > 0.5) & (psi < 3.1)) | (psi < -2.5)),
    "alpha_R": lambda phi, psi: (phi < 0) & (psi > -1.5) & (psi < 0.5),
    "alpha_L": lambda phi, psi: (phi > 0) & (psi > -0.5) & (psi < 1.5),
}
TOLERANCE_KT = 0.3
ESS_TARGET = 0.3
L_TARGET = 0.99


# --------------------------------------------------------------------------------------------- helpers
def grid_points(g: int) -> np.ndarray:
    """Centres of the g x g cells of [-pi, pi)^2 as points [g * g, 2] (phi, psi), phi along the first axis."""
    c = metrics.torus_bin_centres(g)
    phi, psi = np.meshgrid(c, c, indexing="ij")
    return np.stack([phi.ravel(), psi.ravel()], axis=1)


def balanced_batch(m: int, at_most: int) -> int:
    """Points per step so that the steps of an epoch are as equal as possible, each <= at_most."""
    steps = math.ceil(m / max(1, min(at_most, m)))
    return math.ceil(m / steps)


def lr_at(epoch: int, total: int, lr: float, lr_final: float) -> float:
    """Geometric decay lr -> lr_final over epochs 0 .. total - 1 of the whole run."""
    if total <= 1:
        return lr
    return lr * (lr_final / lr) ** (epoch / (total - 1))


def periodic_bilinear(F: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of F [n, n] given at the torus bin centres, periodic, at points [K, 2]."""
    n = F.shape[0]
    h = 2 * math.pi / n
    out = []
    for phi, psi in np.atleast_2d(pts):
        u, v = (phi + math.pi) / h - 0.5, (psi + math.pi) / h - 0.5
        i0, j0 = math.floor(u), math.floor(v)
        fu, fv = u - i0, v - j0
        i0, j0 = i0 % n, j0 % n
        i1, j1 = (i0 + 1) % n, (j0 + 1) % n
        out.append((1 - fu) * (1 - fv) * F[i0, j0] + fu * (1 - fv) * F[i1, j0]
                   + (1 - fu) * fv * F[i0, j1] + fu * fv * F[i1, j1])
    return np.asarray(out)


def periodic_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = (d + math.pi) % (2 * math.pi) - math.pi
    return np.sqrt((d ** 2).sum(-1))


def reference_basins(ref: dict) -> dict:
    """The reference's minimum (lowest bin) in each basin box, its basin free energy and the box masks."""
    F = np.asarray(ref["free_energy_kT"], dtype=np.float64)
    p = np.asarray(ref["probabilities"], dtype=np.float64)
    cphi = 0.5 * (ref["edges"][0][:-1] + ref["edges"][0][1:])
    cpsi = 0.5 * (ref["edges"][1][:-1] + ref["edges"][1][1:])
    phi, psi = np.meshgrid(cphi, cpsi, indexing="ij")
    out = {}
    for name, box in BASINS.items():
        mask = box(phi, psi)
        i = np.unravel_index(np.argmin(np.where(mask, F, np.inf)), F.shape)
        out[name] = {"phi": float(phi[i]), "psi": float(psi[i]), "F_ref_kT": float(F[i]), "mask": mask,
                     "basin_F_ref_kT": float(-np.log(p[mask].sum()))}
    g = np.unravel_index(np.argmin(F), F.shape)
    glob = [n for n, b in out.items() if b["mask"][g]]
    align = glob[0] if glob else "C7eq_beta"
    return {"basins": out, "align": align, "global_min": [float(phi[g]), float(psi[g])], "F": F}


def compare_basins(refb: dict, A_grid100: np.ndarray, ens, points: np.ndarray, labels_A: np.ndarray) -> dict:
    """Differences (kT) to the reference at the three minima after aligning at ``refb['align']``.

    ``A_grid100``: ensemble mean on the reference's bin centres [n, n]; ``ens``: the ensemble (callable on
    a float64 tensor [K, 2]); ``points``/``labels_A``: grid points and their labels.
    """
    basins, align, F = refb["basins"], refb["align"], refb["F"]
    names = list(basins)
    minima = np.array([[basins[n]["phi"], basins[n]["psi"]] for n in names])
    with torch.no_grad():
        a_min = ens(torch.as_tensor(minima, dtype=torch.float64)).numpy()
    f_min = np.array([basins[n]["F_ref_kT"] for n in names])
    k = names.index(align)
    ens_diff = (a_min - a_min[k]) - (f_min - f_min[k])
    # labels at the nearest grid point vs the reference interpolated at that grid point
    near = [int(np.argmin(periodic_distance(points, m))) for m in minima]
    a_lab = np.asarray(labels_A)[near]
    f_lab = periodic_bilinear(F, points[near])
    lab_diff = (a_lab - a_lab[k]) - (f_lab - f_lab[k])
    # basin free energies
    finite = np.isfinite(A_grid100)
    a0 = A_grid100[finite].min()
    b_model = np.array([-np.log(np.exp(-(A_grid100[basins[n]["mask"] & finite] - a0)).sum()) + a0 for n in names])
    b_ref = np.array([basins[n]["basin_F_ref_kT"] for n in names])
    basin_diff = (b_model - b_model[k]) - (b_ref - b_ref[k])
    out = {"aligned_at": align, "tolerance_kT": TOLERANCE_KT}
    for i, n in enumerate(names):
        out[n] = {
            "minimum": [round(float(minima[i, 0]), 4), round(float(minima[i, 1]), 4)],
            "ref_kT": float(f_min[i] - f_min[k]),
            "ensemble_kT": float(a_min[i] - a_min[k]),
            "ensemble_minus_ref_kT": float(ens_diff[i]),
            "nearest_grid_point": [round(float(points[near[i], 0]), 4), round(float(points[near[i], 1]), 4)],
            "label_kT": float(a_lab[i] - a_lab[k]),
            "ref_at_grid_point_kT": float(f_lab[i] - f_lab[k]),
            "label_minus_ref_kT": float(lab_diff[i]),
            "basin_model_kT": float(b_model[i] - b_model[k]),
            "basin_ref_kT": float(b_ref[i] - b_ref[k]),
            "basin_minus_ref_kT": float(basin_diff[i]),
        }
    out["max_abs_ensemble_kT"] = float(np.max(np.abs(ens_diff)))
    out["max_abs_label_kT"] = float(np.max(np.abs(lab_diff))) if np.all(np.isfinite(lab_diff)) else float("inf")
    out["max_abs_basin_kT"] = float(np.max(np.abs(basin_diff)))
    out["pass_ensemble"] = bool(out["max_abs_ensemble_kT"] <= TOLERANCE_KT)
    out["pass_labels"] = bool(out["max_abs_label_kT"] <= TOLERANCE_KT)
    return out


def jsonable(o):
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return jsonable(o.item())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_jsonl(path: str, records) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for r in records:
            fh.write(json.dumps(jsonable(r)) + "\n")
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(jsonable(obj), fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def seed_of(*parts) -> int:
    return int(np.random.default_rng(list(parts)).integers(2 ** 62))


def check_finite(flow) -> None:
    for name, p in flow.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"flow parameter {name} became non-finite; lower --lr (the last checkpoint is intact)")


def fmt_round(r: dict) -> str:
    b = r["basins"]
    return (f"round {r['round'] + 1}/{r['rounds']} | epochs {r['epochs_done']} | evals {r['energy_evaluations']:,} | "
            f"wall {r['wall_s']:.0f} s | KLD {r['kld']:.4f} | ESS/N labels {r['mean_ess']:.3f} "
            f"(min {r['min_ess']:.3f}), last epoch {r['epoch_mean_ess']:.3f} | "
            f"wrong chirality {r['wrong_chirality_fraction']:.2e} | basins vs ref (kT, aligned at {b['aligned_at']}): "
            + ", ".join(f"{n} {b[n]['ensemble_minus_ref_kT']:+.2f}" for n in BASINS))


# ------------------------------------------------------------------------------------------------ main
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: G = 4, 1 round of 2 epochs, 16 label samples")
    ap.add_argument("--grid", type=int, default=None, help="G: G x G grid points (default 20; quick 4)")
    ap.add_argument("--rounds", type=int, default=None, help="training rounds (default 12; quick 1)")
    ap.add_argument("--epochs-per-round", type=int, default=None, help="epochs per round (default 50; quick 2)")
    ap.add_argument("--label-samples", type=int, default=None, help="flow samples per grid point for the labels "
                    "(default 128; quick 16)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-final", type=float, default=1e-4, help="learning rate of the last epoch of the last round")
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--drop-worst", type=int, default=2)
    ap.add_argument("--forward-weight", type=float, default=0.5)
    ap.add_argument("--samples-per-point", type=int, default=16)
    ap.add_argument("--points-per-batch", type=int, default=64, help="at most this many points per step (balanced)")
    ap.add_argument("--path-gradient", action="store_true", help="path-wise reverse-KL gradient (Trainer option)")
    ap.add_argument("--n-models", type=int, default=10, help="ensemble size")
    ap.add_argument("--flow-dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="OpenMM energy worker processes (0: in-process)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/data/aldp_grid[_quick]/)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished round")
    ap.add_argument("--overwrite", action="store_true", help="delete the outputs of an earlier run in --out first")
    ap.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    args = ap.parse_args(argv)
    quick = dict(grid=4, rounds=1, epochs_per_round=2, label_samples=16)
    full = dict(grid=20, rounds=12, epochs_per_round=50, label_samples=128)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = os.path.join(HERE, "data", "aldp_grid_quick" if args.quick else "aldp_grid")
    for k in ("grid", "rounds", "epochs_per_round", "label_samples", "samples_per_point", "points_per_batch",
              "n_models"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.samples_per_point < 2:
        ap.error("--samples-per-point must be >= 2 (the ESS and the forward-KL term need several samples per point)")
    if not (0 < args.lr_final <= args.lr):
        ap.error("need 0 < --lr-final <= --lr")
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite exclude each other")
    return args


OUTPUTS = ("checkpoint.pt", "epochs.jsonl", "rounds.jsonl", "summary.json", "efficiency_curve.npz", "labels.npz",
           "pmf.pt", "flow.pt")


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".gitignore"), "w") as fh:
        fh.write("# large, regenerated by benchmarks/aldp_grid.py\ncheckpoint.pt\nflow.pt\n*.tmp\n")
    ck_path = os.path.join(out, "checkpoint.pt")
    if args.overwrite:
        for name in OUTPUTS:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    if os.path.exists(ck_path) and not args.resume:
        raise SystemExit(f"{out} holds a run (checkpoint.pt): pass --resume to continue it, --overwrite to start "
                         "over, or choose another --out")

    settings = {k: getattr(args, k) for k in RUN_KEYS}
    cgsystem = builtin(SYSTEM)
    points = grid_points(args.grid)
    m = len(points)
    ppb = balanced_batch(m, args.points_per_batch)
    total_epochs = args.rounds * args.epochs_per_round
    reference = metrics.load_reference(SYSTEM)
    refb = reference_basins(reference)
    grid100 = metrics.reference_grid_points(reference)
    F_shape = reference["probabilities"].shape

    flow = flow_for(cgsystem, dtype=DTYPES[args.flow_dtype], seed=args.seed)
    # state (everything the checkpoint holds)
    st = {"round": 0, "evaluations": 0, "training_evaluations": 0, "label_evaluations": 0, "wall_s": 0.0,
          "samples": 0, "wrong": 0, "nonfinite": 0, "rounds": [], "epochs": []}
    optimizer_state, step_count = None, 0
    if os.path.exists(ck_path):
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise SystemExit(f"{ck_path} is not a checkpoint of this benchmark")
        differ = [k for k in RUN_KEYS if ck["settings"].get(k) != settings[k]]
        if differ:
            raise SystemExit(f"{out} holds a run with other settings: "
                             + ", ".join(f"{k} = {ck['settings'].get(k)} (now {settings[k]})" for k in differ)
                             + "; resume with the same settings or choose another --out")
        flow.load_state_dict(ck["flow_state"])
        optimizer_state, step_count = ck["optimizer_state"], ck["step_count"]
        st = ck["state"]
        print(f"resuming {out} after round {st['round']} of {args.rounds} "
              f"({st['evaluations']:,} energy evaluations, {st['wall_s']:.0f} s so far)", flush=True)
    elif args.resume:
        print(f"no checkpoint in {out}: starting a new run", flush=True)
    # the per-epoch log holds the finished rounds only (an interrupted round is redone)
    epochs_path = os.path.join(out, "epochs.jsonl")
    write_jsonl(epochs_path, st["epochs"])

    print(f"grid conditioning, {SYSTEM}: {args.grid} x {args.grid} = {m} grid points, {args.rounds} rounds x "
          f"{args.epochs_per_round} epochs ({ppb} points x {args.samples_per_point} samples per step, "
          f"{math.ceil(m / ppb)} steps per epoch), {args.label_samples} label samples per point, "
          f"flow {args.flow_dtype}, lr {args.lr:g} -> {args.lr_final:g}, torch threads {torch.get_num_threads()}, "
          f"{args.workers} energy workers, load average {os.getloadavg()[0]:.1f} -> {out}", flush=True)
    load_start = os.getloadavg()

    bridge = EnergyBridge(cgsystem.system, cgsystem.temperature, n_workers=args.workers)
    try:
        trainer = Trainer(flow, cgsystem, bridge, lr=args.lr, warmup_steps=args.warmup_steps,
                          drop_worst=args.drop_worst, forward_weight=args.forward_weight,
                          samples_per_point=args.samples_per_point, points_per_batch=ppb, seed=args.seed,
                          progress=False, path_gradient=args.path_gradient)
        if optimizer_state is not None:
            trainer.optimizer.load_state_dict(optimizer_state)
            trainer.step_count = step_count

        for r in range(st["round"], args.rounds):
            t0 = time.perf_counter()
            ev0 = bridge.n_evaluations
            trainer.generator = torch.Generator().manual_seed(seed_of(args.seed, r, 0))
            n_samp = n_wrong = n_nonf = 0
            bar = tqdm(range(args.epochs_per_round), desc=f"round {r + 1}/{args.rounds}", leave=False,
                       disable=args.no_progress)
            new_epochs = []
            with open(epochs_path, "a") as efh:
                for e in bar:
                    ge = r * args.epochs_per_round + e
                    trainer.lr = lr_at(ge, total_epochs, args.lr, args.lr_final)
                    (log,) = trainer.train_by_energy(points, 1)
                    nonf = log.n_bad - log.n_wrong_chirality
                    n_samp += log.n_samples
                    n_wrong += log.n_wrong_chirality
                    n_nonf += nonf
                    rec = {"round": r, "epoch": ge, "loss": log.loss, "mean_ess": log.ess,
                           "min_ess": float(np.min(log.ess_per_point)),
                           "median_ess": float(np.median(log.ess_per_point)),
                           "wrong_chirality_fraction": log.n_wrong_chirality / max(log.n_samples, 1),
                           "nonfinite_fraction": nonf / max(log.n_samples, 1), "n_samples": log.n_samples,
                           "skipped_steps": log.n_skipped_steps, "lr": trainer.lr,
                           "energy_evaluations": st["evaluations"] + bridge.n_evaluations - ev0,
                           "wall_s": round(st["wall_s"] + time.perf_counter() - t0, 3)}
                    new_epochs.append(rec)
                    efh.write(json.dumps(jsonable(rec)) + "\n")
                    efh.flush()
                    bar.set_postfix(loss=f"{log.loss:.2f}", ess=f"{log.ess:.3f}", evals=rec["energy_evaluations"])
            bar.close()
            check_finite(flow)
            train_evals = bridge.n_evaluations - ev0

            labels = free_energy(flow, cgsystem, bridge, points, args.label_samples,
                                 generator=torch.Generator().manual_seed(seed_of(args.seed, r, 1)))
            label_evals = labels.n_evaluations
            n_lab = labels.n_samples * m
            lab_wrong, lab_nonf = int(labels.n_wrong_chirality.sum()), int(labels.n_nonfinite.sum())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # dropped labels are counted in fit_info
                ens = fit_ensemble(labels.s, labels.A, labels.stderr, periodic=[True, True], n_models=args.n_models,
                                   seed=seed_of(args.seed, r, 2) % (2 ** 31))
            export_pmf(ens, os.path.join(out, "pmf.pt"), cgsystem.cgspace,
                       source="benchmarks/aldp_grid.py (grid conditioning)", round=r, grid=args.grid)
            wall_round = time.perf_counter() - t0

            # measurement (not counted in wall_s)
            with torch.no_grad():
                A100 = ens(torch.as_tensor(grid100, dtype=torch.float64)).numpy().reshape(F_shape)
            kld = metrics.kld_from_pmf(A100, reference)
            basins = compare_basins(refb, A100, ens, points, labels.A)

            st["round"] = r + 1
            st["evaluations"] += train_evals + label_evals
            st["training_evaluations"] += train_evals
            st["label_evaluations"] += label_evals
            st["wall_s"] += wall_round
            st["samples"] += n_samp + n_lab
            st["wrong"] += n_wrong + lab_wrong
            st["nonfinite"] += n_nonf + lab_nonf
            ess = labels.ess_fraction
            rec = {"round": r, "rounds": args.rounds, "epochs_done": (r + 1) * args.epochs_per_round,
                   "energy_evaluations": st["evaluations"], "training_evaluations": st["training_evaluations"],
                   "label_evaluations": st["label_evaluations"], "wall_s": round(st["wall_s"], 3),
                   "round_wall_s": round(wall_round, 3), "kld": kld,
                   "mean_ess": float(np.mean(ess)), "min_ess": float(np.min(ess)), "median_ess": float(np.median(ess)),
                   "fraction_points_ess_below_0.1": float(np.mean(ess < 0.1)),
                   "epoch_mean_ess": new_epochs[-1]["mean_ess"], "epoch_min_ess": new_epochs[-1]["min_ess"],
                   "wrong_chirality_fraction": st["wrong"] / st["samples"],
                   "nonfinite_fraction": st["nonfinite"] / st["samples"],
                   "round_wrong_chirality_fraction": (n_wrong + lab_wrong) / max(n_samp + n_lab, 1),
                   "labels_dropped": int(ens.fit_info["n_dropped"]), "fit_rmse_kT": float(ens.fit_info["rmse_kT"]),
                   "lr_end": new_epochs[-1]["lr"], "optimiser_steps": trainer.step_count,
                   "load_average": round(os.getloadavg()[0], 2), "basins": basins}
            st["rounds"].append(rec)
            st["epochs"].extend(new_epochs)

            write_jsonl(os.path.join(out, "rounds.jsonl"), st["rounds"])
            save_npz_atomic(os.path.join(out, "efficiency_curve.npz"),
                            energy_evaluations=np.array([x["energy_evaluations"] for x in st["rounds"]], np.float64),
                            wall_s=np.array([x["wall_s"] for x in st["rounds"]], np.float64),
                            kld=np.array([x["kld"] for x in st["rounds"]], np.float64))
            save_npz_atomic(os.path.join(out, "labels.npz"), s=labels.s, A=labels.A, stderr=labels.stderr,
                            ess_fraction=ess, n_samples=labels.n_samples,
                            n_wrong_chirality=labels.n_wrong_chirality, n_nonfinite=labels.n_nonfinite, round=r)
            save_model(os.path.join(out, "flow.pt"), flow, cgsystem, round=r, grid=args.grid)
            with atomic_write(ck_path) as fh:
                torch.save({"format": CHECKPOINT_FORMAT, "settings": settings, "state": st,
                            "flow_state": {k: v.detach().clone() for k, v in flow.state_dict().items()},
                            "optimizer_state": trainer.optimizer.state_dict(), "step_count": trainer.step_count}, fh)
            print(fmt_round(rec), flush=True)
    finally:
        bridge.close()

    if not st["rounds"]:
        raise SystemExit("no round finished")
    last = st["rounds"][-1]
    l_strict = 1.0 - (st["wrong"] + st["nonfinite"]) / st["samples"]
    l_finite = 1.0 - st["wrong"] / max(st["samples"] - st["nonfinite"], 1)
    summary = {
        "benchmark": "grid conditioning, alanine dipeptide (benchmarks/aldp_grid.py)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["aldp_grid.py"] + (list(argv) if argv is not None else sys.argv[1:])),
        "quick": bool(args.quick),
        "settings": {**settings, "points": m, "points_per_step": ppb, "steps_per_epoch": math.ceil(m / ppb),
                     "workers": args.workers, "torch_threads": torch.get_num_threads()},
        "machine": {"cpu_count": os.cpu_count(), "platform": _platform.platform(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "torch": torch.__version__},
        "energy_evaluations": st["evaluations"], "training_evaluations": st["training_evaluations"],
        "label_evaluations": st["label_evaluations"], "wall_s": st["wall_s"], "kld": last["kld"],
        "reference": {"minima": {n: [b["phi"], b["psi"]] for n, b in refb["basins"].items()},
                      "global_minimum": refb["global_min"], "aligned_at": refb["align"],
                      "self_consistency_kld": reference.get("self_consistency_kld")},
        "checks": {
            "ess": {"target": ESS_TARGET, "last_epoch_mean_ess": last["epoch_mean_ess"],
                    "last_epoch_samples_per_point": args.samples_per_point,
                    "label_mean_ess": last["mean_ess"], "label_samples_per_point": args.label_samples,
                    "label_min_ess": last["min_ess"],
                    "pass_last_epoch": bool(last["epoch_mean_ess"] >= ESS_TARGET),
                    "pass_labels": bool(last["mean_ess"] >= ESS_TARGET)},
            "chirality": {"target_L_fraction": L_TARGET, "raw_samples": st["samples"],
                          "wrong_chirality": st["wrong"], "nonfinite": st["nonfinite"],
                          "L_fraction": l_strict, "L_fraction_of_finite": l_finite,
                          "pass": bool(l_strict >= L_TARGET)},
            "basins": last["basins"],
        },
        "outputs": {k: os.path.join(out, k) for k in OUTPUTS if os.path.exists(os.path.join(out, k))},
        "efficiency": f"python benchmarks/efficiency.py --grid {os.path.join(out, 'efficiency_curve.npz')}",
    }
    write_json(os.path.join(out, "summary.json"), summary)
    c = summary["checks"]
    b = c["basins"]
    print(f"\ndone: {st['evaluations']:,} energy evaluations ({st['training_evaluations']:,} training + "
          f"{st['label_evaluations']:,} labels), {st['wall_s']:.0f} s, KLD {last['kld']:.4f}")
    print(f"  ESS/N >= {ESS_TARGET}: last epoch {c['ess']['last_epoch_mean_ess']:.3f} "
          f"({'pass' if c['ess']['pass_last_epoch'] else 'FAIL'}), labels {c['ess']['label_mean_ess']:.3f} "
          f"({'pass' if c['ess']['pass_labels'] else 'FAIL'})")
    print(f"  L fraction of {st['samples']:,} raw samples: {l_strict:.5f} ({st['wrong']} D, {st['nonfinite']} "
          f"non-finite) ({'pass' if c['chirality']['pass'] else 'FAIL'})")
    for n in BASINS:
        print(f"  {n:9s} at ({b[n]['minimum'][0]:+.2f}, {b[n]['minimum'][1]:+.2f}): ref {b[n]['ref_kT']:+.2f} kT, "
              f"ensemble {b[n]['ensemble_kT']:+.2f} (diff {b[n]['ensemble_minus_ref_kT']:+.2f}); label at "
              f"({b[n]['nearest_grid_point'][0]:+.2f}, {b[n]['nearest_grid_point'][1]:+.2f}) diff "
              f"{b[n]['label_minus_ref_kT']:+.2f}; basin diff {b[n]['basin_minus_ref_kT']:+.2f}")
    print(f"  basins within {TOLERANCE_KT} kT (aligned at {b['aligned_at']}): ensemble "
          f"{'pass' if b['pass_ensemble'] else 'FAIL'} (max {b['max_abs_ensemble_kT']:.2f}), labels "
          f"{'pass' if b['pass_labels'] else 'FAIL'} (max {b['max_abs_label_kT']:.2f})")
    print(f"  wrote {out}/summary.json; efficiency curve: {summary['efficiency']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
