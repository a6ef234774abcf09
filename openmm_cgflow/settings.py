"""Settings of an active-learning run: :class:`LearnerSettings` and their validation.

Per-system defaults are not written here: they come from the system's registry entry
(:mod:`openmm_cgflow.registry`), through :meth:`LearnerSettings.for_system`.
Units: CG coordinates in radians (dihedrals) or nm (others), energies and spreads in kT, times in ps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from . import registry

__all__ = ["LearnerSettings", "DTYPES"]

#: Flow parameter dtypes by name.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class LearnerSettings:
    """Settings of an active-learning run (CG units: radians for dihedrals, nm otherwise; energies kT).

    Exploration: ``threshold_kT`` spread that marks a CG point as uncertain; ``n_walkers`` CG walkers per
    iteration, each given at most ``walker_steps`` Langevin steps (timestep ``walker_timestep_ps``),
    checked every ``report_interval`` steps, at ``walker_temperature_factor`` times the system temperature
    (they sample exp(-A / factor): a flattened PMF, so they reach the uncertain frontier sooner);
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
    Labels: ``label_samples`` flow samples per new point. Ensemble: ``n_models`` networks.
    Budgets: ``max_iterations``, ``max_evaluations`` (energy evaluations sent to OpenMM; None: no limit).
    Energies: ``n_workers`` local OpenMM worker processes (default one per core), or ``scheduler``, the
    address of a Dask scheduler (e.g. ``"tcp://host:8786"``) whose workers evaluate the energies, with
    ``chunk_timeout`` seconds after which a chunk is resubmitted elsewhere (None: no limit) and
    ``worker_wait`` seconds to wait for a worker before the run stops with an error.
    ``seed`` makes a run repeatable (same seed, same numbers, interrupted or not).
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
    scheduler: str | None = None
    chunk_timeout: float | None = None
    worker_wait: float = 60.0
    seed: int = 0

    #: Settings that say where energies are computed, not what is computed: they may change on resume.
    RESOURCE_FIELDS = ("max_iterations", "max_evaluations", "n_workers", "scheduler", "chunk_timeout", "worker_wait")

    @classmethod
    def for_system(cls, cgsystem, **overrides) -> "LearnerSettings":
        """Defaults for ``cgsystem``: the class defaults, updated by the settings its registry entry carries
        (a system built by :func:`openmm_cgflow.registry.builtin`; none for others), then by ``overrides``."""
        item = registry.entry_for(cgsystem)
        base = dict(item.settings) if item is not None else {}
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
        if self.flow_dtype not in DTYPES:
            raise ValueError(f"flow_dtype must be one of {sorted(DTYPES)}, got {self.flow_dtype!r}")
        if self.radius <= 0 or self.initial_radius <= 0:
            raise ValueError("radius and initial_radius must be > 0")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1], got {self.replay_fraction}")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise ValueError(f"scheduler must be a Dask scheduler address such as 'tcp://host:8786', got {self.scheduler!r}")
        if self.chunk_timeout is not None and not self.chunk_timeout > 0:
            raise ValueError(f"chunk_timeout must be > 0 seconds or None, got {self.chunk_timeout}")
        if not self.worker_wait > 0:
            raise ValueError(f"worker_wait must be > 0 seconds, got {self.worker_wait}")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            raise ValueError(f"max_evaluations must be >= 1 or None, got {self.max_evaluations}")
        if self.domain is not None and any(len(r) != 2 or not r[0] < r[1] for r in self.domain):
            raise ValueError(f"domain must be one (lo, hi) with lo < hi per non-periodic CG coordinate, got {self.domain}")
        if self.start is not None and len(self.start) != n_cg:
            raise ValueError(f"start has {len(self.start)} entries but the system has {n_cg} CG coordinates")
