"""openmm_cgflow_plugin: run an exported PMF ensemble (pmf.pt) inside OpenMM through openmm-torch.

Imports only torch, openmm, openmmtorch (lazily, where a TorchForce is built) and numpy (matplotlib
lazily in the plot functions), never the sampler ``openmm_cgflow``: a user with nothing but a ``pmf.pt``
can run CG dynamics or bias an all-atom simulation.

Units: nm, kJ/mol, K, ps at the OpenMM boundary; PMF values in kT; CG dihedrals in radians (IUPAC/mdtraj
sign), read as nm by the CG walkers.

* :func:`load_pmf` -> :class:`PMF` (metadata, mean and spread at given s, grids);
* :class:`CGDynamics`, :class:`CGReporter`: Langevin walkers in CG space on the ensemble-mean PMF;
* :func:`add_pmf_bias`: ``factor * A(s(x))`` on an all-atom System (factor -1 flattens the landscape);
* :func:`pmf_cmap_force`: a two-dihedral PMF as ``openmm.CMAPTorsionForce`` (no openmm-torch needed to run);
* :func:`reweight`: unbiasing weights exp(factor * A(s)) with ESS, histograms and averages;
* :func:`swap_pmf`: put a refined pmf.pt into a running Simulation, keeping positions and velocities;
* :func:`plot_pmf`: PNG of mean and spread (2-D Ramachandran-style panels, or 1-D mean +- spread).
"""

from .dynamics import CGDynamics, CGReporter
from .forces import (BIAS_PARAMETER, add_pmf_bias, cg_walker_system, cmap_grid, make_torch_force, plugin_forces,
                     pmf_cmap_force, walker_mass)
from .modules import dihedrals
from .plot import plot_pmf
from .pmf import PMF, kT_kJmol, load_pmf, wrap_periodic
from .swap import swap_pmf
from .reweight import Reweighting, effective_sample_size, reweight, reweighted_histogram

__all__ = ["PMF", "load_pmf", "kT_kJmol", "wrap_periodic", "CGDynamics", "CGReporter", "add_pmf_bias",
           "cg_walker_system", "cmap_grid", "make_torch_force", "pmf_cmap_force", "walker_mass", "BIAS_PARAMETER",
           "dihedrals", "plot_pmf", "Reweighting", "reweight", "effective_sample_size", "reweighted_histogram",
           "swap_pmf", "plugin_forces"]
