"""Reference free energy of alanine dipeptide on (phi, psi) by well-tempered metadynamics.

OpenMM's own ``openmm.app.Metadynamics`` biases (phi, psi) (CustomTorsionForce CVs, periodic on
[-pi, pi)). Two independent walkers (own bias, own seed) are run interleaved in one process and one
thread; each gives F(s) = -(gamma / (gamma - 1)) V(s) from its converged bias. The reference is the
average of the two (per-bin log probabilities averaged), its error estimate the divergence between the
two independent walkers (and between each walker's bias at half time and at the end).

Bin probabilities: exp(-F) integrated over each of the 100 x 100 bins with Simpson's rule on the bias
grid itself (201 x 201 grid points = every bin edge and centre), so no interpolation is involved.

Output (``--out``, default benchmarks/data/aldp_reference.npz; rewritten every checkpoint so a partial
result is usable, ``partial`` = True until the end):
  free_energy_kT [100, 100] (``[i_phi, j_psi]``, min 0), probabilities [100, 100], phi_edges, psi_edges,
  walker_probabilities [W, 100, 100], self_consistency_kld, metadata_json, and per saved frame:
  time_ps, walker, phi, psi, omega1, omega2, chi_cb, angle_ncac (radians), bias_kT (V(s, t) felt at the
  frame), c_kT (Tiwary-Parrinello c(t), so exp(bias_kT - c_kT) reweights), final_bias_kT (the walker's
  final bias at the frame's (phi, psi)).
A grid-only copy goes to openmm_cgflow/data/aldp_reference_pmf.npz (read by openmm_cgflow.metrics).

  python benchmarks/reference_metad.py --quick          # ~1 min smoke run -> *_quick.npz
  OMP_NUM_THREADS=1 nohup python benchmarks/reference_metad.py --minutes 47 > metad.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform as _platform
import resource
import sys
import time

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aldp_common as C  # noqa: E402

from openmm_cgflow import metrics  # noqa: E402
from openmm_cgflow.alanine_dipeptide import REFERENCE_FILE  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def measure_platform_speed(platform_name: str, hydrogen_mass, dt_fs: float, steps: int = 2000) -> float:
    """Plain-MD steps per second on a platform (1 thread), after minimisation and 200 warm-up steps."""
    system, top, pos = C.build_system(hydrogen_mass)
    integ = openmm.LangevinMiddleIntegrator(C.TEMPERATURE * unit.kelvin, 1 / unit.picosecond, dt_fs * unit.femtosecond)
    plat, props = C.make_platform(platform_name)
    ctx = openmm.Context(system, integ, plat, props)
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, maxIterations=200)
    integ.step(200)
    t = time.perf_counter()
    integ.step(steps)
    rate = steps / (time.perf_counter() - t)
    del ctx
    return rate


class Walker:
    """One well-tempered metadynamics run on (phi, psi) with its own bias, integrator and frame record."""

    def __init__(self, index: int, seed: int, args, platform_name: str):
        self.index = index
        self.args = args
        system, top, pos = C.build_system(args.hydrogen_mass)
        cvs = []
        for quad in (C.PHI, C.PSI):
            f = openmm.CustomTorsionForce("theta")
            f.addTorsion(*quad, [])
            cvs.append(app.BiasVariable(f, -np.pi, np.pi, args.sigma, periodic=True, gridWidth=args.grid))
        n_before = system.getNumForces()
        self.meta = app.Metadynamics(system, cvs, C.TEMPERATURE * unit.kelvin, args.bias_factor,
                                     args.height * unit.kilojoule_per_mole, args.pace)
        self.bias_group = system.getForce(n_before).getForceGroup()  # the CustomCVForce Metadynamics added
        integ = openmm.LangevinMiddleIntegrator(C.TEMPERATURE * unit.kelvin, args.friction / unit.picosecond,
                                                args.dt * unit.femtosecond)
        integ.setRandomNumberSeed(seed)
        plat, props = C.make_platform(platform_name)
        self.sim = app.Simulation(top, system, integ, plat, props)
        self.sim.context.setPositions(pos)
        self.sim.minimizeEnergy(maxIterations=500)
        self.sim.context.setVelocitiesToTemperature(C.TEMPERATURE * unit.kelvin, seed)
        self.frames = {k: [] for k in ("time_ps", "phi", "psi", *C.OBSERVABLES, "bias_kT", "c_kT", "cv_phi", "cv_psi")}
        self.snapshots = []  # (ns, probabilities [100, 100]) every --snapshot-ns
        self._next_snapshot_ns = args.snapshot_ns

    def state(self) -> dict:
        """Everything needed to resume this walker (OpenMM checkpoint, bias grid, frames, snapshots)."""
        return dict(checkpoint=self.sim.context.createCheckpoint(), step=self.steps,
                    self_bias=self.meta._selfBias.copy(), total_bias=self.meta._totalBias.copy(),
                    frames={k: list(v) for k, v in self.frames.items()}, snapshots=list(self.snapshots),
                    next_snapshot_ns=self._next_snapshot_ns)

    def restore(self, st: dict) -> None:
        """Resume from :meth:`state` (sets the bias grid through Metadynamics' private table, as it does)."""
        self.sim.context.loadCheckpoint(st["checkpoint"])
        self.sim.currentStep = st["step"]
        m = self.meta
        m._selfBias[...] = st["self_bias"]
        m._totalBias[...] = st["total_bias"]
        m._table.setFunctionParameters(*m._widths, m._totalBias.flatten(), *m._limits)
        m._force.updateParametersInContext(self.sim.context)
        self.frames = st["frames"]
        self.snapshots = st["snapshots"]
        self._next_snapshot_ns = st["next_snapshot_ns"]

    @property
    def steps(self) -> int:
        return int(self.sim.currentStep)

    @property
    def ns(self) -> float:
        return self.steps * self.args.dt * 1e-6

    def bias_grid_kT(self) -> np.ndarray:
        """Current bias V [201, 201] in kT on the grid, ``[i_phi, j_psi]``, points -pi + k 2 pi / (grid - 1)."""
        g = self.args.bias_factor
        F = self.meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)  # [j_psi, i_phi]
        return (-(g - 1.0) / g * F / C.KT).T

    def c_of_t(self, V: np.ndarray) -> float:
        """Tiwary-Parrinello c(t) in kT from the bias grid V (kT)."""
        g = self.args.bias_factor
        v = V[:-1, :-1]
        a = g / (g - 1.0) * v
        b = v / (g - 1.0)
        return float(np.log(np.exp(a - a.max()).sum()) + a.max() - np.log(np.exp(b - b.max()).sum()) - b.max())

    def run(self, steps: int) -> None:
        """Advance by ``steps`` MD steps (a multiple of --frame-every), recording a frame every --frame-every."""
        fe = self.args.frame_every
        for _ in range(steps // fe):
            self.meta.step(self.sim, fe)
            st = self.sim.context.getState(getPositions=True)
            x = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)[None]
            obs = C.frame_observables(x)
            bias = self.sim.context.getState(getEnergy=True, groups={self.bias_group}).getPotentialEnergy()
            V = self.bias_grid_kT()
            cv = self.meta.getCollectiveVariables(self.sim)
            fr = self.frames
            fr["time_ps"].append(self.steps * self.args.dt * 1e-3)
            for k in ("phi", "psi", *C.OBSERVABLES):
                fr[k].append(float(obs[k][0]))
            fr["bias_kT"].append(bias.value_in_unit(unit.kilojoule_per_mole) / C.KT)
            fr["c_kT"].append(self.c_of_t(V))
            fr["cv_phi"].append(float(cv[0]))
            fr["cv_psi"].append(float(cv[1]))
            if self.ns >= self._next_snapshot_ns:
                self.snapshots.append((self.ns, bias_probabilities(V, self.args.bias_factor)))
                self._next_snapshot_ns += self.args.snapshot_ns


