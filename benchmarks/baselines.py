"""Enhanced-sampling baselines for alanine dipeptide on 2 cores: PMF accuracy per energy evaluation and per second.

One method per call, both cores used as a user would: two walker processes, one thread each (the platform a
user would take, ``--platform auto``: the faster of Reference and CPU for the System, measured for 2 s each
before the clock starts; LangevinMiddleIntegrator 1/ps, 2 fs, hydrogen mass 3 amu, 300 K; the System of a
registered system, ``--system``, default alanine-dipeptide = amber96 + OBC, NoCutoff, no constraints). The budget
(``--minutes``) is wall clock from the launch of the walkers (process start, System build and a 200-step
minimisation included) to their end; every MD step of every walker is one energy+force evaluation
(minimisation not counted). Walkers record (phi, psi) every ``--frame-every`` steps and, every
``--checkpoint-s`` of wall time, a snapshot of their step count and of the method's own free-energy
estimate. Nothing is scored while the walkers run (the scorer would steal a core): KLDs are computed
afterwards from the stored frames and snapshots, so scoring costs no wall time in the curve.

Methods and estimators (forward KLD on 100 x 100 (phi, psi) bins, openmm_cgflow.metrics):

* ``md``: plain MD, two independent walkers. ``samples``: smoothed histogram of all frames of both.
* ``metad``: ``openmm.app.Metadynamics``, well tempered, on (phi, psi) (periodic BiasVariables on
  [-pi, pi], BiasVariable's default grid, ceil(5 * 2 pi / sigma) points per axis: 126 for 0.25 rad; a
  finer grid costs MD speed, each deposition refits the tabulated bias), two walkers sharing one bias
  through its multiple-walker mode (biasDir + saveFrequency, one process each; bias exchanged every
  ``--save-every`` = 5000 steps). ``bias``: F = -(gamma/(gamma-1)) V from ``getFreeEnergy()`` of walker 0
  (its total bias: own + the other walker's as last synchronised), mapped to the metric's bins (see
  :func:`grid_probabilities`). ``reweight``: histogram of both walkers' frames weighted by exp(beta V(s,t) -
  c(t)) with Tiwary-Parrinello c(t) from the bias grid at the frame (as benchmarks/reference_metad.py).
  Defaults as a user would start: bias factor 6, sigma 0.25 rad, height 1 kJ/mol, pace 500 steps.
* ``opes``: OPES_METAD from the PyPI package openmm-opes (``openmm_opes.OPES``), two walkers sharing one
  bias (biasDir + saveFrequency + walkerId). ``bias``: its ``getFreeEnergy()`` (the reweighted kernel
  density estimate), mapped as for metad; ``reweight``: frames weighted by exp(beta V(s,t)) (V from
  ``getBiasEnergy``; OPES' bias is quasi-static, no c(t)). Defaults: barrier 40 kJ/mol (bias factor =
  barrier / kT = 16), pace 500 steps, fixed sigma 0.15 rad (the unbiased width, as the package defines it);
  ``--adaptive-sigma``: the package's adaptive bandwidth (variance every pace / 5 steps).
  A walker's start-up (imports, System, minimisation: ~3-8 s) is inside its wall time; the package's own
  per-deposition cost (its NumPy kernel density on the grid) is too, as a user would pay it.

Scoring: KLD against the packaged reference (``metrics.load_reference(system)``, a WT-metaD result) and, as a
cross-check (``--cross-reference``, default benchmarks/data/aldp_md.npz: the smoothed histogram of an 80-ns
plain-MD run; its own KLD to the packaged reference is ~0.014, so it cannot resolve levels below ~0.01), against
a reference that owes nothing to a metadynamics bias grid. ``--rescore DIR`` re-scores a finished run.

Tuning (``--tune``): each parameter set of :data:`TUNE_SETS` runs as a full 2-walker run of
``--tune-minutes``; every set is then scored at the same evaluation count, N = the smallest final count among
the sets, by the KLD to the packaged reference interpolated (log-log) at N, the best of the method's
estimators (a user would read the better one); sets are ranked by that KLD. The main run then uses the best
set (the command is printed). One short run per set: the ranking carries the noise of single runs (the
tune.json keeps both estimators and the cross-reference KLD at N for judging that).

Output (``--out DIR``): curve.json (energy_evaluations, wall_s, kld (primary estimator: md samples, metad /
opes bias), estimators.{name}.kld and .kld_cross_reference, method, parameters, rates, notes), walker{i}.npz
(frames and snapshots), walker{i}.log, bias/ (the shared bias files).

  python benchmarks/baselines.py --method metad --minutes 0.3 --out /tmp/bl_metad      # smoke
  python benchmarks/baselines.py --method metad --tune --tune-minutes 3 --out runs/tune_metad
  python benchmarks/baselines.py --method metad --minutes 40 --out runs/bl_metad
  python benchmarks/baselines.py --speed       # energy+force evaluations/s of the registered variants
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as _platform
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import aldp_common as C  # noqa: E402

from openmm_cgflow import metrics  # noqa: E402

METHODS = ("md", "metad", "opes")
PRIMARY = {"md": "samples", "metad": "bias", "opes": "bias"}
#: Method parameters and their defaults (metad/opes: as a user would start).
DEFAULTS = {
    "md": {},
    "metad": {"bias_factor": 6.0, "sigma": 0.25, "height": 1.0, "pace": 500, "grid": None, "save_every": 5000},
    "opes": {"barrier": 40.0, "sigma": 0.15, "pace": 500, "adaptive_sigma": False, "grid": None, "save_every": 5000},
}
#: Parameter sets scanned by --tune (each overrides DEFAULTS); the first is the default.
TUNE_SETS = {
    "metad": [{}, {"bias_factor": 10.0}, {"sigma": 0.35}, {"sigma": 0.2}, {"height": 2.0, "pace": 250}],
    "opes": [{}, {"barrier": 20.0}, {"pace": 250}, {"adaptive_sigma": True}],
}
DEFAULT_XREF = os.path.join(HERE, "data", "aldp_md.npz")


# ------------------------------------------------------------------------------------------ estimators
def grid_probabilities(F_kT: np.ndarray, n: int = metrics.TORUS_BINS) -> np.ndarray:
    """Bin probabilities [n, n] (``[i_phi, j_psi]``) from a free energy on a periodic bias grid.

    ``F_kT`` [G, G] in kT, ``[i_phi, j_psi]``, grid point k at -pi + k 2 pi / (G - 1) (endpoint = start, as
    OpenMM's Metadynamics and openmm-opes lay out their grids; their getFreeEnergy() arrays are
    ``[j_psi, i_phi]``: transpose first); +inf = no probability (a kernel estimate that has not reached
    there). exp(-F) is integrated over each bin with Simpson's rule on its edges and centre (exp(-F)
    bilinearly interpolated, periodic; for G = 2 n + 1 these are grid points: no interpolation), then the
    metric's floor for estimated histograms is added (``metrics.HISTOGRAM_FLOOR``, as for sample histograms),
    so an unvisited region costs a large but finite KLD.
    """
    from reference_metad import bias_at

    F = np.asarray(F_kT, dtype=np.float64)
    if F.ndim != 2 or F.shape[0] != F.shape[1] or F.shape[0] < 3:
        raise ValueError(f"grid_probabilities: need a square [G, G] grid, got {F.shape}")
    if np.any(np.isnan(F)) or np.any(F == -np.inf) or not np.any(np.isfinite(F)):
        raise ValueError("grid_probabilities: the free energy has NaN or -inf values, or no finite value")
    w = np.zeros_like(F)
    fin = np.isfinite(F)
    w[fin] = np.exp(-(F[fin] - F[fin].min()))
    pts = -np.pi + np.arange(2 * n + 1) * np.pi / n
    U, V = np.meshgrid(pts, pts, indexing="ij")
    ws = bias_at(w, U, V)
    s = np.array([1.0, 4.0, 1.0]) / 6.0
    p = np.zeros((n, n))
    for a in range(3):
        for b in range(3):
            p += s[a] * s[b] * ws[a:a + 2 * n:2, b:b + 2 * n:2]
    p = p / p.sum() + metrics.HISTOGRAM_FLOOR
    return p / p.sum()


def tiwary_ct(V_kT: np.ndarray, bias_factor: float) -> float:
    """Tiwary-Parrinello c(t) in kT from a periodic bias grid V [G, G] (kT, endpoint duplicated)."""
    g = bias_factor
    v = np.asarray(V_kT, dtype=np.float64)[:-1, :-1]
    a = g / (g - 1.0) * v
    b = v / (g - 1.0)
    return float(np.log(np.exp(a - a.max()).sum()) + a.max() - np.log(np.exp(b - b.max()).sum()) - b.max())


# ----------------------------------------------------------------------------------------------- walker
def walker_main(config_path: str, index: int) -> None:
    """One walker process: run until the budget, record frames + snapshots, write walker{index}.npz."""
    import openmm
    import openmm.app as app
    import openmm.unit as unit

    with open(config_path) as fh:
        cfg = json.load(fh)
    t0, budget, method, par = cfg["t0"], cfg["budget_s"], cfg["method"], cfg["parameters"]
    out = os.path.dirname(os.path.abspath(config_path))
    system, top, pos, cg = C.build_registered(cfg["system"], cfg["hydrogen_mass"])
    kT = C.KT
    T = C.TEMPERATURE * unit.kelvin

    def cvs(width):
        res = []
        for quad in cg[:2]:
            f = openmm.CustomTorsionForce("theta")
            f.addTorsion(*quad, [])
            res.append(app.BiasVariable(f, -np.pi, np.pi, width, periodic=True, gridWidth=par["grid"]))
        return res

    sampler, group = None, None
    bias_dir = os.path.join(out, "bias")
    if method == "metad":
        n0 = system.getNumForces()
        sampler = app.Metadynamics(system, cvs(par["sigma"]), T, par["bias_factor"],
                                   par["height"] * unit.kilojoule_per_mole, par["pace"],
                                   saveFrequency=par["save_every"], biasDir=bias_dir)
        group = system.getForce(n0).getForceGroup()
    elif method == "opes":
        from openmm_opes import OPES

        sampler = OPES(system, cvs(par["sigma"]), T, par["barrier"] * unit.kilojoule_per_mole, par["pace"],
                       varianceFrequency=max(1, par["pace"] // 5) if par["adaptive_sigma"] else None,
                       saveFrequency=par["save_every"], biasDir=bias_dir, walkerId=index)
    integ = openmm.LangevinMiddleIntegrator(T, cfg["friction"] / unit.picosecond, cfg["dt_fs"] * unit.femtosecond)
    seed = cfg["seed"] + 1000 * index
    integ.setRandomNumberSeed(seed)
    plat, props = C.make_platform(cfg["platform"])
    sim = app.Simulation(top, system, integ, plat, props)
    sim.context.setPositions(pos)
    sim.minimizeEnergy(maxIterations=cfg["minimize_iterations"])
    sim.context.setVelocitiesToTemperature(T, seed)
    t_ready = time.time() - t0

    frames = {k: [] for k in ("wall_s", "steps", "phi", "psi", "bias_kT", "c_kT")}
    snaps = {"wall_s": [], "steps": [], "bias": []}
    fe, every = cfg["frame_every"], cfg["checkpoint_s"]
    next_snap = every
    quads = cg[:2]

    def free_energy_kT():
        """The sampler's free energy [G, G] in kT, [i_phi, j_psi] (None while undefined)."""
        F = sampler.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole).T / kT
        return None if np.any(np.isnan(F)) or not np.any(np.isfinite(F)) else F

    while True:
        if sampler is None:
            sim.step(fe)
        else:
            sampler.step(sim, fe)
        wall = time.time() - t0
        x = sim.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        d = C.dihedrals(x[None], quads)[0]
        bias, ct = 0.0, 0.0
        if method == "metad":
            e = sim.context.getState(getEnergy=True, groups={group}).getPotentialEnergy()
            bias = e.value_in_unit(unit.kilojoule_per_mole) / kT
            ct = tiwary_ct(-(par["bias_factor"] - 1.0) / par["bias_factor"] * free_energy_kT(), par["bias_factor"])
        elif method == "opes":
            bias = sampler.getBiasEnergy(sim.context).value_in_unit(unit.kilojoule_per_mole) / kT
        for k, v in zip(frames, (wall, sim.currentStep, d[0], d[1], bias, ct)):
            frames[k].append(v)
        done = wall >= budget or (cfg["max_steps"] is not None and sim.currentStep >= cfg["max_steps"])
        if wall >= next_snap or done:
            snaps["wall_s"].append(wall)
            snaps["steps"].append(sim.currentStep)
            if sampler is not None:
                F = free_energy_kT()
                snaps["bias"].append(grid_probabilities(F).astype(np.float32) if F is not None
                                     else np.full((metrics.TORUS_BINS,) * 2, np.nan, np.float32))
            while next_snap <= wall:
                next_snap += every
        if done:
            break
    meta = {"index": index, "seed": seed, "steps": int(sim.currentStep), "ready_s": t_ready, "end_s": time.time() - t0,
            "platform": cfg["platform"]}
    if method == "opes":
        meta["kernels"] = int(sampler.getNumKernels())
    arrays = {f"frame_{k}": np.asarray(v, dtype=np.float64) for k, v in frames.items()}
    arrays.update({f"snap_{k}": np.asarray(v, dtype=np.float64) for k, v in snaps.items() if k != "bias"})
    if snaps["bias"]:
        arrays["snap_bias"] = np.stack(snaps["bias"])
    C.save_npz_atomic(os.path.join(out, f"walker{index}.npz"), metadata_json=np.array(json.dumps(meta)), **arrays)


