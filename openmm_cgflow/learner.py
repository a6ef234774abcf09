"""Active learning of a PMF: spend all-atom energy evaluations only where the PMF ensemble is uncertain.

One iteration (Schopmans & Friederich, ICML 2024), :meth:`PMFLearner.step`, in named phases:

1. *train*: the conditional flow q(fine | s) by energy at the pending CG points plus a replayed share of the
   earlier ones (so it does not forget), replaying preferentially the points whose labels had a low ESS;
2. *label*: free-energy labels A(s) (kT) at the pending points by importance sampling of the flow; the
   replayed points are relabelled with the flow just trained there (the new label replaces the old);
3. *fit*: the PMF ensemble to all labels so far;
4. *export*: after checking that the labels, the ensemble (at the labels, the CG points and a grid over
   the ranges) and the flow are finite (else FloatingPointError naming the cause, nothing written), the
   iteration's snapshot ``pmfs/pmf_NNN.pt`` (TorchScript);
5. *explore*: CG walkers in OpenMM on the exported PMF from the newest points until they reach points where
   the ensemble spread exceeds the threshold (default 0.2 kT); diverse new centres among those points
   (farthest-point sampling with periodic distance), each broadened into a neighbourhood, are the pending
   points of the next iteration.

The iteration then commits as one set (``checkpoint.pt`` first, naming the hashes of its ``pmf.pt``,
``flow.pt`` and ``iterations.jsonl``, then those files; see :class:`~openmm_cgflow.run_directory.RunDirectory`)
and is reported to the reporters (:mod:`openmm_cgflow.reporting`).

The run stops by itself when the walkers find no point above the threshold within their CG-step budget, or
when the PMF stopped changing (``change_tolerance_kT``; :mod:`openmm_cgflow.convergence`): no ground truth
needed; or on the iteration / energy-evaluation budgets. A run that stops by itself may end with a polish
(``polish_epochs``: the flow trained again where the PMF is populated, those labels drawn again with more
samples) and a final fit (``final_fit_loss``, ``final_fit_steps``), published as the last iteration's PMF. An
iteration that made the flow worse where it had learned is trained again (:mod:`openmm_cgflow.labelling`).
Running again with the same directory resumes after the last committed iteration (a crash inside one is
repaired first), with the same numbers for the same seed and thread count. A learner holds the run directory's
lock from its creation until :meth:`PMFLearner.close`; a second learner on a locked directory is refused.
Torch's thread count is measured per phase (:mod:`openmm_cgflow.threads`) unless ``torch_threads`` or
``OMP_NUM_THREADS`` fixes it.

Units: CG coordinates in radians (dihedrals) or nm (others), free energies and spreads in kT.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import numpy as np
import torch
from openmm_cgflow_plugin.cgspace import wrap_periodic
from tqdm.auto import tqdm

from . import metrics
from .bridge import EnergyBridge
from .cpu_time import CPUMeter
from .executors import BridgeError
from .ensemble import PMFEnsemble, default_ranges, export_pmf
from .ensemble_fit import fit_ensemble
from .convergence import change_says_stop, pmf_change
from .exploration import clip_to_domain, farthest_points, find_uncertain, neighbourhood, populated_starts
from .finite_checks import LABEL_LIMIT_KT, check_ensemble, check_finite_parameters, check_labels, probe_grid
from .flow import flow_for, resolve_device
from .free_energy import free_energy
from .labelling import (DEGRADED_ESS_RATIO, draw_labels, merge_labels, populated_labels, relabel_ess_ratio,
                        replace_labels)
from .model_io import model_bytes, system_from_dict, system_to_dict
from .reporting import ConsoleReporter, PlotReporter
from .run_directory import RunDirectory, json_ready
from .safe_files import to_numpy
from .settings import DTYPES, ENERGY_PLATFORMS, LearnerSettings
from .threads import run_threads, torch_threads, tuner_for
from .training import Trainer

__all__ = ["PMFLearner", "LABEL_LIMIT_KT"]

#: An iteration whose relabelled points' ESS fell below DEGRADED_ESS_RATIO of their earlier labels' (median;
#: :mod:`openmm_cgflow.labelling`) made the flow worse where it had learned: it is trained again from the
#: previous flow at half the learning rate, at most MAX_RETRAINS times; the earlier labels are then kept.
MAX_RETRAINS = 1

#: Learning-rate warm-up of the polish (optimiser steps): it continues a trained flow at a lower learning rate, and
#: has only ~100 steps (the loop's 50-step warm-up left the alanine-dipeptide polish half as effective).
POLISH_WARMUP_STEPS = 20

#: Keys a checkpoint must hold to be resumed.
CHECKPOINT_KEYS = ("system", "settings", "iteration", "points", "label_s", "labels", "pending", "evaluations",
                   "wall_s", "history", "converged", "flow_state", "optimizer_state", "step_count")


class PMFLearner:
    """Active learning of the PMF of ``cgsystem`` into the run directory ``out_dir``.

    Typical use::

        learner = PMFLearner(builtin("alanine-dipeptide"), "runs/ala2")
        learner.run()                     # resumes if runs/ala2 holds a checkpoint
        learner.pmf_path                  # runs/ala2/pmf.pt, for openmm_cgflow_plugin

    Args:
        cgsystem: the molecule (:class:`~openmm_cgflow.systems.CGSystem`).
        out_dir: run directory (created; must be writable). It must be empty, this run's (``run.json`` of the
            same system; resumed from its checkpoint with the same settings), or hold a checkpoint to resume;
            else :class:`~openmm_cgflow.run_directory.RunDirectoryError` says what it holds.
        settings: :class:`~openmm_cgflow.settings.LearnerSettings` (default: ``LearnerSettings.for_system``).
        reference: optional reference for the forward-KLD log (anything
            :func:`openmm_cgflow.metrics.as_reference` takes, e.g. a registered system name).
        progress: progress bars and console lines (the :class:`~openmm_cgflow.reporting.ConsoleReporter`).
        plots: PNG plots per iteration under ``out_dir/plots`` (the :class:`~openmm_cgflow.reporting.PlotReporter`).
        reporters: further reporters, called after the default ones with every iteration record.
        overwrite: delete the run files an ``out_dir`` holds (see
            :meth:`~openmm_cgflow.run_directory.RunDirectory.claim`; other files stay) and start afresh.
    """

    def __init__(self, cgsystem, out_dir, settings: LearnerSettings | None = None, reference=None,
                 progress: bool = True, plots: bool = True, reporters=None, overwrite: bool = False):
        self.cgsystem = cgsystem
        self.settings = settings or LearnerSettings.for_system(cgsystem)
        self.settings.validate(cgsystem)  # every input checked before any work
        self.reference = reference
        self._reference_data = (None if reference is None else
                                metrics.check_reference(reference, cgsystem.cg_periodic, cgsystem.cg_names))
        self.run_directory = RunDirectory(out_dir)
        self.out_dir = self.run_directory.path
        system_name = str(_system_key(system_to_dict(cgsystem)))
        self.run_directory.claim(system_name, overwrite=overwrite)  # the lock, held until close()
        try:
            self._setup(cgsystem, progress, plots, reporters)
            ck = (self.run_directory.load_checkpoint(require=CHECKPOINT_KEYS)
                  if self.run_directory.has_checkpoint() else None)
            if ck is not None:
                self._restore(ck)
            repaired = self.run_directory.reconcile(ck, self._write_flow)
            if repaired:
                self.log(f"{self.out_dir}: repaired after an interrupted iteration: {', '.join(repaired)}")
            self.run_directory.mark(system_name)
        except BaseException:
            self.run_directory.release()
            raise

    def _setup(self, cgsystem, progress, plots, reporters) -> None:
        self.progress = progress
        self.plots = plots
        self.periodic = list(cgsystem.cg_periodic)
        self.log = print if progress else (lambda *a, **k: None)
        # iterations.jsonl is written by the run directory's commit (the JsonlReporter is for other places)
        self.reporters = [PlotReporter(self.run_directory)] if plots else []
        if progress:
            self.reporters.append(ConsoleReporter())
        self.reporters += list(reporters or [])

        st = self.settings
        # Built on the CPU (same initial weights on every device), then moved where it trains.
        self.flow = flow_for(cgsystem, dtype=DTYPES[st.flow_dtype], seed=st.seed, **st.flow_kwargs).to(
            resolve_device(st.device))
        self._bridge = None
        # torch's thread count, measured per phase unless the user fixed it (see openmm_cgflow.threads)
        self._tuners = {"train": tuner_for(st.torch_threads), "label": tuner_for(st.torch_threads)}
        self.trainer = None
        self.ensemble: PMFEnsemble | None = None  # the ensemble of the last fit (pmf.pt holds its export)
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
        self._optimizer_state = None
        self._step_count = 0
        self.lr_scale = 1.0  # halved when an iteration had to be trained again (see DEGRADED_ESS_RATIO)

    # ------------------------------------------------------------------ paths
    @property
    def pmf_path(self) -> str:
        """The latest exported ensemble (TorchScript; see openmm_cgflow_plugin.load_pmf)."""
        return self.run_directory.pmf_path

    @property
    def flow_path(self) -> str:
        """The latest flow with its system (openmm_cgflow.model_io.load_model), for backmapping."""
        return self.run_directory.flow_path

    @property
    def checkpoint_path(self) -> str:
        return self.run_directory.checkpoint_path

    @classmethod
    def from_run(cls, out_dir, progress: bool = True, plots: bool = True, reference=None,
                 reporters=None) -> "PMFLearner":
        """The learner of an existing run directory (system and settings from its checkpoint); refused
        (:class:`~openmm_cgflow.run_directory.RunLockedError`) while a live run holds the directory."""
        ck = RunDirectory(out_dir).load_checkpoint(require=CHECKPOINT_KEYS)
        cgsystem = system_from_dict(ck["system"])
        settings = LearnerSettings(**ck["settings"])
        return cls(cgsystem, out_dir, settings, reference=reference if reference is not None else ck.get("reference"),
                   progress=progress, plots=plots, reporters=reporters)

    # ------------------------------------------------------------------ resources
    @property
    def bridge(self) -> EnergyBridge:
        if self._bridge is None:
            st = self.settings
            self._bridge = EnergyBridge(self.cgsystem.system, self.cgsystem.temperature, n_workers=st.n_workers,
                                        platform=st.energy_platform, properties=ENERGY_PLATFORMS[st.energy_platform],
                                        scheduler=st.scheduler, chunk_timeout=st.chunk_timeout, worker_wait=st.worker_wait)
        return self._bridge

    def close(self) -> None:
        """Stop the energy bridge's worker processes, close the reporters and release the run directory."""
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        for reporter in self.reporters:
            reporter.close()
        self.run_directory.release()

    def _threads(self):
        """The user's fixed torch thread count while this learner works, if any (see :mod:`openmm_cgflow.threads`)."""
        return torch_threads(run_threads(self.settings.torch_threads))

    def _phase_threads(self):
        """Torch threads for the untuned phases (fit, export, walkers): the training tuner's choice so far."""
        tuner = self._tuners["train"]
        return torch_threads(tuner.best if tuner is not None else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            st = self.settings
            self.trainer = Trainer(
                self.flow, self.cgsystem, self.bridge, lr=st.lr, warmup_steps=st.warmup_steps, warmup_each_call=True,
                drop_worst=st.drop_worst, forward_weight=st.forward_weight, samples_per_point=st.samples_per_point,
                points_per_batch=st.points_per_batch, seed=st.seed, progress=self.progress,
                threads=self._tuners["train"],
            )
            if self._optimizer_state is not None:
                self.trainer.optimizer.load_state_dict(self._optimizer_state)
                self.trainer.step_count = self._step_count
                self._optimizer_state = None
        return self.trainer

    # ------------------------------------------------------------------ the loop
    def initial_points(self) -> np.ndarray:
        """The first iteration's CG points: a ball around the start (the reference structure's s)."""
        st = self.settings
        start = np.asarray(st.start if st.start is not None else self.cgsystem.cg_of(self.cgsystem.positions)[0])
        rng = np.random.default_rng([st.seed, 0, 1])
        pts = neighbourhood(start[None], st.initial_points - 1, st.initial_radius, self.periodic, rng, st.domain)
        return np.concatenate([clip_to_domain(wrap_periodic(start[None], self.periodic), self.periodic, st.domain), pts])

    def run(self) -> str:
        """Iterate until the stop rule or a budget ends the run; returns the path of ``pmf.pt``."""
        st = self.settings
        self.run_directory.lock()
        if self.pending is None and self.iteration == 0:
            self.pending = self.initial_points()
        # no total: the run usually stops by itself long before the iteration budget (no ETA from it)
        bar = tqdm(total=None, initial=self.iteration, desc=f"active learning (at most {st.max_iterations} iterations)",
                   unit="iteration", disable=not self.progress)
        try:
            while not self.converged:
                reason = self._budget_reached(self.iteration, self.evaluations)
                if reason:
                    self.stop_reason = reason
                    break
                try:
                    with self._threads():
                        record = self.step(explore=True)
                except BridgeError as exc:
                    done = (f"the checkpoint of iteration {self.iteration - 1} in {self.out_dir} is intact"
                            if self.iteration else "no iteration had finished")
                    raise BridgeError(f"energy evaluation failed in iteration {self.iteration}: {exc}; {done}: "
                                      "run the same command again to resume") from exc
                bar.update(1)
                bar.set_postfix(evals=record["energy_evaluations"], spread=f"{record['max_spread_kT']:.2f}",
                                points=record["cg_points"])
        finally:
            bar.close()
            self.close()
        if self.converged and not self.stop_reason:
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
        self.run_directory.lock()
        s_points = wrap_periodic(np.atleast_2d(np.asarray(s_points, dtype=np.float64)), self.periodic)
        if s_points.shape[1] != self.cgsystem.n_cg:
            raise ValueError(f"s_points has {s_points.shape[1]} columns but the system has {self.cgsystem.n_cg} CG coordinates")
        if self.ensemble is not None or self._has_pmf():
            _, spread = self.mean_and_spread(s_points)
            s_points = s_points[spread > st.threshold_kT]
        if len(s_points) == 0:
            self.log("refine: the ensemble is already certain (spread <= threshold) at all given points")
            return self.pmf_path
        rng = np.random.default_rng([st.seed, self.iteration, 2])
        idx = farthest_points(s_points, max_centres or st.new_centres, self.periodic, rng, existing=self.points)
        self.pending = neighbourhood(s_points[idx], st.points_per_centre, st.radius, self.periodic, rng, st.domain)
        self.converged = False
        try:
            with self._threads():
                self.step(explore=explore)
        finally:
            self.close()
        return self.pmf_path

    def step(self, explore: bool = True) -> dict:
        """One iteration at the pending points; returns its record (also in iterations.jsonl)."""
        st = self.settings
        self.run_directory.lock()
        t0 = time.perf_counter()
        k = self.iteration
        new = np.asarray(self.pending, dtype=np.float64)
        rng = np.random.default_rng([st.seed, k, 0])
        gen = torch.Generator().manual_seed(int(np.random.default_rng([st.seed, k, 3]).integers(2**62)))
        evals0 = self.bridge.n_evaluations

        phase_s = {"train": 0.0, "label": 0.0}
        before = self._flow_state()
        retrained = 0
        while True:
            t = time.perf_counter()
            replay_idx = self._train(new, rng, gen)
            phase_s["train"], t = phase_s["train"] + time.perf_counter() - t, time.perf_counter()
            labels, again = draw_labels(self.flow, self.cgsystem, self.bridge, new, self.label_s[replay_idx],
                                        st.label_samples, gen, threads=self._tuners["label"])
            phase_s["label"] += time.perf_counter() - t
            ratio = relabel_ess_ratio(self.labels["ess"][replay_idx], again)
            if ratio >= DEGRADED_ESS_RATIO or retrained >= MAX_RETRAINS:
                break
            # The flow got worse where it had been trained before: start the iteration again from the
            # previous flow at half the learning rate (kept for the rest of the run).
            self.log(f"iteration {k}: the relabelled points' ESS fell to {ratio:.2f} of their earlier labels' "
                     f"(median); training again from the previous flow at half the learning rate")
            self._restore_flow_state(before)
            self.lr_scale *= 0.5
            retrained += 1
        t = time.perf_counter()
        record = self._add_labels(new, replay_idx, labels, again, keep_old=ratio < DEGRADED_ESS_RATIO)
        record.update(relabel_ess_ratio=ratio, retrained=retrained, lr_scale=self.lr_scale)
        self._check_labels(k)
        phase_s["label"] += time.perf_counter() - t
        with self._phase_threads():
            ensemble = self._fit(rng)
            self._check_ensemble(k, ensemble)
            record.update(self._convergence(ensemble))  # against the current PMF, before it is replaced
            self.ensemble = ensemble
            phase_s["fit"], t = time.perf_counter() - t, time.perf_counter()
            snapshot = self._export(k)
            if explore:
                record.update(self._explore(rng, snapshot))
            else:
                _, spread = self.mean_and_spread(self.label_s)
                record.update(max_spread_kT=float(spread.max()), mean_spread_kT=float(spread.mean()),
                              uncertain_found=0)
                self.pending = None
            phase_s["explore"] = time.perf_counter() - t
        record["phase_s"] = {key: round(val, 3) for key, val in phase_s.items()}
        record["train_cpu_load"] = round(float(self._train_load), 3)  # mean busy cores while the flow trained
        record["torch_threads"] = {phase: (dict(sorted(tuner.choices.items())) if tuner is not None else None)
                                   for phase, tuner in self._tuners.items()}
        self._check_change(record)
        at_budget = self._budget_reached(k + 1, self.evaluations + self.bridge.n_evaluations - evals0)
        if self.converged or (st.polish_at_budget and at_budget):
            record.update(self._finish(k, rng, gen, record["phase_s"]))
        self.evaluations += self.bridge.n_evaluations - evals0
        self.wall_s += time.perf_counter() - t0
        record["energy_evaluations"] = int(self.evaluations)
        record["wall_s"] = round(self.wall_s, 3)
        record["converged"] = bool(self.converged)
        if self._reference_data is not None:
            record["kld"] = float(metrics.kld_from_pmf(lambda p: self.mean_and_spread(p)[0], self._reference_data))
        record = json_ready(record)
        self.history.append(record)
        self.iteration = k + 1
        self.run_directory.commit_iteration(k, self._state(), model_bytes(self.flow, self.cgsystem, iteration=k),
                                            self.history)
        for reporter in self.reporters:
            reporter.report(self, record)
        return record

    # ------------------------------------------------------------------ the phases of a step
    def _train(self, new: np.ndarray, rng: np.random.Generator, gen: torch.Generator) -> np.ndarray:
        """Train the flow by energy at the new points plus replayed earlier ones; returns the replayed indices."""
        st = self.settings
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
        epochs = st.first_epochs if self.iteration == 0 else st.epochs
        executor = getattr(self.bridge, "executor", None)  # local worker processes have pids; a cluster's do not
        with CPUMeter(getattr(executor, "pids", ())) as meter:
            self._trainer().train_by_energy(train_pts, epochs, lr_final=st.lr_final * self.lr_scale,
                                            lr=st.lr * self.lr_scale, generator=gen, energy=self.bridge)
        self._train_load = meter.load
        check_finite_parameters(self.flow)
        return replay_idx

    def _add_labels(self, new: np.ndarray, replay_idx: np.ndarray, labels, again, keep_old: bool = False) -> dict:
        """Store the iteration's labels (:func:`~openmm_cgflow.labelling.merge_labels`); returns the first part
        of the iteration record."""
        k = self.iteration
        self.label_s, n_relabelled, good = merge_labels(self.labels, self.label_s, replay_idx, labels, again, k,
                                                        keep_old=keep_old)
        self.points = np.concatenate([self.points, new])
        if len(self.label_s) < 2:
            raise RuntimeError("fewer than two usable free-energy labels: the flow produced no finite samples")
        n_wrong = int(labels.n_wrong_chirality.sum())
        return {"iteration": k, "cg_points": int(len(self.points)), "labels": int(len(self.label_s)),
                "new_points": int(len(new)), "dropped_labels": int((~good).sum()), "relabelled": n_relabelled,
                "mean_ess": float(np.mean(labels.ess_fraction)),
                "min_ess": float(np.min(labels.ess_fraction)),
                "mean_ess_all_labels": float(np.mean(self.labels["ess"])),
                "wrong_chirality_fraction": n_wrong / float(labels.n_samples * len(new))}

    def _flow_state(self) -> dict:
        """Copies of the flow's and the optimiser's state (to start an iteration again)."""
        trainer = self._trainer()
        return {"flow": {k: v.detach().clone() for k, v in self.flow.state_dict().items()},
                "optimizer": copy.deepcopy(trainer.optimizer.state_dict()), "step_count": trainer.step_count}

    def _restore_flow_state(self, state: dict) -> None:
        self.flow.load_state_dict(state["flow"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.step_count = state["step_count"]

    def _fit(self, rng: np.random.Generator, loss: str | None = None, steps: int | None = None) -> PMFEnsemble:
        """The PMF ensemble fitted to all labels so far (with ``loss`` and ``steps``, default the settings
        ``fit_loss`` and ``fit_steps``)."""
        return fit_ensemble(self.label_s, self.labels["A"], self.labels["stderr"], self.periodic,
                            n_models=self.settings.n_models, steps=steps or self.settings.fit_steps,
                            hidden=tuple(self.settings.ensemble_hidden), loss=loss or self.settings.fit_loss,
                            seed=int(rng.integers(2**31)))

    def _budget_reached(self, iterations: int, evaluations: int) -> str | None:
        """Why a run with ``iterations`` finished iterations and ``evaluations`` energy evaluations must stop
        (its iteration or energy-evaluation budget), or None."""
        st = self.settings
        if iterations >= st.max_iterations:
            return f"iteration budget ({st.max_iterations}) reached"
        if st.max_evaluations is not None and evaluations >= st.max_evaluations:
            return f"energy-evaluation budget ({st.max_evaluations}) reached"
        return None

    def _finish(self, k: int, rng: np.random.Generator, gen: torch.Generator, phase_s: dict) -> dict:
        """When the run has just stopped by itself (or, with ``polish_at_budget``, reaches a budget): the polish
        (if ``polish_epochs``), then a final fit with
        ``final_fit_loss`` and ``final_fit_steps`` (else ``fit_loss`` and ``fit_steps``) when the labels were
        polished or these differ from the loop's, exported as this iteration's snapshot. Returns the record's
        fields; adds the phases' seconds to ``phase_s``."""
        st = self.settings
        out = {}
        if st.polish_epochs:
            t = time.perf_counter()
            out.update(self._polish(k, gen))
            phase_s["polish"] = round(time.perf_counter() - t, 3)
        loss = st.final_fit_loss or st.fit_loss
        steps = st.final_fit_steps or st.fit_steps
        if out.get("polished_labels") or loss != st.fit_loss or steps != st.fit_steps:
            t = time.perf_counter()
            with self._phase_threads():
                ensemble = self._fit(rng, loss=loss, steps=steps)
                self._check_ensemble(k, ensemble)
                self.ensemble = ensemble
                self._export(k)
            out["final_fit_loss"] = loss
            phase_s["final_fit"] = round(time.perf_counter() - t, 3)
        return out

    def _polish(self, k: int, gen: torch.Generator) -> dict:
        """Train the flow at the populated labelled points (:func:`~openmm_cgflow.labelling.populated_labels`)
        and label them again with ``polish_samples`` samples; returns the record's fields. When the new labels'
        ESS is lower than the earlier ones' (median ratio < 1), the earlier flow and labels are kept."""
        st = self.settings
        idx = populated_labels(self.mean_and_spread(self.label_s)[0], st.polish_window_kT, st.polish_max_points)
        points, old_ess = self.label_s[idx], self.labels["ess"][idx]
        out = {"polish_points": int(len(idx))}
        before = self._flow_state()
        self._trainer().train_by_energy(points, st.polish_epochs, lr=st.polish_lr, lr_final=st.lr_final,
                                        generator=gen, energy=self.bridge, warmup_steps=POLISH_WARMUP_STEPS)
        try:
            check_finite_parameters(self.flow)
        except FloatingPointError as exc:
            self.log(f"polish: {exc}; kept the earlier flow and labels")
            self._restore_flow_state(before)
            return dict(out, polish_ess_ratio=0.0, polished_labels=0)
        again = free_energy(self.flow, self.cgsystem, self.bridge, points, st.polish_samples, generator=gen,
                            threads=self._tuners["label"])
        ratio = relabel_ess_ratio(old_ess, again)
        out.update(polish_ess_ratio=ratio, polish_ess_before=float(np.mean(old_ess)),
                   polish_ess_after=float(np.mean(np.nan_to_num(again.ess_fraction, nan=0.0))))
        if ratio < 1.0:
            # The polish made the flow worse where it was meant to improve it: keep the earlier flow and labels.
            self.log(f"polish: the labels' ESS fell to {ratio:.2f} of the earlier ones' (median); kept the earlier "
                     "flow and labels")
            self._restore_flow_state(before)
            return dict(out, polished_labels=0)
        n = replace_labels(self.labels, idx, again, k)
        self._check_labels(k)
        return dict(out, polished_labels=n)

    def _export(self, k: int) -> str:
        """The snapshot pmfs/pmf_NNN.pt of the ensemble (published as pmf.pt when the iteration commits);
        returns its path."""
        path = self.run_directory.snapshot_path(k)
        export_pmf(self.ensemble, path, self.cgsystem.cgspace, ranges=self._ranges(), iteration=k)
        return path

    def _write_flow(self) -> None:
        """flow.pt of the restored flow (repairing a run directory after a crash)."""
        k = self.iteration - 1
        self.run_directory.save_flow(self.flow, self.cgsystem, iteration=k)

    def _check_labels(self, k: int) -> None:
        check_labels(self.labels["A"], self.label_s, k, self._intact(k))

    def _check_ensemble(self, k: int, ensemble: PMFEnsemble) -> None:
        """The ensemble finite at the labels, the CG points and a grid over its ranges (the flow's parameters
        were checked right after training)."""
        probes = [self.label_s, self.points, probe_grid(self._ranges() or default_ranges(ensemble))]
        check_ensemble(ensemble, probes, self.cgsystem.n_cg, k, self._intact(k))

    def _intact(self, k: int) -> str:
        return (f"the files of iteration {k - 1} in {self.out_dir} are intact" if k
                else "no iteration had finished")

    def _ranges(self):
        """(lo, hi) per CG coordinate for pmf.pt: [-pi, pi] if periodic, else the settings' domain (or, with
        no domain, the labels' mean +- 3 std: the export's default)."""
        if self.settings.domain is None:
            return None
        domain = iter(self.settings.domain)
        return [(-np.pi, np.pi) if per else tuple(next(domain)) for per in self.periodic]

    def _explore(self, rng: np.random.Generator, pmf_path: str) -> dict:
        """CG walkers on ``pmf_path`` (this iteration's ensemble) from the newest points, or with ``walker_starts =
        "populated"`` from labelled points drawn by exp(-A); sets the next pending points (or converged); returns
        the record's exploration fields."""
        st = self.settings
        if st.walker_starts == "populated":
            starts = populated_starts(self.label_s, self.mean_and_spread(self.label_s)[0], st.n_walkers, rng)
        else:
            starts = self.points[-len(self.pending):] if self.pending is not None else self.points
        found, stats = find_uncertain(pmf_path, starts, st, self.cgsystem.temperature, self.periodic, rng)
        if len(found) == 0:
            self.converged = True
            self.pending = None
        else:
            idx = farthest_points(found, st.new_centres, self.periodic, rng, existing=self.points)
            stats["new_centres"] = found[idx].tolist()
            self.pending = neighbourhood(found[idx], st.points_per_centre, st.radius, self.periodic, rng, st.domain)
        return stats

    def _check_change(self, record: dict) -> None:
        """The second stop rule (:func:`~openmm_cgflow.convergence.change_says_stop`)."""
        st = self.settings
        if self.converged or self.pending is None:
            return
        changes = [r.get("pmf_change_kT") for r in self.history] + [record.get("pmf_change_kT")]
        if change_says_stop(changes, st.change_tolerance_kT, st.change_patience):
            self.converged = True
            self.pending = None
            self.stop_reason = (f"the PMF changed by less than {st.change_tolerance_kT:g} kT in "
                                f"{st.change_patience} iteration(s) in a row")

    def _convergence(self, ensemble: PMFEnsemble) -> dict:
        """``pmf_change_kT`` of the new ``ensemble`` against the current PMF (:meth:`mean_and_spread`: the one in
        memory, or pmf.pt after a resume; None in the first iteration), on a grid of the CG ranges for d <= 3,
        else at the labelled points (:mod:`openmm_cgflow.convergence`)."""
        if self.ensemble is None and not self._has_pmf():
            return {"pmf_change_kT": None}
        probes = np.asarray(probe_grid(self._ranges() or default_ranges(ensemble)) if self.cgsystem.n_cg <= 3
                            else self.label_s, dtype=np.float64)
        with torch.no_grad():
            now = ensemble.mean_and_spread(torch.as_tensor(probes))[0].numpy()
        return {"pmf_change_kT": pmf_change(now, self.mean_and_spread(probes)[0])}

    # ------------------------------------------------------------------ the ensemble
    def _has_pmf(self) -> bool:
        return os.path.exists(self.pmf_path)

    def mean_and_spread(self, s: np.ndarray):
        """Mean and spread (kT) [N] of the current ensemble at s [N, d] (the fitted one in memory, or pmf.pt
        after a resume)."""
        s = np.asarray(s, dtype=np.float64)
        if self.ensemble is None:
            from openmm_cgflow_plugin import load_pmf

            mean, spread = load_pmf(self.pmf_path).mean_and_spread(s)
            return np.asarray(mean), np.asarray(spread)
        with torch.no_grad():
            mean, spread = self.ensemble.mean_and_spread(torch.as_tensor(s))
        return mean.numpy(), spread.numpy()

    # ------------------------------------------------------------------ checkpoint
    def _state(self) -> dict:
        trainer = self.trainer
        return {
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
            "flow_state": {k: v.detach().cpu().clone() for k, v in self.flow.state_dict().items()},
            "optimizer_state": None if trainer is None else trainer.optimizer.state_dict(),
            "step_count": 0 if trainer is None else trainer.step_count,
            "lr_scale": self.lr_scale,
        }

    def _restore(self, ck: dict) -> None:
        mine = dataclasses.asdict(self.settings)
        theirs = ck["settings"]
        differ = [k for k in mine if k in theirs and _differs(mine[k], theirs[k])
                  and k not in LearnerSettings.RESOURCE_FIELDS]
        if differ:
            raise ValueError(
                f"{self.out_dir} holds a run with different settings ({', '.join(differ)}); resume it with the same "
                "settings or choose another output directory")
        if _system_key(ck["system"]) != _system_key(system_to_dict(self.cgsystem)):
            raise ValueError(f"{self.out_dir} holds a run of another system")
        bad = [k for k, v in ck["flow_state"].items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"checkpoint {self.checkpoint_path} holds non-finite flow parameters ({bad[0]}, ...): "
                             "the file is corrupt; restore a good copy or start afresh with overwrite=True")
        self.iteration = int(ck["iteration"])
        self.points = to_numpy(ck["points"])
        self.label_s = to_numpy(ck["label_s"])
        self.labels = {key: to_numpy(val) for key, val in ck["labels"].items()}
        self.pending = to_numpy(ck["pending"])
        self.evaluations = int(ck["evaluations"])
        self.wall_s = float(ck["wall_s"])
        self.history = list(ck["history"])
        self.converged = bool(ck["converged"])
        self.flow.load_state_dict(ck["flow_state"])
        self._optimizer_state = ck["optimizer_state"]
        self._step_count = ck["step_count"]
        self.lr_scale = float(ck.get("lr_scale", 1.0))
        self.log(f"resuming {self.out_dir} after iteration {self.iteration - 1} "
                 f"({self.evaluations} energy evaluations so far)")


def _system_key(d: dict):
    return d.get("name", d.get("builtin"))


def _differs(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str)
