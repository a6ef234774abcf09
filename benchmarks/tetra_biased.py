"""All-atom alanine tetrapeptide biased by minus a learned six-dimensional PMF, reweighted, against plain MD.

What: ``--walkers`` independent all-atom MD walkers of the registered ``alanine-tetrapeptide`` each run ``--ns``
with the bias ``add_pmf_bias(system, pmf.pt, factor=-1)``: the potential becomes U(x) - kT A(s(x)), with
s = (phi_2, psi_2, phi_3, psi_3, phi_4, psi_4) the six backbone dihedrals of ALA2..ALA4, flat along s where the
PMF A (kT) is right. The frames are reweighted to the unbiased ensemble and compared, residue by residue, with the
plain-MD reference written by benchmarks/tetra_md.py (``--reference``: its walkerK/chunk_*.npz, frames 1 ps apart).

System and dynamics (as benchmarks/tetra_md.py): amber99sbildn + amber99_obc implicit solvent (the registered
system, ``aldp_common.build_registered``), hydrogen mass 3 amu, LangevinMiddleIntegrator 300 K, friction 1/ps,
2 fs, OpenMM Reference platform; one process per walker (spawn), one thread each, integrator and velocity seeds
7 + k. Each walker minimises (200 iterations), draws velocities at 300 K and records the six dihedrals every
``--frame-steps`` steps (default 50 = 0.1 ps). The biased frames are saved (float32, compressed) next to ``--json``
as ``<json stem>_frames.npz``; ``--from-frames`` analyses such a file again without running MD.

Estimators, per residue r (phi_r, psi_r; columns (0, 1), (2, 3), (4, 5)):

* populations, by frame, with the definitions of ``openmm_cgflow.metrics.basin_populations``: phi_pos = phi >= 0;
  alpha_R = phi < 0 and -2.0 < psi < 1.0; beta/PPII (``beta_C7eq``) = the rest of phi < 0.
* biased: weights w = exp(-A(s)) of the full six-dimensional s (``reweight(s, pmf, factor=-1)``; with ``--cap-kT``
  c the bias is -kT min(A, c) and the weights exp(-min(A, c))); Kish's ESS of
  the weights; standard error by blocks: each walker split into 5 contiguous blocks, each block's population with
  its own weights, std over all blocks / sqrt(number of blocks).
* reference: all plain-MD frames pooled; standard error from a bootstrap over walkers (walkers resampled with
  replacement, their frames pooled, i.e. weighted by frame count; 500 resamples, seed 0).
* agreement: z = |biased - reference| / sqrt(se_biased^2 + se_reference^2); "agrees" when z <= 2.
* phi > 0 visits per ns: entries into phi >= 0 (phi < 0 in one frame, phi >= 0 in the next) on frames 1 ps apart
  (the biased frames subsampled to 1 ps, as the reference is stored) per simulated ns; and the unweighted fraction of
  frames at phi >= 0, for both runs.
* forward KLD D(reference || biased) (nats) of the smoothed 100 x 100 (phi_r, psi_r) histograms
  (``metrics.histogram_probabilities(..., 100, [(-pi, pi)] * 2, True)``; the biased one with the weights).

Units: angles in radians, A in kT (300 K), time in ns / ps, speed in ns/day and MD steps/s (per walker, biased run
only, after minimisation; by wall clock and by the process's CPU time, the latter the speed on an unloaded core).

    OMP_NUM_THREADS=1 python benchmarks/tetra_biased.py --pmf runs/tetra_run/pmf.pt --reference runs/tetra_md \\
        --ns 5 --json runs/tetra_biased/result.json                                   # full run, two walkers
    OMP_NUM_THREADS=1 python benchmarks/tetra_biased.py --quick --pmf runs/tetra_run/pmf.pt \\
        --reference runs/tetra_md --json /tmp/tetra_biased.json                       # 0.02 ns smoke run
    python benchmarks/tetra_biased.py --pmf runs/tetra_run/pmf.pt --reference runs/tetra_md \\
        --from-frames runs/tetra_biased/result_frames.npz                             # re-analyse saved frames
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform as _platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

NAME = "alanine-tetrapeptide"
TEMPERATURE = 300.0  # K
DT_PS = 0.002
RESIDUES = ("ALA2", "ALA3", "ALA4")
KEYS = ("alpha_R", "beta_C7eq", "phi_pos")
LABELS = {"alpha_R": "alpha_R", "beta_C7eq": "beta/PPII", "phi_pos": "phi > 0"}
N_BLOCKS_PER_WALKER = 5
N_BOOTSTRAP = 500
BOOTSTRAP_SEED = 0
VISIT_PS = 1.0  # frame spacing (ps) on which phi > 0 entries are counted
Z_AGREE = 2.0


def _biased_walker(index: int, pmf_path: str, n_steps: int, frame_steps: int, seed: int, cap_kT=None) -> dict:
    """One biased walker: its frames s [F, 6] (rad, in [-pi, pi)) every frame_steps steps and its MD timing."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import openmm
    import openmm.unit as unit
    import torch
    from openmm_cgflow_plugin import add_pmf_bias, load_pmf
    from openmm_cgflow_plugin.cgspace import wrap_angle

    import aldp_common as C
    from tetra_md import _dihedrals

    torch.set_num_threads(1)
    t_build = time.perf_counter()
    system, _, positions, cg_atoms = C.build_registered(NAME, hydrogen_mass=3.0)
    quads = np.asarray(cg_atoms)
    pmf = load_pmf(pmf_path, expected_cg=[list(q) for q in cg_atoms], temperature=TEMPERATURE)
    add_pmf_bias(system, pmf, factor=-1, temperature=TEMPERATURE, cg_atoms=cg_atoms, cap_kT=cap_kT)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
                                                 DT_PS * unit.picoseconds)
    integrator.setRandomNumberSeed(seed)
    plat, props = C.make_platform("Reference")
    ctx = openmm.Context(system, integrator, plat, props)
    ctx.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, maxIterations=200)
    ctx.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, seed)
    setup_s = time.perf_counter() - t_build
    n_frames = n_steps // frame_steps
    s = np.empty((n_frames, len(quads)), dtype=np.float64)
    report = max(1, n_frames // 10)
    t0, c0 = time.perf_counter(), time.process_time()
    for f in range(n_frames):
        integrator.step(frame_steps)
        x = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        s[f] = wrap_angle(_dihedrals(np.asarray(x), quads))
        if (f + 1) % report == 0:
            el = time.perf_counter() - t0
            print(f"  walker {index}: {(f + 1) * frame_steps * DT_PS / 1000:.3f} ns, "
                  f"{(f + 1) * frame_steps / el:,.0f} steps/s", flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = n_frames * frame_steps
    return dict(index=index, seed=seed, s=s, steps=steps, md_wall_s=wall, md_cpu_s=cpu, setup_s=setup_s,
                steps_per_s=steps / wall, ns_per_day=steps * DT_PS / 1000 / wall * 86400,
                steps_per_cpu_s=steps / cpu, ns_per_cpu_day=steps * DT_PS / 1000 / cpu * 86400)


# ------------------------------------------------------------------------------------------------ estimators

def basin_masks(phi: np.ndarray, psi: np.ndarray) -> dict:
    """Per-frame basin membership [F] (bool) with metrics.basin_populations' definitions (radians)."""
    neg = phi < 0
    alpha = neg & (psi > -2.0) & (psi < 1.0)
    return {"alpha_R": alpha, "beta_C7eq": neg & ~alpha, "phi_pos": ~neg}


def populations(phi: np.ndarray, psi: np.ndarray, log_w: np.ndarray | None = None) -> dict:
    """Basin populations of frames (phi, psi) [F], weighted by exp(log_w) (normalised here) or unweighted."""
    if log_w is None:
        w = np.full(len(phi), 1.0 / len(phi))
    else:
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
    return {k: float(w[m].sum()) for k, m in basin_masks(phi, psi).items()}


def kish_ess(log_w: np.ndarray) -> float:
    w = np.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / np.sum(w * w))


def block_se(walkers_s: list, walkers_logw: list, cols, n_blocks: int = N_BLOCKS_PER_WALKER) -> dict:
    """Block standard error of the reweighted populations: each walker in n_blocks contiguous blocks, each block
    reweighted with its own weights; std over all blocks (ddof 1) / sqrt(number of blocks)."""
    vals = {k: [] for k in KEYS}
    for s, lw in zip(walkers_s, walkers_logw):
        for sb, lb in zip(np.array_split(s, n_blocks), np.array_split(lw, n_blocks)):
            if len(sb) == 0:
                continue
            for k, v in populations(sb[:, cols[0]], sb[:, cols[1]], lb).items():
                vals[k].append(v)
    out = {}
    for k, v in vals.items():
        out[k] = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return out


def bootstrap_se(walkers_s: list, cols, n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Bootstrap-over-walkers standard error of the pooled (frame-count weighted) populations."""
    counts = np.array([[m.sum() for m in basin_masks(s[:, cols[0]], s[:, cols[1]]).values()] for s in walkers_s],
                      dtype=np.float64)  # [W, 3] in basin_masks' key order
    n = np.array([len(s) for s in walkers_s], dtype=np.float64)
    keys = list(basin_masks(np.zeros(1), np.zeros(1)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(walkers_s), size=(n_boot, len(walkers_s)))
    pops = counts[idx].sum(axis=1) / n[idx].sum(axis=1)[:, None]  # [n_boot, 3]
    return {k: float(pops[:, j].std(ddof=1)) for j, k in enumerate(keys)}


def phi_pos_entries(phi: np.ndarray) -> int:
    """Number of entries into phi >= 0: phi < 0 in one frame and phi >= 0 in the next."""
    return int(np.sum((phi[:-1] < 0) & (phi[1:] >= 0)))


# ------------------------------------------------------------------------------------------------ analysis

def analyse(biased: list, frame_ps: float, ref_walkers: list, ref_frame_ps: float, pmf_path: str,
            cap_kT=None) -> dict:
    """All per-residue numbers; biased: per walker s [F, 6] (rad), ref_walkers: per walker [F, 6] (rad)."""
    from openmm_cgflow import metrics
    from openmm_cgflow_plugin import load_pmf, reweight

    pmf = load_pmf(pmf_path, temperature=TEMPERATURE)
    logw = [reweight(s, pmf, factor=-1, cap_kT=cap_kT).log_weights for s in biased]
    s_all, lw_all = np.concatenate(biased), np.concatenate(logw)
    ref_all = np.concatenate(ref_walkers)
    w_all = np.exp(lw_all - lw_all.max())
    w_all /= w_all.sum()
    ess = kish_ess(lw_all)
    stride = max(1, int(round(VISIT_PS / frame_ps)))
    ref_stride = max(1, int(round(VISIT_PS / ref_frame_ps)))
    b_ns = sum(len(s) for s in biased) * frame_ps / 1000.0
    r_ns = len(ref_all) * ref_frame_ps / 1000.0
    b_visit_ns = sum(len(s[::stride]) for s in biased) * stride * frame_ps / 1000.0
    r_visit_ns = sum(len(s[::ref_stride]) for s in ref_walkers) * ref_stride * ref_frame_ps / 1000.0
    rng2 = [(-np.pi, np.pi)] * 2
    out = {}
    for r, name in enumerate(RESIDUES):
        cols = (2 * r, 2 * r + 1)
        pop_b = populations(s_all[:, cols[0]], s_all[:, cols[1]], lw_all)
        raw_b = populations(s_all[:, cols[0]], s_all[:, cols[1]])
        se_b = block_se(biased, logw, cols)
        pop_r = populations(ref_all[:, cols[0]], ref_all[:, cols[1]])
        se_r = bootstrap_se(ref_walkers, cols)
        z, agrees = {}, {}
        for k in KEYS:
            diff, den = abs(pop_b[k] - pop_r[k]), float(np.hypot(se_b[k], se_r[k]))
            z[k] = diff / den if den > 0 else (0.0 if diff == 0 else float("inf"))
            agrees[k] = bool(z[k] <= Z_AGREE)
        entries_b = sum(phi_pos_entries(s[::stride, cols[0]]) for s in biased)
        entries_r = sum(phi_pos_entries(s[::ref_stride, cols[0]]) for s in ref_walkers)
        p_ref = metrics.histogram_probabilities(ref_all[:, cols], 100, rng2, True)
        p_b = metrics.histogram_probabilities(s_all[:, cols], 100, rng2, True, weights=w_all)
        out[name] = dict(
            columns=list(cols), biased_reweighted=pop_b, biased_block_se=se_b, biased_raw=raw_b,
            reference=pop_r, reference_bootstrap_se=se_r, z=z, agrees=agrees,
            phi_pos_entries_biased=entries_b, phi_pos_entries_reference=entries_r,
            phi_pos_visits_per_ns_biased=entries_b / b_visit_ns,
            phi_pos_visits_per_ns_reference=entries_r / r_visit_ns,
            phi_pos_time_fraction_biased=raw_b["phi_pos"], phi_pos_time_fraction_reference=pop_r["phi_pos"],
            kld_reference_to_biased=float(metrics.forward_kld(p_ref, p_b)))
    return dict(residues=out, ess=ess, ess_fraction=ess / len(s_all), ess_per_walker=[kish_ess(lw) for lw in logw],
                biased_frames=len(s_all), biased_ns=b_ns, biased_frame_ps=frame_ps, visit_stride_biased=stride,
                reference_walkers=len(ref_walkers), reference_frames=len(ref_all), reference_ns=r_ns,
                reference_frame_ps=ref_frame_ps, visit_stride_reference=ref_stride)


def print_table(res: dict) -> None:
    print(f"biased: {res['biased_ns']:.3f} ns in {len(res['ess_per_walker'])} walkers, {res['biased_frames']:,} frames "
          f"({res['biased_frame_ps']:g} ps apart); reweighting ESS {res['ess']:,.1f} "
          f"({100 * res['ess_fraction']:.2f} % of the frames; per walker "
          f"{', '.join(f'{e:,.1f}' for e in res['ess_per_walker'])})")
    print(f"reference (plain MD): {res['reference_ns']:.1f} ns in {res['reference_walkers']} walkers, "
          f"{res['reference_frames']:,} frames ({res['reference_frame_ps']:g} ps apart)")
    print()
    print("| residue | basin | biased, reweighted | reference (MD) | z | agrees (z <= 2) | biased, raw |")
    print("|---|---|---|---|---|---|---|")
    for name, d in res["residues"].items():
        for k in KEYS:
            print(f"| {name} | {LABELS[k]} | {_p(d['biased_reweighted'][k])} +- {_p(d['biased_block_se'][k])} | "
                  f"{_p(d['reference'][k])} +- {_p(d['reference_bootstrap_se'][k])} | {d['z'][k]:.2f} | "
                  f"{'yes' if d['agrees'][k] else 'no'} | {_p(d['biased_raw'][k])} |")
    print()
    print("| residue | phi > 0 entries / ns, biased | phi > 0 entries / ns, MD | time at phi > 0, biased (raw) | "
          "time at phi > 0, MD | KLD(reference -> biased reweighted), 100 x 100 |")
    print("|---|---|---|---|---|---|")
    for name, d in res["residues"].items():
        print(f"| {name} | {d['phi_pos_visits_per_ns_biased']:.2f} ({d['phi_pos_entries_biased']}) | "
              f"{d['phi_pos_visits_per_ns_reference']:.2f} ({d['phi_pos_entries_reference']}) | "
              f"{_p(d['phi_pos_time_fraction_biased'])} | {_p(d['phi_pos_time_fraction_reference'])} | "
              f"{d['kld_reference_to_biased']:.4f} |")


def _p(x: float) -> str:
    """A population or its error for the table: 4 decimals, scientific below 1e-3."""
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 or not np.isfinite(x) else f"{x:.1e}"


def cap_from_quantile(pmf, q: float) -> float:
    """The q-quantile (kT) of A under the PMF's own Boltzmann distribution exp(-A), from importance samples."""
    from openmm_cgflow_plugin.marginals import importance_samples

    smp = importance_samples(pmf, n_samples=200_000, seed=0)
    a = smp.mean
    order = np.argsort(a)
    return float(a[order][np.searchsorted(np.cumsum(smp.weights[order]), q)])


def frames_path(json_path: str) -> str:
    return os.path.splitext(json_path)[0] + "_frames.npz"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pmf", required=True, help="six-dimensional pmf.pt of the alanine tetrapeptide")
    ap.add_argument("--reference", required=True,
                    help="benchmarks/tetra_md.py output dir (walker*/chunk_*.npz) or its --pack file")
    ap.add_argument("--ns", type=float, default=5.0, help="biased MD per walker (ns)")
    ap.add_argument("--walkers", type=int, default=2, help="biased walkers (one process each, seeds 7 + k)")
    ap.add_argument("--frame-steps", type=int, default=50, help="MD steps (2 fs) between recorded frames")
    ap.add_argument("--reference-frame-ps", type=float, default=1.0, help="frame spacing of the reference (ps)")
    ap.add_argument("--json", default=None, help="write the results here (and the frames to <stem>_frames.npz)")
    ap.add_argument("--from-frames", default=None, help="analyse a saved _frames.npz instead of running MD")
    ap.add_argument("--quick", action="store_true", help="0.02 ns per walker smoke run")
    ap.add_argument("--cap-kT", type=float, default=None,
                    help="cap of A in the bias and the weights (add_pmf_bias(cap_kT=...)): the bias is flat where the "
                         "PMF rates a region above it (default: no cap)")
    ap.add_argument("--cap-quantile", type=float, default=None,
                    help="set the cap to this quantile of A under the PMF's own exp(-A) (importance samples of the "
                         "learned PMF, no reference used), e.g. 0.999")
    args = ap.parse_args(argv)
    t_start = time.time()
    if args.quick:
        args.ns = min(args.ns, 0.02)

    from tetra_md import load_frames

    ref_walkers = load_frames(args.reference)
    if not ref_walkers:
        raise SystemExit(f"no reference frames under {args.reference}")

    import openmm
    import torch

    import aldp_common as C
    from openmm_cgflow_plugin import load_pmf

    _, _, _, cg_atoms = C.build_registered(NAME, hydrogen_mass=3.0)
    pmf = load_pmf(args.pmf, temperature=TEMPERATURE)
    if args.cap_quantile is not None:
        args.cap_kT = cap_from_quantile(pmf, args.cap_quantile)
        print(f"cap: A = {args.cap_kT:.2f} kT, the {args.cap_quantile:g} quantile of A under exp(-A)", flush=True)
    file_quads = [tuple(int(i) for i in q) for q in pmf.cg_atoms]
    if file_quads != [tuple(q) for q in cg_atoms]:
        raise SystemExit(f"{args.pmf}: its cg_atoms {file_quads} are not {NAME}'s {cg_atoms}")

    timing = None
    if args.from_frames:
        data = np.load(args.from_frames)
        biased = [data[f"walker{k}"].astype(np.float64) for k in range(int(data["n_walkers"]))]
        frame_ps = float(data["frame_ps"])
        print(f"frames from {args.from_frames}: {len(biased)} walkers", flush=True)
    else:
        n_steps = int(round(args.ns * 1000.0 / DT_PS))
        frame_ps = args.frame_steps * DT_PS
        print(f"biased MD: {args.walkers} walkers x {args.ns:g} ns ({n_steps:,} steps, frames every "
              f"{frame_ps:g} ps), PMF {args.pmf}", flush=True)
        os.environ["OMP_NUM_THREADS"] = "1"
        with ProcessPoolExecutor(max_workers=args.walkers, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(_biased_walker, k, os.path.abspath(args.pmf), n_steps, args.frame_steps, 7 + k,
                                 args.cap_kT)
                    for k in range(args.walkers)]
            runs = [f.result() for f in futs]
        biased = [r["s"] for r in runs]
        timing = dict(walkers=[{k: v for k, v in r.items() if k != "s"} for r in runs],
                      steps_per_s_mean=float(np.mean([r["steps_per_s"] for r in runs])),
                      ns_per_day_mean=float(np.mean([r["ns_per_day"] for r in runs])),
                      steps_per_cpu_s_mean=float(np.mean([r["steps_per_cpu_s"] for r in runs])),
                      ns_per_cpu_day_mean=float(np.mean([r["ns_per_cpu_day"] for r in runs])))
        if args.json:
            C.save_npz_atomic(frames_path(args.json), frame_ps=frame_ps, n_walkers=len(biased),
                              seeds=np.array([r["seed"] for r in runs]),
                              **{f"walker{k}": s.astype(np.float32) for k, s in enumerate(biased)})

    res = analyse(biased, frame_ps, ref_walkers, args.reference_frame_ps, args.pmf, args.cap_kT)
    print()
    if timing is not None:
        print(f"biased MD speed (per walker, one thread, Reference platform): "
              f"{timing['steps_per_s_mean']:,.0f} steps/s, {timing['ns_per_day_mean']:.2f} ns/day "
              f"({', '.join(format(w['steps_per_s'], ',.0f') for w in timing['walkers'])} steps/s); per CPU second "
              f"{timing['steps_per_cpu_s_mean']:,.0f} steps/s, {timing['ns_per_cpu_day_mean']:.2f} ns per CPU day "
              f"(the speed on an unloaded core)")
    print_table(res)
    uname = _platform.uname()
    meta = dict(command=" ".join(["benchmarks/tetra_biased.py"] + (argv if argv is not None else sys.argv[1:])),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                machine=dict(processor=_platform.processor(), system=uname.system, release=uname.release,
                             machine=uname.machine, node=uname.node, cpu_count=os.cpu_count()),
                openmm=openmm.__version__, torch=torch.__version__, pmf=os.path.abspath(args.pmf),
                reference=os.path.abspath(args.reference), ns_per_walker=args.ns, walkers=len(biased),
                frame_steps=args.frame_steps, temperature_K=TEMPERATURE, cap_kT=args.cap_kT, timing=timing,
                z_agree=Z_AGREE,
                blocks_per_walker=N_BLOCKS_PER_WALKER, bootstrap_resamples=N_BOOTSTRAP, **res,
                frames=(frames_path(args.json) if args.json and not args.from_frames else args.from_frames),
                wall_s=time.time() - t_start)
    print(f"\ntotal wall {meta['wall_s']:.0f} s", flush=True)
    if args.json:
        from openmm_cgflow_plugin.files import atomic_write

        with atomic_write(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)


if __name__ == "__main__":
    main()