# ---------------------------------------------------------------------------------------------- scoring
def load_cross_reference(path: str | None):
    """The cross-check reference: smoothed (phi, psi) histogram of a plain-MD npz (md_baseline.py), or None."""
    if not path or path == "none":
        return None
    if not os.path.isfile(path):
        raise SystemExit(f"cross-reference {path} not found (pass --cross-reference none to skip)")
    with np.load(path) as z:
        s = np.stack([np.asarray(z["phi"], np.float64), np.asarray(z["psi"], np.float64)], 1)
        meta = json.loads(str(z["metadata_json"])) if "metadata_json" in z.files else {}
    p = metrics.torus_histogram(s, smooth=True)
    e = metrics.torus_bin_edges()
    return metrics.grid_reference(p, [e, e], [True, True], name=f"{os.path.basename(path)} (plain MD, "
                                  f"{len(s)} frames, {meta.get('ns', float('nan')):.1f} ns, smoothed histogram)")


def score_run(out: str, reference: dict, xref: dict | None) -> dict:
    """Curve of a finished run directory: one point per common snapshot of all walkers (see module docstring)."""
    with open(os.path.join(out, "config.json")) as fh:
        cfg = json.load(fh)
    method = cfg["method"]
    ws = []
    for i in range(cfg["walkers"]):
        with np.load(os.path.join(out, f"walker{i}.npz")) as z:
            ws.append({k: np.array(z[k]) for k in z.files})
    n_snap = min(len(w["snap_steps"]) for w in ws)
    names = ["samples"] if method == "md" else ["bias", "reweight"]
    est = {k: {"kld": [], "kld_cross_reference": []} for k in names}
    evals, wall = [], []

    def add(name, q_or_samples, weights=None, probabilities=False):
        for ref, key in ((reference, "kld"), (xref, "kld_cross_reference")):
            if ref is None:
                continue
            if probabilities:
                k = metrics.forward_kld(ref["probabilities"], q_or_samples) if np.all(np.isfinite(q_or_samples)) \
                    else float("nan")
            else:
                k = metrics.kld_from_samples(q_or_samples, ref, weights=weights)
            est[name][key].append(k)

    for k in range(n_snap):
        steps = [int(w["snap_steps"][k]) for w in ws]
        sel = [w["frame_steps"] <= s for w, s in zip(ws, steps)]
        evals.append(float(sum(steps)))
        wall.append(float(max(w["snap_wall_s"][k] for w in ws)))
        samples = np.concatenate([np.stack([w["frame_phi"][m], w["frame_psi"][m]], 1) for w, m in zip(ws, sel)])
        if method == "md":
            add("samples", samples)
            continue
        add("bias", ws[0]["snap_bias"][k].astype(np.float64), probabilities=True)
        lw = np.concatenate([w["frame_bias_kT"][m] - w["frame_c_kT"][m] for w, m in zip(ws, sel)])
        add("reweight", samples, weights=np.exp(lw - lw.max()))
    wmeta = []
    for w in ws:
        wmeta.append(json.loads(str(w["metadata_json"])))
    total_steps = sum(m["steps"] for m in wmeta)
    end = max(m["end_s"] for m in wmeta)
    curve = {
        "format": "openmm-cgflow baseline curve v1", "method": method, "primary_estimator": PRIMARY[method],
        "system": cfg["system"], "parameters": cfg["parameters"], "walkers": cfg["walkers"],
        "settings": {k: cfg.get(k) for k in ("platform", "platform_speeds_1_thread", "dt_fs", "friction", "hydrogen_mass", "frame_every",
                                         "checkpoint_s", "minimize_iterations", "seed", "budget_s", "max_steps")},
        "command": cfg["command"], "machine": cfg["machine"], "openmm_version": cfg["openmm_version"],
        "started": cfg["started"],
        "energy_evaluations": evals, "wall_s": wall,
        "kld": est[PRIMARY[method]]["kld"],
        "estimators": {k: {kk: vv for kk, vv in v.items() if vv} for k, v in est.items()},
        "reference": reference.get("name", "packaged"),
        "cross_reference": xref.get("name") if xref else None,
        "energy_evaluations_total": total_steps, "wall_s_total": end,
        "evaluations_per_s": total_steps / end if end > 0 else None,
        "walker_metadata": wmeta,
        "notes": ["energy_evaluations = MD steps of all walkers (one energy+force evaluation each; the "
                  f"<= {cfg['minimize_iterations']}-iteration minimisation per walker not counted)",
                  "wall_s from the launch of the walker processes (start-up included); KLD scored afterwards"],
    }
    return curve


