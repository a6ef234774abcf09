"""openmm-cgflow: coarse-grained potentials of mean force learned by conditional normalizing flows.

The sampler. Main entry points::

    from openmm_cgflow import PMFLearner, builtin, from_openmm, load_model, backmap

Units at the boundary are OpenMM's (nm, kJ/mol, K, ps, radians); energies inside are in kT.
The OpenMM layer that runs a learned PMF lives in the separate package ``openmm_cgflow_plugin``.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "PMFLearner": "active_learning",
    "LearnerSettings": "active_learning",
    "CGSystem": "systems",
    "builtin": "systems",
    "from_openmm": "systems",
    "from_pdb": "systems",
    "EnergyBridge": "bridge",
    "ConditionalFlow": "flow",
    "flow_for": "flow",
    "Trainer": "training",
    "fit_ensemble": "ensemble",
    "export_pmf": "ensemble",
    "backmap": "backmap",
    "backmap_file": "backmap",
    "weighted_estimate": "backmap",
    "weighted_histogram": "backmap",
    "save_model": "model_io",
    "load_model": "model_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'openmm_cgflow' has no attribute {name!r}")
