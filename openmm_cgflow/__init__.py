"""openmm-cgflow: coarse-grained potentials of mean force learned by conditional normalizing flows.

The sampler. The three user jobs::

    from openmm_cgflow import PMFLearner, LearnerSettings, builtin     # learn a PMF (active learning)
    from openmm_cgflow import from_openmm, from_pdb                   # ... of your own molecule
    from openmm_cgflow import backmap, load_model                     # CG frames -> all-atom frames

and :func:`register_system` to give your molecule a name with its own defaults (``builtin(name)``,
``cgflow run name``). Also here: :func:`backmap_file` (CG file -> trajectory file),
:func:`weighted_estimate` (Boltzmann-weighted averages of backmapped samples) and :class:`EnergyBridge`
(OpenMM energies for torch). Units at the boundary are OpenMM's (nm, kJ/mol, K, ps, radians); energies inside
are in kT. The OpenMM layer that runs a learned PMF is the separate package ``openmm_cgflow_plugin``.
"""

__version__ = "0.1.0"

from .learner import PMFLearner
from .settings import LearnerSettings
from .registry import builtin, register_system
from .systems import CGSystem, from_openmm, from_pdb
from .backmapping import backmap
from .model_io import load_model, save_model
from .backmap_output import backmap_file
from .importance import weighted_estimate
from .bridge import EnergyBridge
# The built-in systems register themselves on import.
from . import alanine_dipeptide, alanine_tetrapeptide, analytic, mueller_brown  # noqa: E402,F401

__all__ = ["PMFLearner", "LearnerSettings", "builtin", "from_openmm", "from_pdb", "backmap", "load_model",
           "register_system", "CGSystem", "save_model", "backmap_file", "weighted_estimate", "EnergyBridge",
           "__version__"]