def _clean(o):
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_curve(out: str, curve: dict) -> str:
    path = os.path.join(out, "curve.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_clean(curve), fh, indent=1)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------- runner
def run_method(args, method: str, params: dict, minutes: float, out: str, reference, xref) -> dict:
    """Launch the walkers of one method for ``minutes`` of wall time, wait, score; returns the curve."""
    import openmm

    if os.path.exists(os.path.join(out, "config.json")) and not args.overwrite:
        raise SystemExit(f"{out} already holds a run (config.json); pass --overwrite or another --out")
    shutil.rmtree(os.path.join(out, "bias"), ignore_errors=True)
    for i in range(16):
        for f in (f"walker{i}.npz", f"walker{i}.log"):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    os.makedirs(os.path.join(out, "bias"), exist_ok=True)
    if method == "opes":
        try:
            import openmm_opes  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"method opes needs the PyPI package openmm-opes ({exc}); "
                             "install it with: pip install openmm-opes")
    par = dict(DEFAULTS[method])
    par.update(params)
    platform, speeds = args.platform, {}
    if platform == "auto":  # as a user would: the faster platform for this System (measured before the clock starts)
        hm = args.hydrogen_mass if args.hydrogen_mass > 0 else None
        speeds = {p: md_rate(args.system, p, hm, args.dt, 2.0) for p in ("Reference", "CPU")}
        platform = max(speeds, key=speeds.get)
        print(f"platform auto: {', '.join(f'{k} {v:.0f}/s' for k, v in speeds.items())} -> {platform}", flush=True)
    cfg = {"method": method, "parameters": par, "system": args.system, "walkers": args.walkers,
           "platform": platform, "platform_speeds_1_thread": speeds, "dt_fs": args.dt, "friction": args.friction,
           "hydrogen_mass": args.hydrogen_mass if args.hydrogen_mass > 0 else None,
           "frame_every": args.frame_every, "checkpoint_s": args.checkpoint_s,
           "minimize_iterations": 200, "seed": args.seed, "budget_s": minutes * 60.0, "max_steps": args.max_steps,
           "command": " ".join(["baselines.py"] + sys.argv[1:]),
           "machine": f"{_platform.node()} {os.cpu_count()} cores", "openmm_version": openmm.__version__,
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if method != "md" and par["save_every"] % par["pace"]:
        raise SystemExit(f"save_every ({par['save_every']}) must be a multiple of pace ({par['pace']})")
    cfg_path = os.path.join(out, "config.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENMM_CPU_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    cfg["t0"] = time.time()
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=1)
    procs = []
    for i in range(args.walkers):
        log = open(os.path.join(out, f"walker{i}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_walker", str(i),
                                        "--_config", cfg_path], stdout=log, stderr=subprocess.STDOUT, env=env), log))
    print(f"{method}: {args.walkers} walkers for {minutes:g} min -> {out} (parameters {par})", flush=True)
    errors = []
    for i, (p, log) in enumerate(procs):
        rc = p.wait()
        log.close()
        if rc != 0:
            with open(os.path.join(out, f"walker{i}.log")) as fh:
                tail = fh.read()[-3000:]
            errors.append(f"walker {i} exited with {rc}:\n{tail}")
    if errors:
        msg = f"{method} failed:\n" + "\n".join(errors)
        write_curve(out, {"format": "openmm-cgflow baseline curve v1", "method": method, "parameters": par,
                          "error": msg})
        raise SystemExit(msg)
    curve = score_run(out, reference, xref)
    path = write_curve(out, curve)
    summary(curve)
    print(f"wrote {path}", flush=True)
    return curve


