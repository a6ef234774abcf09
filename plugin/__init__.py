"""openmm_cgflow_plugin: run an exported PMF ensemble (pmf.pt) inside OpenMM through openmm-torch.

Imports only torch, openmm, openmmtorch and numpy (matplotlib lazily), never the sampler.
"""
