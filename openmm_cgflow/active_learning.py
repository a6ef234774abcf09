"""Active learning of a PMF: spend all-atom energy evaluations only where the PMF ensemble is uncertain.

One iteration (Schopmans & Friederich, ICML 2024):

1. train the conditional flow q(fine | s) by energy at the pending CG points plus a replayed share of the
   earlier ones (so it does not forget), replaying preferentially the points whose labels had a low ESS;
2. free-energy labels A(s) (kT) at the pending points by importance sampling of the flow; the replayed
   points are relabelled and keep whichever label has the higher effective sample size;
3. fit the PMF ensemble to all labels so far and export it to ``pmf.pt`` (TorchScript);
4. run CG walkers in OpenMM on the exported PMF (``openmm_cgflow_plugin.CGDynamics``) from the newest
   points until they reach points where the ensemble spread exceeds the threshold (default 0.2 kT);
5. pick diverse new centres among those points (farthest-point sampling with periodic distance) and
   broaden each into a neighbourhood: the pending points of the next iteration.

The run stops by itself when the walkers find no point above the threshold within their CG-step budget
(no ground truth needed), or on the iteration / energy-evaluation budgets. Every iteration is written to
the run directory atomically (``pmf.pt``, ``flow.pt``, ``checkpoint.pt``, ``iterations.jsonl``,
``plots/``, and each iteration's ensemble as ``pmfs/pmf_NNN.pt``); running again with the same directory resumes after the last finished iteration, and the
same seed gives the same result whether or not the run was interrupted.

Units: CG coordinates in radians (dihedrals) or nm (Mueller-Brown s), free energies and spreads in kT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .bridge import EnergyBridge
from .flow import flow_for
from .free_energy import free_energy
from .model_io import atomic_torch_save, save_model, system_from_dict, system_to_dict
from .training import Trainer

__all__ = ["LearnerSettings", "PMFLearner", "farthest_points", "neighbourhood", "periodic_distance"]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "openmm-cgflow-checkpoint/1"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class LearnerSettings:
    """Settings of an active-learning run (CG units: radians for dihedrals, nm otherwise; energies kT).

    Exploration: ``threshold_kT`` spread that marks a CG point as uncertain; ``n_walkers`` CG walkers per
    iteration, each given at most ``walker_steps`` Langevin steps (timestep ``walker_timestep_ps``),
    checked every ``report_interval`` steps, at ``walker_temperature_factor`` times the system temperature
    (they sample exp(-A / factor): a flattened PMF, so they reach the uncertain frontier sooner); ``new_centres`` diverse uncertain points per iteration, each
    broadened to ``points_per_centre`` points uniform in a ball of ``radius``; ``domain`` (lo, hi) per
    non-periodic CG dim, outside of which nothing is explored.
    Start: ``initial_points`` in a ball of ``initial_radius`` around ``start`` (default: the CG
    coordinates of the system's reference structure).
    Flow: ``flow_kwargs`` for :func:`~openmm_cgflow.flow.flow_for`, parameters in ``flow_dtype``
    ("float32": 1.6x the training throughput of "float64" for alanine dipeptide, see benchmarks/RESULTS.md;
    energies, Jacobians and labels are float64 either way); trained for ``first_epochs`` then
    ``epochs`` per iteration at the pending points plus ``replay_fraction`` of the earlier ones, with
    ``samples_per_point`` samples per point per epoch, ``points_per_batch`` points per step, learning rate
    ``lr`` decaying to ``lr_final`` within each iteration, ``forward_weight`` (see the Trainer).
    Labels: ``label_samples`` flow samples per new point. Ensemble: ``n_models`` networks.
    Budgets: ``max_iterations``, ``max_evaluations`` (energy evaluations sent to OpenMM; None: no limit).
    """

    threshold_kT: float = 0.2
    n_walkers: int = 100
    walker_steps: int = 20_000
    walker_timestep_ps: float | None = None
    walker_temperature_factor: float = 2.0
    report_interval: int = 100
    new_centres: int = 15
    points_per_centre: int = 20
    radius: float = 0.6
    domain: list | None = None
    start: list | None = None
    initial_points: int = 200
    initial_radius: float = 0.6
    flow_kwargs: dict = field(default_factory=dict)
    flow_dtype: str = "float32"
    first_epochs: int = 60
    epochs: int = 30
    samples_per_point: int = 16
    points_per_batch: int = 64
    lr: float = 1e-3
    lr_final: float = 1e-4
    warmup_steps: int = 50
    forward_weight: float = 0.5
    drop_worst: int = 2
    replay_fraction: float = 0.3
    label_samples: int = 256
    n_models: int = 10
    max_iterations: int = 20
    max_evaluations: int | None = None
    n_workers: int | None = None
    seed: int = 0

    @classmethod
    def for_system(cls, cgsystem, **overrides) -> "LearnerSettings":
        """Defaults for a system (Mueller-Brown gets a 1-D setting), updated by ``overrides``."""
        base = {}
        if cgsystem.name == "mueller-brown":
            base = dict(
                domain=[[-2.5, 1.1]], radius=0.12, initial_radius=0.25, initial_points=40, new_centres=4,
                points_per_centre=10, n_walkers=50, walker_steps=4_000, report_interval=20,
                first_epochs=150, epochs=100, samples_per_point=8, lr=3e-3, lr_final=3e-5, drop_worst=0,
                label_samples=1000, flow_dtype="float64",
            )
        base.update(overrides)
        unknown = set(base) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}")
        return cls(**base)

    def validate(self, n_cg: int) -> None:
        """Raise ValueError naming the first bad setting."""
        if not (self.threshold_kT > 0 and math.isfinite(self.threshold_kT)):
            raise ValueError(f"threshold_kT must be a positive number, got {self.threshold_kT}")
        for name in ("n_walkers", "walker_steps", "report_interval", "new_centres", "points_per_centre",
                     "initial_points", "samples_per_point", "points_per_batch", "label_samples", "n_models",
                     "max_iterations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.walker_temperature_factor > 0 and math.isfinite(self.walker_temperature_factor)):
            raise ValueError(f"walker_temperature_factor must be > 0, got {self.walker_temperature_factor}")
        if self.flow_dtype not in _DTYPES:
            raise ValueError(f"flow_dtype must be one of {sorted(_DTYPES)}, got {self.flow_dtype!r}")
        if self.radius <= 0 or self.initial_radius <= 0:
            raise ValueError("radius and initial_radius must be > 0")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {self.replay_fraction}")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise ValueError(f"max_evaluations must be >= 1 or None, got {self.max_evaluations}")
        if self.start is not None and len(self.start) != n_cg:
            raise ValueError(f"start has {len(self.start)} entries but the system has {n_cg} CG coordinates")


# ------------------------------------------------------------------------------------------ geometry
def periodic_distance(a: np.ndarray, b: np.ndarray, periodic) -> np.ndarray:
    """Euclidean distance with minimum-image differences on periodic dims (period 2 pi).

    a [..., d], b [..., d] (broadcast) -> [...].
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    per = np.asarray(periodic, dtype=bool)
    diff = np.where(per, (diff + np.pi) % (2 * np.pi) - np.pi, diff)
    return np.sqrt((diff**2).sum(-1))


def farthest_points(points: np.ndarray, k: int, periodic, rng: np.random.Generator,
                    existing: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``k`` mutually distant rows of points [N, d] (greedy farthest-point sampling).

    With ``existing`` [M, d], the first pick is the point farthest from them; otherwise a random one.
    """
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=int)
    k = min(int(k), n)
    if existing is not None and len(existing):
        dmin = periodic_distance(points[:, None, :], np.asarray(existing)[None, :, :], periodic).min(1)
        first = int(np.argmax(dmin))
    else:
        first = int(rng.integers(n))
        dmin = np.full(n, np.inf)
    chosen = [first]
    dmin = np.minimum(dmin, periodic_distance(points, points[first], periodic))
    while len(chosen) < k:
        nxt = int(np.argmax(dmin))
        chosen.append(nxt)
        dmin = np.minimum(dmin, periodic_distance(points, points[nxt], periodic))
    return np.array(chosen, dtype=int)


def _wrap(s: np.ndarray, periodic) -> np.ndarray:
    per = np.asarray(periodic, dtype=bool)
    return np.where(per, (s + np.pi) % (2 * np.pi) - np.pi, s)


def neighbourhood(centres: np.ndarray, n_per_centre: int, radius: float, periodic, rng: np.random.Generator,
                  domain=None) -> np.ndarray:
    """Points uniform in a ball of ``radius`` around each centre [C, d] -> [C * n_per_centre, d].

    Periodic dims are wrapped to [-pi, pi); non-periodic ones clipped to ``domain`` [(lo, hi), ...].
    """
    centres = np.atleast_2d(np.asarray(centres, dtype=np.float64))
    c, d = centres.shape
    direction = rng.standard_normal((c, n_per_centre, d))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    r = radius * rng.random((c, n_per_centre, 1)) ** (1.0 / d)
    pts = (centres[:, None, :] + r * direction).reshape(-1, d)
    pts = _wrap(pts, periodic)
    return _clip_domain(pts, periodic, domain)


def _clip_domain(pts, periodic, domain):
    if domain is None:
        return pts
    pts = pts.copy()
    j = 0
    for i, per in enumerate(periodic):
        if not per:
            lo, hi = domain[j]
            pts[:, i] = np.clip(pts[:, i], lo, hi)
            j += 1
    return pts


def _in_domain(pts, periodic, domain) -> np.ndarray:
    ok = np.ones(len(pts), dtype=bool)
    if domain is None:
        return ok
    j = 0
    for i, per in enumerate(periodic):
        if not per:
            lo, hi = domain[j]
            ok &= (pts[:, i] >= lo) & (pts[:, i] <= hi)
            j += 1
    return ok


# ------------------------------------------------------------------------------------------- learner
class PMFLearner:
    """Active learning of the PMF of ``cgsystem`` into the run directory ``out_dir``.

    Typical use::

        learner = PMFLearner(builtin("alanine-dipeptide"), "runs/ala2")
        learner.run()                     # resumes if runs/ala2 holds a checkpoint
        learner.pmf_path                  # runs/ala2/pmf.pt, for openmm_cgflow_plugin

    Args:
        cgsystem: the molecule (:class:`~openmm_cgflow.systems.CGSystem`).
        out_dir: run directory (created; must be writable).
        settings: :class:`LearnerSettings` (default: ``LearnerSettings.for_system(cgsystem)``).
        reference: optional reference for the forward-KLD log (a name or data accepted by
            :func:`openmm_cgflow.metrics.kld_from_pmf`, e.g. ``"alanine-dipeptide"`` or ``"mueller-brown"``).
        progress: show progress bars.
        plots: write PNG plots per iteration to ``out_dir/plots``.
    """

    def __init__(self, cgsystem, out_dir, settings: LearnerSettings | None = None, reference=None,
                 progress: bool = True, plots: bool = True):
        self.cgsystem = cgsystem
        self.settings = settings or LearnerSettings.for_system(cgsystem)
        self.settings.validate(cgsystem.n_cg)
        self.out_dir = os.fspath(out_dir)
        _prepare_out_dir(self.out_dir)
        self.reference = reference
        self.progress = progress
        self.plots = plots
        self.periodic = list(cgsystem.cg_periodic)
        self.log = print if progress else (lambda *a, **k: None)

        st = self.settings
        self.flow = flow_for(cgsystem, dtype=_DTYPES[st.flow_dtype], seed=st.seed, **st.flow_kwargs)
        self._bridge = None
        self.trainer = None
        # state (all that a checkpoint holds)
        self.iteration = 0
        self.points = np.zeros((0, cgsystem.n_cg))  # CG points the flow was trained at
        self.labels = {k: np.zeros(0) for k in ("A", "stderr", "ess", "iteration")}
        self.label_s = np.zeros((0, cgsystem.n_cg))
        self.pending: np.ndarray | None = None  # points of the next iteration
        self.evaluations = 0
        self.wall_s = 0.0
        self.history: list[dict] = []
        self.converged = False
        self.stop_reason = ""
        if os.path.exists(self.checkpoint_path):
            self._load_checkpoint()

    # ------------------------------------------------------------------ paths
    @property
    def pmf_path(self) -> str:
        """The latest exported ensemble (TorchScript; see openmm_cgflow_plugin.load_pmf)."""
        return os.path.join(self.out_dir, "pmf.pt")

    @property
    def flow_path(self) -> str:
        """The latest flow with its system (openmm_cgflow.model_io.load_model), for backmapping."""
        return os.path.join(self.out_dir, "flow.pt")

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT)

    @classmethod
    def from_run(cls, out_dir, progress: bool = True, plots: bool = True, reference=None) -> "PMFLearner":
        """The learner of an existing run directory (system and settings from its checkpoint)."""
        path = os.path.join(os.fspath(out_dir), CHECKPOINT)
        ck = _read_checkpoint(path)
        cgsystem = system_from_dict(ck["system"])
        settings = LearnerSettings(**ck["settings"])
        return cls(cgsystem, out_dir, settings, reference=reference if reference is not None else ck.get("reference"),
                   progress=progress, plots=plots)

    # ------------------------------------------------------------------ resources
    @property
    def bridge(self) -> EnergyBridge:
        if self._bridge is None:
            self._bridge = EnergyBridge(self.cgsystem.system, self.cgsystem.temperature, n_workers=self.settings.n_workers)
        return self._bridge

    def close(self) -> None:
        """Stop the energy bridge's worker processes."""
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            st = self.settings
            self.trainer = Trainer(
                self.flow, self.cgsystem, self.bridge, lr=st.lr, warmup_steps=st.warmup_steps,
                drop_worst=st.drop_worst, forward_weight=st.forward_weight, samples_per_point=st.samples_per_point,
                points_per_batch=st.points_per_batch, seed=st.seed, progress=self.progress,
            )
            if getattr(self, "_pending_optimizer_state", None) is not None:
                self.trainer.optimizer.load_state_dict(self._pending_optimizer_state)
                self.trainer.step_count = self._pending_step_count
                self._pending_optimizer_state = None
        else:
            self.trainer.energy = self.bridge
        return self.trainer

    # ------------------------------------------------------------------ the loop
    def initial_points(self) -> np.ndarray:
        """The first iteration's CG points: a ball around the start (the reference structure's s)."""
        st = self.settings
        start = np.asarray(st.start if st.start is not None else self.cgsystem.cg_of(self.cgsystem.positions)[0])
        rng = np.random.default_rng([st.seed, 0, 1])
        pts = neighbourhood(start[None], st.initial_points - 1, st.initial_radius, self.periodic, rng, st.domain)
        return np.concatenate([_clip_domain(_wrap(start[None], self.periodic), self.periodic, st.domain), pts])

    def run(self) -> str:
        """Iterate until the stop rule or a budget ends the run; returns the path of ``pmf.pt``."""
        st = self.settings
        if self.pending is None and self.iteration == 0:
            self.pending = self.initial_points()
        bar = tqdm(total=st.max_iterations, initial=self.iteration, desc="active learning", disable=not self.progress)
        try:
            while not self.converged:
                if self.iteration >= st.max_iterations:
                    self.stop_reason = f"iteration budget ({st.max_iterations}) reached"
                    break
                if st.max_evaluations is not None and self.evaluations >= st.max_evaluations:
                    self.stop_reason = f"energy-evaluation budget ({st.max_evaluations}) reached"
                    break
                record = self.step(explore=True)
                bar.update(1)
                bar.set_postfix(evals=record["energy_evaluations"], spread=f"{record['max_spread_kT']:.2f}",
                                points=record["cg_points"])
                self.log(_format_record(record))
        finally:
            bar.close()
            self.close()
        if self.converged:
            self.stop_reason = "no CG point above the spread threshold within the walkers' budget"
        self.log(f"stopped: {self.stop_reason}; pmf: {self.pmf_path}")
        return self.pmf_path

    def refine(self, s_points, max_centres: int | None = None, explore: bool = False) -> str:
        """Refine the PMF at CG points [N, d] that a user's own simulation visited.

        Points where the current ensemble's spread exceeds the threshold (all points if no pmf.pt yet) are
        reduced to at most ``max_centres`` diverse centres (default ``new_centres``), broadened, trained
        and labelled; the ensemble is refitted and ``pmf.pt`` re-exported. Returns the path of ``pmf.pt``.
        """
        st = self.settings
        s_points = _wrap(np.atleast_2d(np.asarray(s_points, dtype=np.float64)), self.periodic)
        if s_points.shape[1] != self.cgsystem.n_cg:
            raise ValueError(f"s_points has {s_points.shape[1]} columns but the system has {self.cgsystem.n_cg} CG coordinates")
        if os.path.exists(self.pmf_path):
            _, spread = self._mean_and_spread(s_points)
            s_points = s_points[spread > st.threshold_kT]
        if len(s_points) == 0:
            self.log("refine: the ensemble is already certain (spread <= threshold) at all given points")
            return self.pmf_path
        rng = np.random.default_rng([st.seed, self.iteration, 2])
        idx = farthest_points(s_points, max_centres or st.new_centres, self.periodic, rng, existing=self.points)
        self.pending = neighbourhood(s_points[idx], st.points_per_centre, st.radius, self.periodic, rng, st.domain)
        self.converged = False
        try:
            self.log(_format_record(self.step(explore=explore)))
        finally:
            self.close()
        return self.pmf_path

    def step(self, explore: bool = True) -> dict:
        """One iteration at the pending points; returns its record (also in iterations.jsonl)."""
        from .ensemble import export_pmf, fit_ensemble

        st = self.settings
        t0 = time.perf_counter()
        k = self.iteration
        new = np.asarray(self.pending, dtype=np.float64)
        rng = np.random.default_rng([st.seed, k, 0])
        gen = torch.Generator().manual_seed(int(np.random.default_rng([st.seed, k, 3]).integers(2**62)))
        evals0 = self.bridge.n_evaluations

        # 1. flow by energy at the new points + replay
        trainer = self._trainer()
        trainer.generator = gen
        replay_idx = np.zeros(0, dtype=int)
        if len(self.label_s):
            # Replay earlier labelled points, preferring those whose label had a low ESS: training there
            # again and relabelling (below) repairs the labels of the first, least trained iterations.
            n_replay = min(int(round(st.replay_fraction * len(new))), len(self.label_s))
            p = 1.05 - np.clip(self.labels["ess"], 0.0, 1.0)
            replay_idx = rng.choice(len(self.label_s), size=n_replay, replace=False, p=p / p.sum())
            train_pts = np.concatenate([new, self.label_s[replay_idx]])
        else:
            train_pts = new
        epochs = st.first_epochs if k == 0 else st.epochs
        trainer.lr = st.lr
        trainer.train_by_energy(train_pts, epochs, lr_final=st.lr_final)
        _check_finite_parameters(self.flow)

        # 2. labels at the new points; replayed points are relabelled and keep the label with the higher ESS
        labels = free_energy(self.flow, self.cgsystem, self.bridge, new, st.label_samples, generator=gen)
        n_relabelled = 0
        if len(replay_idx):
            again = free_energy(self.flow, self.cgsystem, self.bridge, self.label_s[replay_idx], st.label_samples,
                                generator=gen)
            better = np.isfinite(again.A) & np.isfinite(again.stderr) & (again.ess_fraction > self.labels["ess"][replay_idx])
            for key, val in (("A", again.A), ("stderr", again.stderr), ("ess", again.ess_fraction)):
                self.labels[key][replay_idx[better]] = val[better]
            self.labels["iteration"][replay_idx[better]] = k
            n_relabelled = int(better.sum())
        good = np.isfinite(labels.A) & np.isfinite(labels.stderr)
        self.points = np.concatenate([self.points, new])
        self.label_s = np.concatenate([self.label_s, labels.s[good]])
        for key, val in (("A", labels.A[good]), ("stderr", labels.stderr[good]), ("ess", labels.ess_fraction[good]),
                         ("iteration", np.full(int(good.sum()), k))):
            self.labels[key] = np.concatenate([self.labels[key], val])
        if len(self.label_s) < 2:
            raise RuntimeError("fewer than two usable free-energy labels: the flow produced no finite samples")

        # 3. ensemble + export
        ensemble = fit_ensemble(self.label_s, self.labels["A"], self.labels["stderr"], self.periodic,
                                n_models=st.n_models, seed=int(rng.integers(2**31)))
        export_pmf(ensemble, self.pmf_path, self.cgsystem.cg_names, self.periodic, self.cgsystem.temperature,
                   self.cgsystem.cg_atoms)
        save_model(self.flow_path, self.flow, self.cgsystem, iteration=k)
        _atomic_copy(self.pmf_path, os.path.join(self.out_dir, "pmfs", f"pmf_{k:03d}.pt"))

        # 4. + 5. explore with CG walkers, choose the next points
        n_wrong = int(labels.n_wrong_chirality.sum())
        record = {"iteration": k, "cg_points": int(len(self.points)), "labels": int(len(self.label_s)),
                  "new_points": int(len(new)), "dropped_labels": int((~good).sum()), "relabelled": n_relabelled,
                  "mean_ess": float(np.mean(labels.ess_fraction)),
                  "min_ess": float(np.min(labels.ess_fraction)),
                  "mean_ess_all_labels": float(np.mean(self.labels["ess"])),
                  "wrong_chirality_fraction": n_wrong / float(labels.n_samples * len(new))}
        if explore:
            found, spread_stats = self._explore(rng)
            record.update(spread_stats)
            if len(found) == 0:
                self.converged = True
                self.pending = None
            else:
                idx = farthest_points(found, st.new_centres, self.periodic, rng, existing=self.points)
                record["new_centres"] = found[idx].tolist()
                self.pending = neighbourhood(found[idx], st.points_per_centre, st.radius, self.periodic, rng, st.domain)
        else:
            _, spread = self._mean_and_spread(self.label_s)
            record.update(max_spread_kT=float(spread.max()), mean_spread_kT=float(spread.mean()), uncertain_found=0)
            self.pending = None
        self.evaluations += self.bridge.n_evaluations - evals0
        self.wall_s += time.perf_counter() - t0
        record["energy_evaluations"] = int(self.evaluations)
        record["wall_s"] = round(self.wall_s, 3)
        record["converged"] = bool(self.converged)
        if self.reference is not None:
            from .metrics import kld_from_pmf

            record["kld"] = float(kld_from_pmf(lambda p: self._mean_and_spread(p)[0], self.reference))
        self.history.append(record)
        self.iteration = k + 1
        if self.plots:
            self._plot(record)
        self._save_checkpoint()
        self._write_jsonl()
        return record

    def _mean_and_spread(self, s: np.ndarray):
        """Mean and spread (kT) of the exported ensemble at s [N, d]."""
        from openmm_cgflow_plugin import load_pmf

        pmf = load_pmf(self.pmf_path)
        mean, spread = pmf.mean_and_spread(np.asarray(s, dtype=np.float64))
        return np.asarray(mean), np.asarray(spread)

    def _explore(self, rng: np.random.Generator):
        """CG walkers on pmf.pt from the newest points; returns (uncertain points [K, d], spread stats)."""
        from openmm_cgflow_plugin import CGDynamics

        st = self.settings
        newest = self.points[-len(self.pending):] if self.pending is not None else self.points
        s0 = newest[rng.choice(len(newest), size=st.n_walkers, replace=len(newest) < st.n_walkers)]
        kwargs = {"sampling_temperature": st.walker_temperature_factor * self.cgsystem.temperature}
        if st.walker_timestep_ps is not None:
            kwargs["timestep"] = st.walker_timestep_ps
        dyn = CGDynamics(self.pmf_path, s0, seed=int(rng.integers(1, 2**30)), **kwargs)
        active = np.ones(st.n_walkers, dtype=bool)
        found, max_spread, spread_sum, n_frames = [], 0.0, 0.0, 0
        chunk = st.report_interval * 10
        steps = 0
        want = max(2 * st.new_centres, 1)
        while steps < st.walker_steps and active.any():
            n = min(chunk, st.walker_steps - steps)
            s, spread = dyn.run(n, st.report_interval)
            steps += n
            s = np.asarray(s)
            spread = np.asarray(spread)
            for f in range(s.shape[0]):
                inside = _in_domain(s[f], self.periodic, st.domain)
                sp = np.where(inside, spread[f], 0.0)
                max_spread = max(max_spread, float(sp[active].max(initial=0.0)))
                spread_sum += float(sp[active & inside].sum())
                n_frames += int((active & inside).sum())
                hit = active & inside & (sp > st.threshold_kT)
                for w in np.flatnonzero(hit):
                    found.append(s[f, w])
                active &= ~hit
            if len(found) >= want and (~active).sum() >= want:
                break
        stats = {"max_spread_kT": max_spread, "mean_spread_kT": spread_sum / max(n_frames, 1),
                 "uncertain_found": len(found), "walker_steps": int(steps)}
        return np.asarray(found, dtype=np.float64).reshape(-1, self.cgsystem.n_cg), stats

    # ------------------------------------------------------------------ files
    def _plot(self, record: dict) -> None:
        try:
            from openmm_cgflow_plugin import plot_pmf

            os.makedirs(os.path.join(self.out_dir, "plots"), exist_ok=True)
            png = os.path.join(self.out_dir, "plots", f"pmf_{record['iteration']:03d}.png")
            centres = record.get("new_centres")
            plot_pmf(self.pmf_path, png, points=None if centres is None else np.asarray(centres),
                     threshold=self.settings.threshold_kT,
                     title=f"iteration {record['iteration']}: {len(self.label_s)} labelled CG points")
            if any("kld" in r for r in self.history):
                _plot_kld(self.history, os.path.join(self.out_dir, "plots", "kld.png"))
        except Exception as exc:  # a plot must never end a run
            self.log(f"warning: plotting failed: {exc}")

    def _save_checkpoint(self) -> None:
        trainer = self.trainer
        payload = {
            "format": CHECKPOINT_FORMAT,
            "system": system_to_dict(self.cgsystem),
            "settings": dataclasses.asdict(self.settings),
            "reference": self.reference if isinstance(self.reference, str) else None,
            "iteration": self.iteration,
            "points": self.points,
            "label_s": self.label_s,
            "labels": self.labels,
            "pending": self.pending,
            "evaluations": self.evaluations,
            "wall_s": self.wall_s,
            "history": self.history,
            "converged": self.converged,
            "flow_state": {k: v.detach().clone() for k, v in self.flow.state_dict().items()},
            "optimizer_state": None if trainer is None else trainer.optimizer.state_dict(),
            "step_count": 0 if trainer is None else trainer.step_count,
        }
        atomic_torch_save(payload, self.checkpoint_path)

    def _load_checkpoint(self) -> None:
        ck = _read_checkpoint(self.checkpoint_path)
        mine = dataclasses.asdict(self.settings)
        theirs = ck["settings"]
        differ = [k for k in mine if k in theirs and _differs(mine[k], theirs[k])
                  and k not in ("max_iterations", "max_evaluations", "n_workers")]
        if differ:
            raise ValueError(
                f"{self.out_dir} holds a run with different settings ({', '.join(differ)}); resume it with the same "
                "settings or choose another output directory")
        if ck["system"].get("name", ck["system"].get("builtin")) != system_to_dict(self.cgsystem).get(
                "name", system_to_dict(self.cgsystem).get("builtin")):
            raise ValueError(f"{self.out_dir} holds a run of another system")
        self.iteration = ck["iteration"]
        self.points = ck["points"]
        self.label_s = ck["label_s"]
        self.labels = ck["labels"]
        self.pending = ck["pending"]
        self.evaluations = ck["evaluations"]
        self.wall_s = ck["wall_s"]
        self.history = ck["history"]
        self.converged = ck["converged"]
        self.flow.load_state_dict(ck["flow_state"])
        self._pending_optimizer_state = ck["optimizer_state"]
        self._pending_step_count = ck["step_count"]
        self.log(f"resuming {self.out_dir} after iteration {self.iteration - 1} "
                 f"({self.evaluations} energy evaluations so far)")

    def _write_jsonl(self) -> None:
        path = os.path.join(self.out_dir, "iterations.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            for r in self.history:
                fh.write(json.dumps(r) + "\n")
        os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- helpers
def _atomic_copy(src: str, dst: str) -> None:
    import shutil

    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _differs(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str)


def _read_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is unreadable (corrupt?): {exc}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an openmm-cgflow checkpoint")
    return ck


def _prepare_out_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output directory {path}: {exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {path} is not writable")


def _check_finite_parameters(flow) -> None:
    for name, p in flow.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"flow parameter {name} became non-finite during training; "
                                     "lower the learning rate (the last checkpoint is intact)")


def _format_record(r: dict) -> str:
    parts = [f"iteration {r['iteration']}", f"evals {r['energy_evaluations']:,}", f"points {r['cg_points']}",
             f"max spread {r['max_spread_kT']:.3f} kT", f"mean spread {r['mean_spread_kT']:.3f} kT",
             f"mean ESS/N {r['mean_ess']:.3f}", f"uncertain {r.get('uncertain_found', 0)}", f"wall {r['wall_s']:.0f} s"]
    if "kld" in r:
        parts.append(f"KLD {r['kld']:.2e}")
    return " | ".join(parts)


def _plot_kld(history, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [r["energy_evaluations"] for r in history if "kld" in r]
    kl = [r["kld"] for r in history if "kld" in r]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.loglog(ev, kl, "o-")
    ax.set_xlabel("energy evaluations")
    ax.set_ylabel("forward KLD to reference")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
