"""Settings of an active-learning run: :class:`LearnerSettings` and their validation.

Per-system defaults are not written here: they come from the system's registry entry
(:mod:`openmm_cgflow.registry`), through :meth:`LearnerSettings.for_system`.
Units: CG coordinates in radians (dihedrals) or nm (others), energies and spreads in kT, times in ps.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from . import registry
from .ensemble_fit import LOSSES
from .exploration import WALKER_STARTS

__all__ = ["LearnerSettings", "DTYPES", "ENERGY_PLATFORMS", "SettingsError", "did_you_mean", "estimate_memory", "check_memory",
           "physical_memory_bytes"]

#: OpenMM platforms for the energy evaluations, with the properties each worker's Context gets (one thread:
#: the workers are one process per core).
ENERGY_PLATFORMS = {"Reference": None, "CPU": {"Threads": "1"}}
#: Flow parameter dtypes by name.
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Fraction of the physical memory a run's estimated allocations may take (see :func:`check_memory`).
MEMORY_FRACTION = 0.5


class SettingsError(ValueError):
    """A setting of the wrong type or out of range (a ValueError, so callers catching ValueError see it)."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# (field, kind, lower bound): kind "int" (an integer, >= low), "pos" (a finite number > 0), "nonneg" (finite >= 0),
# "bool" (true or false); a trailing "?" allows None.
_FIELD_RULES = (
    ("threshold_kT", "pos", None), ("n_walkers", "int", 1), ("walker_steps", "int", 1),
    ("walker_timestep_ps", "pos?", None), ("walker_temperature_factor", "pos", None), ("report_interval", "int", 1),
    ("new_centres", "int", 1), ("points_per_centre", "int", 1), ("radius", "pos", None),
    ("initial_points", "int", 1), ("initial_radius", "pos", None), ("first_epochs", "int", 0), ("epochs", "int", 0),
    ("samples_per_point", "int", 1), ("points_per_batch", "int", 1), ("lr", "pos", None), ("lr_final", "pos", None),
    ("warmup_steps", "int", 0), ("forward_weight", "nonneg", None), ("drop_worst", "int", 0),
    ("replay_fraction", "nonneg", None), ("label_samples", "int", 1), ("n_models", "int", 1), ("fit_steps", "int", 1),
    ("max_iterations", "int", 1), ("max_evaluations", "int?", 1), ("n_workers", "int?", 0),
    ("chunk_timeout", "pos?", None), ("worker_wait", "pos", None), ("seed", "int", 0),
    ("torch_threads", "int?", 1), ("change_tolerance_kT", "pos?", None), ("change_patience", "int", 1),
    ("polish_epochs", "int", 0), ("polish_window_kT", "pos", None), ("polish_max_points", "int", 1),
    ("polish_samples", "int", 1), ("polish_lr", "pos", None), ("polish_at_budget", "bool", None),
    ("final_fit_steps", "int?", 1),
)


def _check_field(name: str, value, kind: str, low) -> None:
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    got = f"got {value!r} ({type(value).__name__})"
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise SettingsError(f"setting {name} must be true or false, {got}")
        return
    if kind == "int":
        if not _is_int(value):
            raise SettingsError(f"setting {name} must be an integer (int) >= {low}, {got}")
        if value < low:
            raise SettingsError(f"setting {name} must be an integer >= {low}, got {value}")
        return
    if not _is_real(value):
        raise SettingsError(f"setting {name} must be a number (float), {got}")
    if not math.isfinite(value) or (value <= 0 if kind == "pos" else value < 0):
        raise SettingsError(f"setting {name} must be a finite number {'> 0' if kind == 'pos' else '>= 0'}, got {value}")