def summary(curve: dict) -> None:
    n, w = curve["energy_evaluations"], curve["wall_s"]
    if not n:
        print("no snapshot recorded (budget shorter than one checkpoint?)")
        return
    print(f"{curve['method']}: {curve['energy_evaluations_total']:.3g} evaluations in {curve['wall_s_total']:.0f} s "
          f"({curve['evaluations_per_s']:.0f}/s, all walkers)")
    for name, e in curve["estimators"].items():
        x = e.get("kld_cross_reference")
        print(f"  {name:9s} KLD at {n[-1]:.3g} evals ({w[-1]:.0f} s): {e['kld'][-1]:.4f}"
              + (f" (cross-reference {x[-1]:.4f})" if x else ""))


def value_at(n, kld, target: float) -> float:
    """KLD at ``target`` evaluations, log-log interpolated along a curve (nan if outside or undefined)."""
    n, k = np.asarray(n, float), np.asarray([np.nan if v is None else v for v in kld], float)
    ok = np.isfinite(k) & (k > 0) & (n > 0)
    n, k = n[ok], k[ok]
    if len(n) == 0 or target < n[0] or target > n[-1]:
        return float("nan")
    return float(np.exp(np.interp(np.log(target), np.log(n), np.log(k))))


def tune(args, reference, xref) -> None:
    sets = TUNE_SETS.get(args.method)
    if not sets:
        raise SystemExit(f"--tune: no parameter scan for method {args.method!r} (only {sorted(TUNE_SETS)})")
    curves = []
    for i, s in enumerate(sets):
        curves.append(run_method(args, args.method, s, args.tune_minutes, os.path.join(args.out, f"set{i}"),
                                 reference, xref))
    n_fix = min(c["energy_evaluations"][-1] for c in curves)
    rows = []
    for i, (s, c) in enumerate(zip(sets, curves)):
        per = {k: {"kld": value_at(c["energy_evaluations"], e["kld"], n_fix),
                   "kld_cross_reference": value_at(c["energy_evaluations"], e.get("kld_cross_reference") or [], n_fix)}
               for k, e in c["estimators"].items()}
        score = min((v["kld"] for v in per.values() if math.isfinite(v["kld"])), default=float("inf"))
        rows.append({"set": i, "overrides": s, "parameters": c["parameters"], "score_kld": score, "estimators": per,
                     "final_evaluations": c["energy_evaluations"][-1]})
    rows.sort(key=lambda r: r["score_kld"])
    best = rows[0]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in best["overrides"].items()
                     if not isinstance(v, bool)) + (" --adaptive-sigma" if best["overrides"].get("adaptive_sigma") else "")
    result = {"method": args.method, "tune_minutes": args.tune_minutes, "score_evaluations": n_fix,
              "scored_by": "KLD to the packaged reference at score_evaluations (log-log interpolated), best estimator",
              "ranking": rows, "best": best, "main_run_flags": flags.strip()}
    with open(os.path.join(args.out, "tune.json"), "w") as fh:
        json.dump(_clean(result), fh, indent=1)
    print(f"\ntune {args.method}: scored at {n_fix:.3g} evaluations (smallest final count of the sets)")
    for r in rows:
        ests = ", ".join(f"{k} {v['kld']:.4f} (xref {v['kld_cross_reference']:.4f})" for k, v in r["estimators"].items())
        print(f"  set {r['set']} {r['overrides'] or '(defaults)'}: score {r['score_kld']:.4f}; {ests}")
    print(f"best: set {best['set']} {best['parameters']}\nmain run: python benchmarks/baselines.py --method "
          f"{args.method} {flags.strip()} --minutes N --out DIR\nwrote {os.path.join(args.out, 'tune.json')}")


