"""CG dynamics on a learned PMF: many independent walkers in one OpenMM Context, and their reporter.

Each walker is P = ceil(d / 3) particles whose x, y, z hold its d CG coordinates s in order (radians for
dihedrals, read as nm; nm for Mueller-Brown's s = x - y; one particle for d <= 3), the remaining 3 P - d
coordinates feel no force (see :func:`~openmm_cgflow_plugin.forces.walker_positions`). Dihedral CG
spaces live in a periodic cubic box of side 2 pi; the walkers move under ``-kT grad A_mean(s)`` with
OpenMM's ``LangevinMiddleIntegrator`` at the PMF's temperature.

Default dynamics (chosen for PMFs with barriers of ~10 kT and curvatures up to ~10^3 kT/rad^2):

* mass m = kT / (1 nm/ps)^2 amu (2.49 amu at 300 K), so the thermal velocity is 1 rad/ps at any
  temperature, and a well of curvature A'' (kT/rad^2) oscillates at omega = sqrt(A'') per ps;
* timestep 0.02 ps: omega * dt <= 0.6 for A'' <= 900 kT/rad^2 (the integrator is stable up to 2);
* friction 2 / ps: close to critical damping in the wells (omega ~ 2-10 / ps), which decorrelates
  fastest; the position diffusion constant is kT / (m gamma) = 0.5 rad^2/ps.

Shapes: ``s`` [W, d]; :meth:`CGDynamics.run` returns s [F, W, d] and spread [F, W] (kT). The reporter
that records walkers to .npz is :class:`openmm_cgflow_plugin.reporter.CGReporter`.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from .forces import cg_walker_system, walker_cg, walker_positions
from .pmf import load_pmf
from .swap import swap_pmf

__all__ = ["CGDynamics", "DEFAULT_TIMESTEP_PS", "DEFAULT_FRICTION_PER_PS", "integrator_seed"]

DEFAULT_TIMESTEP_PS = 0.02
DEFAULT_FRICTION_PER_PS = 2.0


def integrator_seed(seed: int) -> int:
    """A nonzero OpenMM random seed from any integer (OpenMM treats 0 as 'pick one at random')."""
    return int(np.random.SeedSequence(int(seed)).generate_state(1)[0] % 2_000_000_000) + 1


def _platform(platform, properties=None):
    if isinstance(platform, openmm.Platform):
        plat = platform
    else:
        plat = openmm.Platform.getPlatformByName(str(platform))
    props = dict(properties or {})
    if plat.getName() == "CPU" and "Threads" not in props and "OPENMM_CPU_THREADS" not in os.environ:
        props["Threads"] = os.environ.get("OMP_NUM_THREADS", "1")
    return plat, props


class CGDynamics:
    """Langevin dynamics of W independent walkers on the ensemble-mean PMF of a ``pmf.pt``.

    Args:
        pmf_path: the ``pmf.pt`` (path or loaded PMF).
        s0: initial CG coordinates [W, d] (radians / nm); a single point [d] gives one walker.
        temperature: K; None takes the file's. Any other value than the file's raises ValueError.
        friction: 1/ps. timestep: ps. mass: amu per walker particle, i.e. per CG coordinate (default
            kT / (1 nm/ps)^2); a walker is ceil(d / 3) particles.
        platform: OpenMM platform name ("Reference", "CPU", "CUDA", ...) or Platform; properties: its
            properties (CPU defaults to OMP_NUM_THREADS or 1 thread).
        seed: random seed for velocities and the integrator (reproducible on Reference/CPU).
        sampling_temperature: K of the Langevin thermostat (default: the file's temperature). The PMF stays
            the one of the file; a higher value samples exp(-A * T / T_sampling), i.e. explores a flattened
            landscape (used by active learning to reach uncertain regions sooner).
        backend: force backend of the walker force: "torch" (TorchForce), "python" (openmm.PythonForce) or
            None (the default, see :mod:`openmm_cgflow_plugin.backends`).
    Attributes: ``simulation`` (openmm.app.Simulation), ``pmf`` (:class:`~openmm_cgflow_plugin.pmf.PMF`),
    ``n_walkers``, ``s`` (current CG coordinates [W, d], periodic ones in [-pi, pi)).
    """

    def __init__(self, pmf_path, s0, temperature=None, friction: float = DEFAULT_FRICTION_PER_PS,
                 timestep: float = DEFAULT_TIMESTEP_PS, platform="Reference", seed: int = 0,
                 mass: Optional[float] = None, properties: Optional[dict] = None,
                 sampling_temperature: Optional[float] = None, backend: Optional[str] = None):
        self.pmf = load_pmf(pmf_path, temperature=temperature)
        s0 = np.asarray(s0, dtype=np.float64)
        if s0.ndim == 1 and s0.shape[0] == self.pmf.n_cg:
            s0 = s0[None, :]
        if s0.ndim != 2 or s0.shape[1] != self.pmf.n_cg:
            raise ValueError(f"CG dimension mismatch: s0 has shape {s0.shape} but the PMF has {self.pmf.n_cg} CG "
                             f"coordinates ({', '.join(self.pmf.cg_names)}); pass s0 as [n_walkers, {self.pmf.n_cg}]")
        if not np.all(np.isfinite(s0)):
            raise ValueError("s0 contains NaN or infinite values")
        if not (friction >= 0 and timestep > 0):
            raise ValueError("friction must be >= 0 and timestep > 0 (1/ps, ps)")
        self.n_walkers = s0.shape[0]
        self.temperature = self.pmf.temperature
        if sampling_temperature is not None:
            if unit.is_quantity(sampling_temperature):
                sampling_temperature = sampling_temperature.value_in_unit(unit.kelvin)
            if not (math.isfinite(float(sampling_temperature)) and float(sampling_temperature) > 0):
                raise ValueError(f"sampling_temperature must be a positive number of kelvin, got {sampling_temperature}")
            self.sampling_temperature = float(sampling_temperature)
        else:
            self.sampling_temperature = self.temperature
        self.timestep = float(timestep)
        self.friction = float(friction)
        system, topology = cg_walker_system(self.pmf, self.n_walkers, mass, backend=backend)
        integrator = openmm.LangevinMiddleIntegrator(self.sampling_temperature * unit.kelvin, self.friction / unit.picosecond,
                                                     self.timestep * unit.picosecond)
        integrator.setRandomNumberSeed(integrator_seed(seed))
        plat, props = _platform(platform, properties)
        self.simulation = app.Simulation(topology, system, integrator, plat, props)
        self.simulation.context.setPositions(self._positions(s0))
        self.simulation.context.setVelocitiesToTemperature(self.sampling_temperature * unit.kelvin,
                                                           integrator_seed(seed + 1))

    def _positions(self, s: np.ndarray, unused=None) -> np.ndarray:
        return walker_positions(s, self.pmf.periodic, unused)

    @property
    def context(self) -> openmm.Context:
        return self.simulation.context

    @property
    def s(self) -> np.ndarray:
        """Current CG coordinates [W, d] (periodic ones wrapped into [-pi, pi))."""
        pos = self.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return walker_cg(np.asarray(pos), self.pmf.periodic)

    @s.setter
    def s(self, value) -> None:
        value = np.asarray(value, dtype=np.float64).reshape(self.n_walkers, self.pmf.n_cg)
        self.context.setPositions(self._positions(value))

    def swap_pmf(self, pmf_path) -> None:
        """Continue on a refined ``pmf.pt`` (same CG coordinates and temperature), keeping the walkers'
        positions and velocities (see :func:`openmm_cgflow_plugin.swap_pmf`)."""
        new = load_pmf(pmf_path, expected_cg=self.pmf.cg_names, temperature=self.temperature)
        swap_pmf(self.simulation, new)
        self.pmf = new

    def energy_kT(self) -> float:
        """Total PMF of all walkers, kT."""
        e = self.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        return e / self.pmf.kT

    def spread(self, s: Optional[np.ndarray] = None) -> np.ndarray:
        """Ensemble spread [W] (kT) at ``s`` (default: the current walkers)."""
        return self.pmf.mean_and_spread(self.s if s is None else s)[1]

    def run(self, n_steps: int, report_interval: int = 100):
        """Run ``n_steps`` steps; return (s [F, W, d], spread [F, W] kT) every ``report_interval`` steps.

        F = n_steps // report_interval (any remainder is run after the last frame). Reporters attached to
        ``simulation.reporters`` run as usual. Positions are re-wrapped into the box at each frame, which
        keeps float32 platforms accurate on long runs.
        """
        n_steps, report_interval = int(n_steps), int(report_interval)
        if n_steps < 0 or report_interval < 1:
            raise ValueError("n_steps must be >= 0 and report_interval >= 1")
        n_frames = n_steps // report_interval
        d = self.pmf.n_cg
        s_out = np.empty((n_frames, self.n_walkers, d))
        spread_out = np.empty((n_frames, self.n_walkers))
        for f in range(n_frames):
            self.simulation.step(report_interval)
            state = self.context.getState(getPositions=True)
            pos = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            s = walker_cg(pos, self.pmf.periodic)
            s_out[f] = s
            spread_out[f] = self.pmf.mean_and_spread(s)[1]
            if any(self.pmf.periodic):
                self.context.setPositions(self._positions(s, unused=pos))
        rest = n_steps - n_frames * report_interval
        if rest:
            self.simulation.step(rest)
        return s_out, spread_out
