"""Alanine dipeptide and proline dipeptide: the built-in molecules, registered by name.

Both are built through the same generic :func:`~openmm_cgflow.systems.from_pdb` path a user's molecule
takes (amber96 + OBC implicit solvent, NoCutoff, no constraints), with CG coordinates (phi, psi) in radians
(IUPAC/mdtraj sign). Alanine dipeptide's reference for the forward-KLD metric is the packaged
well-tempered-metadynamics PMF, ``openmm_cgflow/data/aldp_reference_pmf.npz``: 100 x 100 bins on
[-pi, pi)^2, indexed ``[i_phi, j_psi]`` (written by ``benchmarks/reference_metad.py``).
Temperatures in K.
"""

from __future__ import annotations

from .metrics import load_reference_npz
from .registry import register_system
from .systems import CGSystem, data_path, from_pdb

#: File name of the packaged alanine-dipeptide reference (free energy + probabilities per bin).
REFERENCE_FILE = "aldp_reference_pmf.npz"


def alanine_dipeptide(temperature=300.0) -> CGSystem:
    """ACE-ALA-NME in OBC implicit solvent (amber96.xml + amber96_obc.xml), CG coordinates (phi, psi) in radians."""
    return from_pdb(data_path("alanine-dipeptide.pdb"), ["phi:ALA", "psi:ALA"], temperature, name="alanine-dipeptide")


def proline_dipeptide(temperature=300.0) -> CGSystem:
    """ACE-PRO-NME in OBC implicit solvent: a ring molecule, CG coordinates (phi, psi) in radians."""
    return from_pdb(data_path("proline-dipeptide.pdb"), ["phi:PRO", "psi:PRO"], temperature, name="proline-dipeptide")


def reference() -> dict:
    """The packaged alanine-dipeptide reference (a dict, see :mod:`openmm_cgflow.metrics`), 300 K."""
    ref = load_reference_npz(data_path(REFERENCE_FILE))
    ref["name"] = "alanine-dipeptide"
    return ref


register_system("alanine-dipeptide", alanine_dipeptide, reference=reference)
register_system("proline-dipeptide", proline_dipeptide)