def md_rate(system_name: str, platform: str, hydrogen_mass, dt_fs: float, seconds: float) -> float:
    """Plain-MD steps (= energy+force evaluations) per second of a registered system on a platform, 1 thread."""
    import openmm
    import openmm.unit as unit

    system, top, pos, _ = C.build_registered(system_name, hydrogen_mass)
    integ = openmm.LangevinMiddleIntegrator(C.TEMPERATURE * unit.kelvin, 1 / unit.picosecond, dt_fs * unit.femtosecond)
    plat, props = C.make_platform(platform)
    ctx = openmm.Context(system, integ, plat, props)
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, maxIterations=100)
    integ.step(20)
    steps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        integ.step(20)
        steps += 20
    return steps / (time.perf_counter() - t)


def speed(args) -> None:
    """Energy+force evaluations per second of registered variants on Reference and CPU (1 thread each)."""
    hm = args.hydrogen_mass if args.hydrogen_mass > 0 else None
    res = {}
    for name in args.speed_systems:
        res[name] = {}
        for plat in ("Reference", "CPU"):
            res[name][plat] = md_rate(name, plat, hm, args.dt, args.speed_seconds)
            print(f"{name}: {res[name][plat]:.0f} MD steps (energy+force evaluations)/s, {plat}, 1 thread", flush=True)
    base = args.speed_systems[0]
    best = {k: max(v.values()) for k, v in res.items()}
    out = {"threads": 1, "evaluations_per_s": res, "best_evaluations_per_s": best,
           "best_platform": {k: max(v, key=v.get) for k, v in res.items()},
           "cost_ratio_vs_first": {k: best[base] / v for k, v in best.items()},
           "cost_ratio_vs_first_note": "fastest platform of each system against the fastest of the first",
           "cost_ratio_same_platform": {p: {k: res[base][p] / res[k][p] for k in res} for p in ("Reference", "CPU")},
           "first": base, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "machine": f"{_platform.node()} {os.cpu_count()} cores"}
    for k, r in out["cost_ratio_vs_first"].items():
        print(f"  {k}: {r:.1f}x the cost of an evaluation of {base} (each on its fastest platform: "
              f"{out['best_platform'][k]} vs {out['best_platform'][base]})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "speed.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {os.path.join(args.out, 'speed.json')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget (walker launch to end)")
    ap.add_argument("--out", default=None, help="run directory (curve.json, walker files)")
    ap.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    ap.add_argument("--system", default="alanine-dipeptide", help="registered system (e.g. alanine-dipeptide-customgb)")
    ap.add_argument("--walkers", type=int, default=2, help="walker processes, one thread each (default: 2 = cores)")
    ap.add_argument("--platform", default="auto",
                    help="auto (measure Reference and CPU for 2 s each before the clock starts, take the faster: "
                         "Reference for amber96+OBC, CPU for the CustomGBForce variant), Reference or CPU")
    ap.add_argument("--dt", type=float, default=2.0, help="fs")
    ap.add_argument("--friction", type=float, default=1.0, help="1/ps")
    ap.add_argument("--hydrogen-mass", type=float, default=3.0, help="amu; 0 disables repartitioning")
    ap.add_argument("--frame-every", type=int, default=1000, help="steps between recorded frames")
    ap.add_argument("--max-steps", type=int, default=None, help="also stop each walker at this many steps")
    ap.add_argument("--checkpoint-s", type=float, default=20.0, help="wall seconds between curve points")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--reference", default=None, help="reference npz (default: the system's registered one)")
    ap.add_argument("--cross-reference", default=DEFAULT_XREF, help="plain-MD npz for the cross-check, or 'none'")
    g = ap.add_argument_group("method parameters (default: DEFAULTS, or the set --tune found best)")
    g.add_argument("--bias-factor", type=float)
    g.add_argument("--sigma", type=float, help="rad (metad: Gaussian width; opes: unbiased width)")
    g.add_argument("--height", type=float, help="metad: initial Gaussian height, kJ/mol")
    g.add_argument("--pace", type=int, help="steps between depositions")
    g.add_argument("--barrier", type=float, help="opes: kJ/mol")
    g.add_argument("--adaptive-sigma", action="store_true", help="opes: adaptive bandwidth (varianceFrequency = pace/5)")
    g.add_argument("--grid", type=int, help="bias grid points per axis (default: BiasVariable's, 5 * 2 pi / sigma)")
    g.add_argument("--save-every", type=int, help="steps between bias exchanges of the walkers")
    ap.add_argument("--tune", action="store_true", help="scan TUNE_SETS[method] (see docstring)")
    ap.add_argument("--tune-minutes", type=float, default=3.0)
    ap.add_argument("--rescore", default=None, help="re-score a finished run directory (curve.json rewritten)")
    ap.add_argument("--speed", action="store_true", help="measure evaluations/s of --speed-systems")
    ap.add_argument("--speed-systems", nargs="+", default=["alanine-dipeptide", "alanine-dipeptide-customgb"])
    ap.add_argument("--speed-seconds", type=float, default=10.0, help="per system and platform")
    ap.add_argument("--_walker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._walker is not None:
        walker_main(args._config, args._walker)
        return 0
    if args.speed:
        speed(args)
        return 0
    if args.rescore is None and (args.method is None or args.out is None):
        ap.error("--method and --out are required (or --rescore DIR, or --speed)")
    if args.walkers < 1:
        ap.error("--walkers must be >= 1")
    if args.frame_every <= 0 or args.checkpoint_s <= 0:
        ap.error("--frame-every and --checkpoint-s must be positive")
    if args.adaptive_sigma and args.method not in (None, "opes"):
        ap.error("--adaptive-sigma is an opes parameter")
    if args.rescore:  # the run's own system, unless --reference is given
        with open(os.path.join(args.rescore, "config.json")) as fh:
            args.system = json.load(fh)["system"]
    reference = metrics.load_reference(args.system, path=args.reference)
    xref = load_cross_reference(args.cross_reference)
    if args.rescore:
        curve = score_run(args.rescore, reference, xref)
        summary(curve)
        print(f"wrote {write_curve(args.rescore, curve)}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.tune:
        tune(args, reference, xref)
        return 0
    params = {k: getattr(args, k) for k in ("bias_factor", "sigma", "height", "pace", "barrier", "grid", "save_every")
              if getattr(args, k) is not None and k in DEFAULTS[args.method]}
    if args.adaptive_sigma:
        params["adaptive_sigma"] = True
    unknown = [k for k in ("bias_factor", "sigma", "height", "pace", "barrier", "grid", "save_every")
               if getattr(args, k) is not None and k not in DEFAULTS[args.method]]
    if unknown:
        ap.error(f"method {args.method} takes no {', '.join('--' + k.replace('_', '-') for k in unknown)}")
    run_method(args, args.method, params, args.minutes, args.out, reference, xref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
