"""Worker side of the energy bridge: one OpenMM Context per System, energies and forces on request.

Imports only openmm and numpy (and nothing of the package: the local executor runs this file as
``__main__``) so that worker processes start fast and never load torch. Run as a script, it first removes
the working directory and its own folder from ``sys.path`` (the executor also starts it with ``-P``): a
worker never imports a module from the user's working directory.
"""

from __future__ import annotations

import os
import pickle
import sys


def _sanitise_path(path: list[str]) -> list[str]:
    """``path`` without the entries that name the working directory ("" or ".", the cwd) or this file's folder."""
    unsafe = {os.path.realpath(os.getcwd()), os.path.realpath(os.path.dirname(os.path.abspath(__file__)))}
    return [p for p in path if p not in ("", ".") and os.path.realpath(p) not in unsafe]


if __name__ == "__main__":
    sys.path[:] = _sanitise_path(sys.path)

import numpy as np  # noqa: E402
import openmm  # noqa: E402
import openmm.unit as unit  # noqa: E402

try:  # the unit-free SWIG layer behind openmm.Context (see ContextEvaluator._evaluate_fast)
    from openmm import _openmm
except ImportError:  # pragma: no cover
    _openmm = None

_TYPES = openmm.State.Energy + openmm.State.Forces

_KJ = unit.kilojoule_per_mole
_FORCE = unit.kilojoule_per_mole / unit.nanometer


class ContextEvaluator:
    """Energies (kJ/mol) and forces (kJ/mol/nm) of configurations through one OpenMM Context."""

    def __init__(self, system_xml: str, platform: str = "Reference", properties: dict | None = None):
        system = openmm.XmlSerializer.deserialize(system_xml)
        self.n_atoms = system.getNumParticles()
        integrator = openmm.VerletIntegrator(0.001)
        self.context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), properties or {})
        self._fast = self._check_fast_path()

    def evaluate(self, xyz: np.ndarray):
        """xyz [B, n_atoms, 3] nm -> (energy [B] kJ/mol, forces [B, n_atoms, 3] kJ/mol/nm, finite [B] bool).

        A configuration with non-finite positions, or whose energy or forces come out non-finite (or that
        OpenMM refuses), gets energy +inf, zero forces and finite=False; the others are unaffected.
        """
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        batch = xyz.shape[0]
        energy = np.full(batch, np.inf)
        forces = np.zeros((batch, self.n_atoms, 3))
        ok_in = np.isfinite(xyz).reshape(batch, -1).all(axis=1)
        evaluate_one = self._evaluate_fast if self._fast else self._evaluate_public
        for i in np.flatnonzero(ok_in):
            try:
                energy[i] = evaluate_one(xyz[i], forces[i])
            except Exception:  # e.g. "Particle coordinate is NaN" on some platforms
                energy[i] = np.inf
        finite = np.isfinite(energy) & np.isfinite(forces).reshape(batch, -1).all(axis=1)
        energy[~finite] = np.inf
        forces[~finite] = 0.0
        return energy, forces, finite

    def _evaluate_public(self, pos: np.ndarray, out: np.ndarray) -> float:
        self.context.setPositions(pos)
        state = self.context.getState(getEnergy=True, getForces=True)
        out[...] = state.getForces(asNumpy=True).value_in_unit(_FORCE)
        return state.getPotentialEnergy().value_in_unit(_KJ)

    def _evaluate_fast(self, pos: np.ndarray, out: np.ndarray) -> float:
        # The unit-free SWIG calls behind Context.getState / State.getPotentialEnergy / State.getForces
        # (OpenMM's native units are kJ/mol and kJ/mol/nm): ~1.5x the public path for 22 atoms, where
        # Quantity wrapping and unit conversion cost as much as the Reference energy itself.
        self.context.setPositions(pos)
        state = _openmm.Context_getState(self.context, _TYPES, False, -1)
        state._getVectorAsNumpy(openmm.State.Forces, out)
        return _openmm.State_getPotentialEnergy(state)

    def _check_fast_path(self) -> bool:
        """Use the unit-free path only if this OpenMM build has it and it agrees with the public API."""
        if _openmm is None:
            return False
        try:
            i = np.arange(self.n_atoms, dtype=np.float64)
            pos = np.stack([0.3 * i, 0.1 * (i % 2), 0.05 * (i % 3)], axis=1)  # atoms spread out: finite energy
            f_pub, f_fast = np.empty((self.n_atoms, 3)), np.empty((self.n_atoms, 3))
            e_pub = self._evaluate_public(pos, f_pub)
            e_fast = self._evaluate_fast(pos, f_fast)
            return bool(np.array_equal(f_pub, f_fast, equal_nan=True) and np.array_equal(e_pub, e_fast, equal_nan=True))
        except Exception:
            return False


def serve(reader, writer) -> None:
    """Worker main loop over binary streams (see :class:`openmm_cgflow.executors.LocalProcessExecutor`).

    Messages, each answered with ``("ok", value)`` or ``("error", message)``:

    * ``("system", key, system_xml, platform, properties)``: build one Context for this System (once per
      key), answer ``None``;
    * ``("evaluate", key, xyz [B, n_atoms, 3] nm)``: answer ``(energy [B] kJ/mol, forces kJ/mol/nm, finite)``.

    Stops on ``None`` or end of input.
    """

    def send(obj):
        pickle.dump(obj, writer, protocol=pickle.HIGHEST_PROTOCOL)
        writer.flush()

    evaluators: dict[str, ContextEvaluator] = {}
    while True:
        try:
            message = pickle.load(reader)
        except EOFError:
            break
        if message is None:
            break
        try:
            kind, key = message[0], message[1]
            if kind == "system":
                if key not in evaluators:
                    evaluators[key] = ContextEvaluator(*message[2:])
                send(("ok", None))
            elif kind == "evaluate":
                send(("ok", evaluators[key].evaluate(message[2])))
            else:
                send(("error", f"unknown message {kind!r}"))
        except Exception as exc:
            send(("error", repr(exc)))


if __name__ == "__main__":
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the bridge went away while this worker had an answer to write
        os._exit(0)