def bias_probabilities(V: np.ndarray, bias_factor: float) -> np.ndarray:
    """Bin probabilities [100, 100] from a bias grid V [201, 201] (kT): Simpson integral of exp(-F) per bin.

    F = -(gamma / (gamma - 1)) V. Grid point 2m is bin edge m, 2m + 1 the centre of bin m.
    """
    F = -bias_factor / (bias_factor - 1.0) * V
    n = (V.shape[0] - 1) // 2
    if V.shape != (2 * n + 1, 2 * n + 1):
        raise ValueError("bias grid must be (2 n + 1) x (2 n + 1)")
    w = np.exp(-(F - F.min()))
    s = np.array([1.0, 4.0, 1.0]) / 6.0
    p = np.zeros((n, n))
    for a in range(3):
        for b in range(3):
            p += s[a] * s[b] * w[a:a + 2 * n:2, b:b + 2 * n:2]
    return p / p.sum()


def bias_at(V: np.ndarray, phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Bilinear periodic interpolation of a bias grid V [G, G] (``[i_phi, j_psi]``, endpoint duplicated)."""
    G = V.shape[0] - 1
    h = 2 * np.pi / G
    u = np.mod(np.asarray(phi) + np.pi, 2 * np.pi) / h
    v = np.mod(np.asarray(psi) + np.pi, 2 * np.pi) / h
    i0 = np.floor(u).astype(int) % G
    j0 = np.floor(v).astype(int) % G
    fu, fv = u - np.floor(u), v - np.floor(v)
    i1, j1 = i0 + 1, j0 + 1
    return ((1 - fu) * (1 - fv) * V[i0, j0] + fu * (1 - fv) * V[i1, j0]
            + (1 - fu) * fv * V[i0, j1] + fu * fv * V[i1, j1])


def combine(ps: list[np.ndarray]) -> np.ndarray:
    """Average of per-bin log probabilities (i.e. averaged free energies), renormalised."""
    logp = np.mean([np.log(p) for p in ps], axis=0)
    q = np.exp(logp - logp.max())
    return q / q.sum()


def write_output(walkers: list[Walker], args, meta: dict, partial: bool) -> dict:
    """Analyse the walkers and write the reference npz (+ the packaged grid-only copy). Returns figures."""
    Vs = [w.bias_grid_kT() for w in walkers]
    ps = [bias_probabilities(V, args.bias_factor) for V in Vs]
    p = combine(ps)
    F = metrics.probabilities_to_pmf(p)
    edges = metrics.torus_bin_edges()
    fig = {}
    if len(ps) >= 2:
        fig["kld_walker0_vs_walker1"] = metrics.forward_kld(ps[0], ps[1])
        fig["kld_walker1_vs_walker0"] = metrics.forward_kld(ps[1], ps[0])
        fig["kld_ref_vs_walkers"] = [metrics.forward_kld(p, q) for q in ps]
        # the mean of two independent estimates has about 1/4 of their mutual divergence as its own error
        fig["self_consistency_kld"] = 0.5 * (fig["kld_walker0_vs_walker1"] + fig["kld_walker1_vs_walker0"])
        fig["estimated_reference_error_kld"] = fig["self_consistency_kld"] / 4.0
    # half-time vs end per walker (convergence of the deposited bias)
    halves = []
    for w, q in zip(walkers, ps):
        mids = [s for s in w.snapshots if s[0] <= 0.5 * w.ns + 1e-9]
        if mids:
            halves.append(metrics.forward_kld(q, mids[-1][1]))
    fig["kld_end_vs_half_time_per_walker"] = halves
    # convergence curve: KLD of each walker's snapshot to the final combined reference
    conv = [[(float(t), metrics.forward_kld(p, q)) for t, q in w.snapshots] for w in walkers]
    fig["populations"] = metrics.basin_populations(p)
    fig["populations_per_walker"] = [metrics.basin_populations(q) for q in ps]

    frames = {}
    n_frames = [len(w.frames["time_ps"]) for w in walkers]
    for k in walkers[0].frames:
        if k in ("cv_phi", "cv_psi"):
            continue
        frames[k] = np.concatenate([np.asarray(w.frames[k], dtype=np.float32) for w in walkers])
    frames["walker"] = np.concatenate([np.full(n, i, dtype=np.int8) for i, n in enumerate(n_frames)])
    frames["final_bias_kT"] = np.concatenate([
        bias_at(V, np.asarray(w.frames["phi"]), np.asarray(w.frames["psi"])).astype(np.float32)
        for V, w in zip(Vs, walkers)])
    # cross-check: reweighted histogram of the second half of every walker vs the bias-based reference
    sel = np.concatenate([np.asarray(w.frames["time_ps"]) >= 0.5 * w.ns * 1e3 for w in walkers])
    if sel.sum() > 100:
        lw = (frames["bias_kT"].astype(np.float64) - frames["c_kT"])[sel]
        wts = np.exp(lw - lw.max())
        s2 = np.stack([frames["phi"][sel], frames["psi"][sel]], 1)
        fig["kld_ref_vs_reweighted_second_half_histogram"] = metrics.kld_from_samples(s2, p, weights=wts)
        fig["n_frames_second_half"] = int(sel.sum())
    # CV check: OpenMM CustomTorsionForce theta vs numpy/mdtraj-convention dihedral
    dphi = np.concatenate([np.angle(np.exp(1j * (np.asarray(w.frames["cv_phi"]) - np.asarray(w.frames["phi"]))))
                           for w in walkers])
    fig["max_abs_cv_minus_dihedral_rad"] = float(np.max(np.abs(dphi))) if len(dphi) else None

    meta = dict(meta)
    meta.update(
        partial=partial,
        ns_per_walker=[w.ns for w in walkers],
        ns_total=float(sum(w.ns for w in walkers)),
        energy_evaluations=int(sum(w.steps for w in walkers)),
        energy_evaluations_note="one force evaluation per MD step; minimisation (<= 500 per walker) not counted",
        hills_per_walker=[w.steps // args.pace for w in walkers],
        frames=int(sum(n_frames)),
        wall_s=time.time() - meta["t_start"],
        written=time.strftime("%Y-%m-%d %H:%M:%S"),
        figures=fig,
        convergence=conv,
    )
    meta_json = json.dumps(meta, default=float)
    common = dict(free_energy_kT=F, probabilities=p, phi_edges=edges, psi_edges=edges,
                  self_consistency_kld=np.float64(fig.get("self_consistency_kld", np.nan)),
                  bias_factor=np.float64(args.bias_factor), temperature=np.float64(C.TEMPERATURE),
                  partial=np.bool_(partial), metadata_json=np.array(meta_json))
    C.save_npz_atomic(args.out, walker_probabilities=np.stack(ps), bias_grids_kT=np.stack(Vs).astype(np.float32),
                      **common, **frames)
    if args.package_copy:
        C.save_npz_atomic(os.path.join(REPO, "openmm_cgflow", "data", REFERENCE_FILE), **common)
    return meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1 min smoke run, writes *_quick.npz, no package copy")
    ap.add_argument("--minutes", type=float, default=47.0, help="wall-clock budget of the sampling loop")
    ap.add_argument("--max-ns", type=float, default=None, help="stop when every walker reached this (ns)")
    ap.add_argument("--walkers", type=int, default=2)
    ap.add_argument("--platform", default="auto", help="auto (measure Reference vs CPU, take the faster), Reference, CPU")
    ap.add_argument("--hydrogen-mass", type=float, default=3.0, help="amu; 0 disables HMR")
    ap.add_argument("--dt", type=float, default=2.0, help="time step, fs")
    ap.add_argument("--friction", type=float, default=1.0, help="1/ps")
    ap.add_argument("--sigma", type=float, default=0.25, help="Gaussian width, rad")
    ap.add_argument("--height", type=float, default=1.0, help="initial Gaussian height, kJ/mol")
    ap.add_argument("--pace", type=int, default=500, help="steps between Gaussians")
    ap.add_argument("--bias-factor", type=float, default=6.0)
    ap.add_argument("--grid", type=int, default=201, help="bias grid points per axis (2 * 100 + 1)")
    ap.add_argument("--frame-every", type=int, default=1000, help="steps between saved frames")
    ap.add_argument("--chunk-steps", type=int, default=25000, help="steps per walker before switching walker")
    ap.add_argument("--snapshot-ns", type=float, default=1.0, help="keep the bias probabilities every this many ns")
    ap.add_argument("--checkpoint-minutes", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--state", default=None, help="resume file (default: <out>.state.pkl); written every checkpoint")
    ap.add_argument("--resume", action="store_true", help="continue from --state if it exists (same settings)")
    args = ap.parse_args(argv)
    if args.hydrogen_mass <= 0:
        args.hydrogen_mass = None
    if args.quick:
        args.minutes = min(args.minutes, 0.7)
        args.chunk_steps = 5000
        args.snapshot_ns = 0.05
        args.checkpoint_minutes = 100.0
    args.package_copy = not args.quick and args.out is None  # only the default full run feeds the package
    args.out = args.out or os.path.join(HERE, "data", "aldp_reference_quick.npz" if args.quick else "aldp_reference.npz")
    args.state = args.state or args.out + ".state.pkl"
    if args.chunk_steps % args.frame_every:
        raise SystemExit("chunk-steps must be a multiple of frame-every")

    t_start = time.time()
    speeds = {}
    if args.platform == "auto":
        for name in ("Reference", "CPU"):
            speeds[name] = measure_platform_speed(name, args.hydrogen_mass, args.dt)
            print(f"platform {name}: {speeds[name]:.0f} steps/s "
                  f"({speeds[name] * args.dt * 1e-6 * 86400:.0f} ns/day)", flush=True)
        args.platform = max(speeds, key=speeds.get)
    print(f"using platform {args.platform}", flush=True)

    walkers = [Walker(i, args.seed + 1000 * i, args, args.platform) for i in range(args.walkers)]
    meta = dict(t_start=t_start, command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                platform=args.platform, platform_speed_steps_per_s=speeds, threads=1,
                machine=f"{_platform.node()} {os.cpu_count()} cores, no GPU", openmm_version=openmm.__version__,
                forcefield="amber96.xml + amber96_obc.xml, NoCutoff, no constraints",
                temperature_K=C.TEMPERATURE, integrator="LangevinMiddleIntegrator", friction_per_ps=args.friction,
                dt_fs=args.dt, hydrogen_mass_amu=args.hydrogen_mass, bias_factor=args.bias_factor,
                sigma_rad=args.sigma, initial_height_kJmol=args.height, pace_steps=args.pace, grid=args.grid,
                walkers=args.walkers, seeds=[args.seed + 1000 * i for i in range(args.walkers)],
                frame_every_steps=args.frame_every, cv_atoms={"phi": C.PHI, "psi": C.PSI},
                observables=C.OBSERVABLES,
                populations_definition="phi_pos: phi > 0; alpha_R: phi < 0 and -2 < psi < 1; beta_C7eq: other phi < 0")

    loop_before = 0.0  # sampling-loop seconds spent before a resume
    if args.resume and os.path.exists(args.state):
        with open(args.state, "rb") as fh:
            saved = pickle.load(fh)
        for w, st in zip(walkers, saved["walkers"]):
            w.restore(st)
        loop_before = saved["loop_s"]
        meta["t_start"] = time.time() - saved["wall_s"]
        meta["resumed"] = meta.get("resumed", 0) + saved.get("resumed", 0) + 1
        print(f"resumed from {args.state}: {[w.ns for w in walkers]} ns, {loop_before / 60:.1f} min", flush=True)

    def save_state():
        tmp = args.state + ".tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(dict(walkers=[w.state() for w in walkers], loop_s=loop_before + time.time() - t_loop,
                             wall_s=time.time() - meta["t_start"], resumed=meta.get("resumed", 0)), fh)
        os.replace(tmp, args.state)

    t_loop = time.time()
    budget = args.minutes * 60.0
    last_ckpt = time.time()
    while True:
        for w in walkers:
            w.run(args.chunk_steps)
        elapsed = loop_before + time.time() - t_loop
        ns = [w.ns for w in walkers]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"[{elapsed / 60:6.1f} min] ns per walker {', '.join(f'{x:.2f}' for x in ns)}  "
              f"({sum(ns) / max(elapsed, 1e-9) * 60:.2f} ns/min total, max RSS {rss:.0f} MB) "
              f"{time.strftime('%H:%M:%S')}", flush=True)
        done = elapsed >= budget or (args.max_ns is not None and min(ns) >= args.max_ns)
        if done:
            break
        if time.time() - last_ckpt >= args.checkpoint_minutes * 60.0:
            m = write_output(walkers, args, meta, partial=True)
            f = m["figures"]
            print(f"  checkpoint: self-consistency KLD {f.get('self_consistency_kld', float('nan')):.5f}, "
                  f"populations {f['populations']}", flush=True)
            save_state()
            last_ckpt = time.time()
    m = write_output(walkers, args, meta, partial=False)
    print(json.dumps({k: m[k] for k in ("ns_total", "energy_evaluations", "wall_s", "figures")}, indent=1,
                     default=float), flush=True)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
