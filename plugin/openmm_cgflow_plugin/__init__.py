"""openmm_cgflow_plugin: run an exported PMF ensemble (pmf.pt) inside OpenMM.

Imports only torch, openmm, numpy and (where a TorchForce is built) openmmtorch, plus matplotlib lazily in
the plot functions; never the sampler ``openmm_cgflow``: a user with nothing but a ``pmf.pt`` can run CG
dynamics or bias an all-atom simulation.

Units: nm, kJ/mol, K, ps at the OpenMM boundary; PMF values in kT; CG dihedrals in radians (IUPAC/mdtraj
sign), read as nm by the CG walkers.

The user jobs:

* :func:`add_pmf_bias`: ``factor * A(s(x))`` on an all-atom System (factor -1 flattens the landscape);
* :class:`CGDynamics`, :class:`CGReporter`: Langevin walkers in CG space on the ensemble-mean PMF, and
  their .npz recorder (:func:`read_cg_npz` reads it, also after a crash);
* :func:`load_pmf` -> :class:`PMF` (metadata, :class:`CGSpace`, mean and spread at given s, grids);
  :func:`save_pmf` writes a pmf.pt from any scriptable model;
* :func:`swap_pmf`: put a refined pmf.pt into a running Simulation, keeping positions and velocities;
* :func:`pmf_cmap_force`: a two-dihedral PMF as ``openmm.CMAPTorsionForce`` (no torch needed to run);
* :func:`reweight`: unbiasing weights exp(factor * A(s)) with ESS, histograms and averages;
* :func:`plot_pmf`: PNG of mean and spread (2-D Ramachandran-style panels, or 1-D mean +- spread);
  :func:`plot_marginals`: one panel per residue (2-D marginals of a d-dimensional PMF, mean and spread).
* :mod:`openmm_cgflow_plugin.marginals`: 1-D / 2-D marginal free energies of a d-dimensional PMF and the
  forward-KLD metric on them.

Every force is built through one seam, :mod:`openmm_cgflow_plugin.backends`: ``backend="torch"``
(openmm-torch TorchForce, the default when installed) or ``backend="python"`` (``openmm.PythonForce``,
OpenMM >= 8.5, serialisable with ``XmlSerializer``). Building blocks stay importable from their modules:
``backends``, ``forces``, ``modules`` (the TorchScript energy modules), ``cgspace``, ``statistics``,
``pmf_file``, ``reporter``, ``files``.
"""

from .dynamics import CGDynamics
from .forces import add_pmf_bias, pmf_cmap_force
from .pmf import PMF, load_pmf
from .plot import plot_marginals, plot_pmf
from .pmf_file import save_pmf
from .reporter import CGReporter, read_cg_npz
from .reweight import Reweighting, reweight
from .swap import swap_pmf
from .cgspace import CGSpace

# Building blocks used often enough to be importable from the package as well.
from .backends import make_force, plugin_forces
from .cgspace import kT_kJmol, wrap_periodic
from .forces import BIAS_PARAMETER, cg_walker_system, walker_mass
from .modules import dihedrals
from .reweight import effective_sample_size, reweighted_histogram

__all__ = ["add_pmf_bias", "CGDynamics", "CGReporter", "load_pmf", "swap_pmf", "pmf_cmap_force", "reweight",
           "plot_pmf", "plot_marginals", "save_pmf", "CGSpace", "PMF", "Reweighting", "read_cg_npz",
           "BIAS_PARAMETER", "cg_walker_system", "make_force", "plugin_forces", "walker_mass", "dihedrals",
           "kT_kJmol", "wrap_periodic", "effective_sample_size", "reweighted_histogram"]
