"""Swap a refined ``pmf.pt`` into a running OpenMM Simulation, keeping positions, velocities and time.

OpenMM cannot change the TorchScript module inside an existing force; :func:`swap_pmf` removes the
plugin's forces (any backend: TorchForce or PythonForce) from the System, adds the same kind of force
built from the new file with the same backend (CG walkers, or the all-atom dihedral bias with the same
atom quadruples, global parameter name and current factor, periodicity and force group) and calls
``Context.reinitialize(preserveState=True)``, which carries positions, velocities, box, time and global
parameter values over to the new force field.
"""

from __future__ import annotations

import math

from .backends import force_backend, force_parameters, plugin_forces
from .forces import add_pmf_bias, walker_force
from .pmf import load_pmf

__all__ = ["swap_pmf"]


def swap_pmf(simulation, pmf_path) -> int:
    """Replace the PMF of every plugin force in ``simulation`` by the one in ``pmf_path``.

    The new file must describe the same CG coordinates (names and count) at the same temperature as the
    old one. Positions, velocities, box vectors, time, the backend, and the bias factor (under its own
    global-parameter name, with its current value) are kept. Returns the number of forces replaced;
    raises ValueError if the Simulation has none.
    """
    system = simulation.system
    indices = plugin_forces(system)
    if not indices:
        raise ValueError("the Simulation has no openmm_cgflow_plugin force to swap (build it with CGDynamics, "
                         "cg_walker_system or add_pmf_bias)")
    context = simulation.context
    new = load_pmf(pmf_path)
    replacements = []
    for i in indices:
        force = system.getForce(i)
        backend = force_backend(force)
        module = backend.module(force)
        old = load_pmf(module.pmf)
        load_pmf(new, expected_cg=old.cg_names, temperature=old.temperature)  # same CG coordinates and T
        spec = dict(backend=backend.name, force_group=force.getForceGroup(),
                    uses_pbc=force.usesPeriodicBoundaryConditions())
        if hasattr(module, "quads"):
            params = force_parameters(force)
            if params:
                name = params[0][0]
                spec.update(parameter=name, factor=context.getParameter(name))
            cap = float(getattr(module, "cap_kT", math.inf))
            spec.update(kind="bias", cg_atoms=module.quads.tolist(), cap_kT=None if math.isinf(cap) else cap)
        else:
            spec.update(kind="walkers")
        replacements.append(spec)
    for i in sorted(indices, reverse=True):
        system.removeForce(i)
    for spec in replacements:
        if spec.pop("kind") == "bias":
            add_pmf_bias(system, new, **spec)
        else:
            system.addForce(walker_force(new, **spec))
    context.reinitialize(preserveState=True)
    return len(replacements)