def physical_memory_bytes() -> int | None:
    """This machine's physical memory in bytes (``os.sysconf``), or None where it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(settings: "LearnerSettings", n_cg: int, n_atoms: int | None = None) -> dict:
    """Rough bytes of the largest allocations of one iteration, by what drives them (a lower bound, to catch
    settings that cannot fit, such as ``n_walkers = 10**9``; not a prediction of the peak).

    * ``walkers``: ``n_walkers`` CG walkers: OpenMM state, the ensemble's activations and gradients
      (``n_models`` networks of width 2 x 64, float64) and ten frames of CG coordinates and spreads;
    * ``labels``: ``label_samples`` log weights (float64) per labelled point, for the pending points plus the
      replayed ones;
    * ``training``: ``points_per_batch * samples_per_point`` flow samples per step, each with the flow's
      activations and gradients (taken as 400 float64 values per Cartesian coordinate of ``n_atoms`` atoms);
    * ``points``: the initial ball and each iteration's neighbourhoods ([N, n_cg] float64).
    """
    st = settings
    per_walker = 8 * (4 * st.n_models * 128 + 10 * (n_cg + 1) + 3 * 9) + 256
    pending = max(st.initial_points, st.new_centres * st.points_per_centre)
    labelled = pending * (1.0 + st.replay_fraction)
    per_sample = 8 * 3 * (n_atoms or 1) * 400
    return {
        "walkers": float(st.n_walkers) * per_walker,
        "labels": labelled * float(st.label_samples) * 8 * 2,
        "training": float(st.points_per_batch) * float(st.samples_per_point) * per_sample,
        "points": float(pending) * n_cg * 8 * 4,
    }


def check_memory(settings: "LearnerSettings", n_cg: int, n_atoms: int | None = None,
                 available: int | None = None) -> None:
    """SettingsError when :func:`estimate_memory` exceeds ``MEMORY_FRACTION`` (half) of ``available`` bytes
    (default: :func:`physical_memory_bytes`; no check where that is unknown)."""
    available = physical_memory_bytes() if available is None else int(available)
    if not available:
        return
    parts = estimate_memory(settings, n_cg, n_atoms)
    total = sum(parts.values())
    if total > MEMORY_FRACTION * available:
        drivers = {"walkers": "n_walkers", "labels": "label_samples x points (initial_points, new_centres x "
                   "points_per_centre)", "training": "points_per_batch x samples_per_point",
                   "points": "initial_points, new_centres x points_per_centre"}
        worst = max(parts, key=parts.get)
        raise SettingsError(
            f"these settings need an estimated {total / 2**30:.3g} GiB of memory, more than "
            f"{MEMORY_FRACTION:.0%} of this machine's {available / 2**30:.3g} GiB; the largest part is {worst} "
            f"({parts[worst] / 2**30:.3g} GiB, from {drivers[worst]}): lower "
            f"{drivers[worst].split(' x ')[0].split(' (')[0]}")


@dataclass
class LearnerSettings:
    """Settings of an active-learning run (CG units: radians for dihedrals, nm otherwise; energies kT).

    Exploration: ``threshold_kT`` spread that marks a CG point as uncertain; ``n_walkers`` CG walkers per
    iteration, each given at most ``walker_steps`` Langevin steps (timestep ``walker_timestep_ps``),
    checked every ``report_interval`` steps, at ``walker_temperature_factor`` times the system temperature
    (they sample exp(-A / factor): a flattened PMF, so they reach the uncertain frontier sooner);
    ``walker_starts``: where the walkers start, "newest" (default: the points labelled last, so the search
    moves on from the frontier it reached) or "populated" (labelled points drawn with probability
    exp(-A) of the current PMF, so the search stays where the population is; see
    :func:`~openmm_cgflow.exploration.populated_starts`);
    ``new_centres`` diverse uncertain points per iteration, each broadened to ``points_per_centre`` points
    uniform in a ball of ``radius``; ``domain`` (lo, hi) per non-periodic CG dim, outside of which nothing is
    explored.
    Start: ``initial_points`` in a ball of ``initial_radius`` around ``start`` (default: the CG
    coordinates of the system's reference structure).
    Flow: ``flow_kwargs`` for :func:`~openmm_cgflow.flow.flow_for`, parameters in ``flow_dtype``
    ("float32": 1.6x the training throughput of "float64" for alanine dipeptide, see benchmarks/RESULTS.md;
    energies, Jacobians and labels are float64 either way); trained for ``first_epochs`` then
    ``epochs`` per iteration at the pending points plus ``replay_fraction`` of the earlier ones, with
    ``samples_per_point`` samples per point per epoch, ``points_per_batch`` points per step, learning rate
    ``lr`` decaying to ``lr_final`` within each iteration, ``forward_weight`` (see the Trainer).
    Labels: ``label_samples`` flow samples per new point. Ensemble: ``n_models`` networks, fitted in
    ``fit_steps`` Adam steps, each network with hidden layers of the widths ``ensemble_hidden``, with the loss
    ``fit_loss`` in every iteration and ``final_fit_loss`` for the PMF a run ends with when it stops by itself
    (:class:`~openmm_cgflow.ensemble_fit.EnsembleFitSettings`). "exp" fits the labels as the
    importance-sampling estimates they are, averaging in exp(-A), where they are unbiased; "squared" averages
    -log of the estimates, biased upward where the flow's ESS is low, but extrapolates more tamely beyond the
    labels, which is what the walkers explore during the run (with "exp" in the loop, alanine dipeptide's first
    iterations sent the walkers to regions 30-160 kT off; benchmarks/RESULTS.md). None (default): no final
    refit. ``final_fit_steps``: the Adam steps of that final fit (None: ``fit_steps``).
    Polish: when a run stops by itself and ``polish_epochs`` > 0, the flow is trained ``polish_epochs`` more
    epochs (peak learning rate ``polish_lr``, decaying to ``lr_final``) at the labelled points where the fitted
    PMF lies within ``polish_window_kT`` of its minimum (at most ``polish_max_points``, the lowest), those
    points are labelled again with ``polish_samples`` samples each (the new label replaces the old), and the
    ensemble is refitted. The populated region is where the PMF's errors weigh most and where the labels' ESS
    is lowest (the flow's ESS falls where the molecule's fine coordinates are most varied); cost
    ``n x (polish_epochs x samples_per_point + polish_samples)`` evaluations for n points. 0 (default): no
    polish; alanine dipeptide's registry turns it on (benchmarks/RESULTS.md). ``polish_at_budget``: polish (and
    final fit) also in the iteration that exhausts ``max_iterations`` or ``max_evaluations``, for systems whose
    runs end at a budget (the tetrapeptide's registry); False (default) leaves such a run as it is, so that
    resuming it with a larger budget continues exactly where an uninterrupted run would be.
    Budgets: ``max_iterations``, ``max_evaluations`` (energy evaluations sent to OpenMM; None: no limit).
    Energies: ``n_workers`` local OpenMM worker processes (default one per core), or ``scheduler``, the
    address of a Dask scheduler (e.g. ``"tcp://host:8786"``) whose workers evaluate the energies, with
    ``chunk_timeout`` seconds after which a chunk is resubmitted elsewhere (None: no limit) and
    ``worker_wait`` seconds to wait for a worker before the run stops with an error; ``energy_platform``, the
    OpenMM platform of the energy evaluations ("Reference", the fastest for small implicit-solvent molecules,
    or "CPU", one thread per worker, faster for costly custom forces such as a CustomGBForce).
    Stop rule: the run stops by itself when the walkers find no point above ``threshold_kT``, or, with
    ``change_tolerance_kT``, when the PMF changed by less than that (``pmf_change_kT`` of iterations.jsonl:
    the exp(-A)-weighted RMS change since the previous iteration, kT) in ``change_patience`` iterations in a
    row.
    ``seed`` makes a run repeatable (same seed, same numbers, interrupted or not, for a fixed thread count:
    ``torch_threads`` or ``OMP_NUM_THREADS``; the measured choice below may round differently).
    ``torch_threads``: torch intra-op threads while a run trains, labels and fits; None: chosen by
    measurement per phase between 1 and the usable cores (:class:`openmm_cgflow.threads.ThreadTuner`; the
    flow and the energy workers take turns, so the flow may use every core when the machine is otherwise
    idle), unless ``OMP_NUM_THREADS`` is set. ``device``: where the flow trains, samples labels
    and is stored in memory ("cpu", the default, or "cuda"/"cuda:N"; energies stay on the CPU workers).
    """

    threshold_kT: float = 0.2
    n_walkers: int = 100
    walker_steps: int = 20_000
    walker_timestep_ps: float | None = None
    walker_temperature_factor: float = 2.0
    walker_starts: str = "newest"
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
    fit_steps: int = 3000
    ensemble_hidden: list = field(default_factory=lambda: [64, 64])
    fit_loss: str = "squared"
    final_fit_loss: str | None = None
    final_fit_steps: int | None = None
    polish_epochs: int = 0
    polish_window_kT: float = 6.0
    polish_max_points: int = 400
    polish_samples: int = 384
    polish_lr: float = 3e-4
    polish_at_budget: bool = False
    max_iterations: int = 20
    max_evaluations: int | None = None
    n_workers: int | None = None
    scheduler: str | None = None
    chunk_timeout: float | None = None
    worker_wait: float = 60.0
    seed: int = 0
    torch_threads: int | None = None
    device: str | None = None
    change_tolerance_kT: float | None = None
    change_patience: int = 2
    energy_platform: str = "Reference"

    #: Settings that say where the work runs, not what is computed: they may change on resume.
    RESOURCE_FIELDS = ("max_iterations", "max_evaluations", "n_workers", "scheduler", "chunk_timeout", "worker_wait",
                       "torch_threads", "device", "energy_platform")

    @classmethod
    def for_system(cls, cgsystem, **overrides) -> "LearnerSettings":
        """Defaults for ``cgsystem``: the class defaults, updated by the settings its registry entry carries
        (a system built by :func:`openmm_cgflow.registry.builtin`; none for others), then by ``overrides``."""
        item = registry.entry_for(cgsystem)
        base = dict(item.settings) if item is not None else {}
        base.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(base) - names)
        if unknown:
            raise SettingsError(f"unknown setting(s) {unknown}{did_you_mean(unknown[0], names)}")
        return cls(**base)

    def validate(self, system_or_n_cg, periodic=None, n_atoms: int | None = None) -> None:
        """Check every setting before any work; raise :class:`SettingsError` (a ValueError) naming the first bad one.

        ``system_or_n_cg``: the :class:`~openmm_cgflow.systems.CGSystem` the run is for (its number of CG
        coordinates, which of them are periodic and its number of atoms are read from it), or just the number
        of CG coordinates (then ``periodic`` [d] bools and ``n_atoms`` may be given; without ``periodic`` the
        domain is checked only for its form). Checked: the type of every field (``threshold_kT = "0.2"`` is
        refused, not coerced; integers where counts are meant), ranges, ``domain`` (one (lo, hi) pair with
        lo < hi per non-periodic CG coordinate), ``start`` (finite, one value per CG coordinate, inside the
        domain; periodic values in radians, see :func:`openmm_cgflow.cg_input.check_cg_values`),
        ``flow_kwargs`` (arguments of :class:`~openmm_cgflow.flow.ConditionalFlow`), and the memory the run's
        largest allocations will need (:func:`estimate_memory`) against half of this machine's physical memory.
        """
        if isinstance(system_or_n_cg, (int, np.integer)) and not isinstance(system_or_n_cg, bool):
            n_cg, names = int(system_or_n_cg), None
        else:
            names = list(system_or_n_cg.cg_names)
            n_cg = int(system_or_n_cg.n_cg)
            periodic = list(system_or_n_cg.cg_periodic) if periodic is None else periodic
            n_atoms = int(system_or_n_cg.n_atoms) if n_atoms is None else n_atoms
        for name, kind, low in _FIELD_RULES:
            _check_field(name, getattr(self, name), kind, low)
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise SettingsError(f"setting replay_fraction must be in [0, 1], got {self.replay_fraction!r}")
        if self.device is not None:
            if not isinstance(self.device, str):
                raise SettingsError(f"setting device must be a device name such as 'cpu' or 'cuda', got {self.device!r}")
            from .flow import resolve_device

            try:
                resolve_device(self.device)
            except ValueError as exc:
                raise SettingsError(f"setting device: {exc}") from None
        if self.energy_platform not in ENERGY_PLATFORMS:
            raise SettingsError(f"setting energy_platform must be one of {list(ENERGY_PLATFORMS)}, got "
                                f"{self.energy_platform!r}{did_you_mean(self.energy_platform, ENERGY_PLATFORMS)}")
        if self.walker_starts not in WALKER_STARTS:
            raise SettingsError(f"setting walker_starts must be one of {list(WALKER_STARTS)}, got "
                                f"{self.walker_starts!r}{did_you_mean(self.walker_starts, WALKER_STARTS)}")
        if self.flow_dtype not in DTYPES:
            raise SettingsError(f"setting flow_dtype must be one of {sorted(DTYPES)}, got {self.flow_dtype!r}")
        for name in ("fit_loss", "final_fit_loss"):
            value = getattr(self, name)
            if value not in LOSSES and not (name == "final_fit_loss" and value is None):
                raise SettingsError(f"setting {name} must be one of {list(LOSSES)}, got {value!r}"
                                    f"{did_you_mean(value, LOSSES)}")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise SettingsError("setting scheduler must be a Dask scheduler address such as 'tcp://host:8786', "
                                f"got {self.scheduler!r}")
        if (not isinstance(self.ensemble_hidden, (list, tuple)) or not self.ensemble_hidden
                or not all(_is_int(h) and h >= 1 for h in self.ensemble_hidden)):
            raise SettingsError("setting ensemble_hidden must be a list of layer widths (integers >= 1), e.g. [64, 64]; "
                                f"got {self.ensemble_hidden!r}")
        self._validate_flow_kwargs()
        domain = self._validate_domain(n_cg, periodic)
        self._validate_start(n_cg, periodic, domain, names)
        check_memory(self, n_cg, n_atoms)

    def _validate_flow_kwargs(self) -> None:
        if not isinstance(self.flow_kwargs, dict):
            raise SettingsError(f"setting flow_kwargs must be a table/dict of ConditionalFlow arguments, "
                                f"got {type(self.flow_kwargs).__name__}")
        import inspect

        from .flow import ConditionalFlow

        known = set(inspect.signature(ConditionalFlow.__init__).parameters) - {"self", "n_fine", "circular", "n_cg",
                                                                              "cg_periodic", "dtype", "seed"}
        unknown = sorted(set(self.flow_kwargs) - known)
        if unknown:
            raise SettingsError(f"unknown flow_kwargs {unknown}{did_you_mean(unknown[0], known)}; "
                                f"known: {sorted(known)}")

    def _validate_domain(self, n_cg: int, periodic):
        """The domain as a list of (lo, hi) float pairs (or None), checked."""
        if self.domain is None:
            return None
        pairs = self.domain
        if not isinstance(pairs, (list, tuple)) or not all(
                isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_real(v) for v in r) for r in pairs):
            raise SettingsError("setting domain must be a list of (lo, hi) pairs of numbers, one per non-periodic CG "
                                f"coordinate, e.g. [[-2.5, 1.1]]; got {self.domain!r}")
        pairs = [(float(lo), float(hi)) for lo, hi in pairs]
        for lo, hi in pairs:
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise SettingsError(f"setting domain must be finite, got {self.domain!r}")
            if not lo < hi:
                raise SettingsError(f"setting domain must be one (lo, hi) with lo < hi per non-periodic CG coordinate; "
                                    f"got ({lo:g}, {hi:g}) in {self.domain!r} (inverted or empty)")
        if periodic is not None:
            n_free = sum(1 for p in periodic if not p)
            if len(pairs) != n_free:
                raise SettingsError(f"setting domain has {len(pairs)} (lo, hi) pair(s) but the system has {n_free} "
                                    f"non-periodic CG coordinate(s) (periodic ones need none)")
        return pairs

    def _validate_start(self, n_cg: int, periodic, domain, names=None) -> None:
        if self.start is None:
            return
        if not isinstance(self.start, (list, tuple, np.ndarray)) or not all(_is_real(v) for v in self.start):
            raise SettingsError(f"setting start must be a list of {n_cg} number(s) (one per CG coordinate), "
                                f"got {self.start!r}")
        if len(self.start) != n_cg:
            raise SettingsError(f"setting start has {len(self.start)} entries but the system has {n_cg} CG coordinates")
        start = np.asarray(self.start, dtype=np.float64)
        if not np.all(np.isfinite(start)):
            raise SettingsError(f"setting start must be finite, got {self.start!r}")
        if periodic is not None:
            from .cg_input import check_cg_values

            try:
                check_cg_values(start[None], periodic, domain=domain, names=names, what="setting start")
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
