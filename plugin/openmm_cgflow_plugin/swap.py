"""Swap a refined ``pmf.pt`` into a running OpenMM Simulation, keeping positions, velocities and time.

OpenMM cannot change the TorchScript module inside an existing ``TorchForce``; :func:`swap_pmf` removes
the plugin's TorchForce(s) from the System, adds the same kind of force built from the new file (CG walkers
or the all-atom dihedral bias, with the same atom quadruples, bias factor and force group) and calls
``Context.reinitialize(preserveState=True)``, which carries positions, velocities, box, time and global
parameters over to the new force field.
"""

from __future__ import annotations

from .forces import BIAS_PARAMETER, add_pmf_bias, plugin_forces, walker_force
from .pmf import load_pmf

__all__ = ["swap_pmf", "plugin_forces"]


def swap_pmf(simulation, pmf_path) -> int:
    """Replace the PMF of every plugin TorchForce in ``simulation`` by the one in ``pmf_path``.

    The new file must describe the same CG coordinates (names and count) at the same temperature as the
    old one. Positions, velocities, box vectors, time and the bias factor (global parameter) are kept.
    Returns the number of forces replaced; raises ValueError if the Simulation has none.
    """
    from openmmtorch import TorchForce

    system = simulation.system
    indices = plugin_forces(system)
    if not indices:
        raise ValueError("the Simulation has no openmm_cgflow_plugin TorchForce to swap (build it with "
                         "CGDynamics, cg_walker_system or add_pmf_bias)")
    context = simulation.context
    new = load_pmf(pmf_path)
    replacements = []
    for i in indices:
        force = TorchForce.cast(system.getForce(i))
        module = force.getModule()
        old = load_pmf(module.pmf)
        load_pmf(new, expected_cg=old.cg_names, temperature=old.temperature)  # same CG coordinates and T
        group = force.getForceGroup()
        if hasattr(module, "quads"):
            quads = module.quads.tolist()
            factor = context.getParameter(BIAS_PARAMETER) if force.getNumGlobalParameters() else -1.0
            replacements.append(("bias", (quads, force.usesPeriodicBoundaryConditions()), factor, group))
        else:
            replacements.append(("walkers", force.usesPeriodicBoundaryConditions(), None, group))
    for i in sorted(indices, reverse=True):
        system.removeForce(i)
    for kind, arg, factor, group in replacements:
        if kind == "bias":
            add_pmf_bias(system, new, factor=factor, cg_atoms=arg[0], force_group=group, uses_pbc=arg[1])
        else:
            system.addForce(walker_force(new, uses_pbc=arg, force_group=group))
    context.reinitialize(preserveState=True)
    return len(replacements)
