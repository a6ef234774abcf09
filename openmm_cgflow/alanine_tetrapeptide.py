"""Alanine tetrapeptide, ACE-(ALA)3-NME: a built-in molecule with six CG dihedrals, registered by name.

Built through the generic :func:`~openmm_cgflow.systems.from_pdb` path from the packaged
``openmm_cgflow/data/alanine-tetrapeptide.pdb`` (42 atoms; residues ACE1 ALA2 ALA3 ALA4 NME5; written by
``benchmarks/make_tetrapeptide.py``: NeRF geometry, ``Modeller.addHydrogens``, minimised in this force field).
Force field: ``amber99sbildn.xml`` with ``amber99_obc.xml`` (OBC implicit solvent parameters for the amber99
family, evaluated by OpenMM's native ``GBSAOBCForce``), NoCutoff, no constraints, 300 K by default.
CG coordinates, in radians with mdtraj's (IUPAC) sign, in this order:
``phi:ALA2, psi:ALA2, phi:ALA3, psi:ALA3, phi:ALA4, psi:ALA4`` (phi = C(i-1)-N-CA-C, psi = N-CA-C-N(i+1)).
No reference PMF is registered yet.
"""

from __future__ import annotations

from .registry import register_system
from .systems import CGSystem, data_path, from_pdb

#: Packaged structure (openmm_cgflow/data).
PDB_FILE = "alanine-tetrapeptide.pdb"
#: OpenMM force-field files: Amber ff99SB-ILDN + the matching OBC implicit-solvent parameters.
FORCEFIELD = ("amber99sbildn.xml", "amber99_obc.xml")
#: The six CG dihedrals, in order.
CG = ("phi:ALA2", "psi:ALA2", "phi:ALA3", "psi:ALA3", "phi:ALA4", "psi:ALA4")

#: Active-learning defaults for six periodic CG dims (radians). A neighbourhood ball of radius r in d dims
#: spreads each coordinate by r / sqrt(d + 2): 0.85 rad in 6-D matches the 2-D default 0.6 rad per coordinate.
#: Its runs end at a budget (the iteration budget, 20, in the committed run), so the polish (alanine dipeptide's:
#: 25 epochs at the lowest 400 labels within 6 kT, relabelled with 384 samples, then a 6,000-step refit) runs in
#: the last iteration ("polish_at_budget"). Through the package's own polish on the committed run's final state
#: it took the per-residue KLD from 0.53 / 0.35 / 0.36 to 0.27 / 0.20 / 0.24 for 3.1e5 evaluations and 3.4 min
#: (benchmarks/RESULTS.md).
SETTINGS = dict(radius=0.85, initial_radius=0.85, initial_points=400, new_centres=20, points_per_centre=20,
                change_tolerance_kT=0.1, change_patience=2, max_evaluations=20_000_000,
                polish_epochs=25, final_fit_steps=6000, polish_at_budget=True)
#: Flow size: 114 fine coordinates conditioned on 12 context features (cos, sin of six dihedrals).
FLOW = dict(n_layers=8, hidden=(256, 256))


def alanine_tetrapeptide(temperature=300.0) -> CGSystem:
    """ACE-(ALA)3-NME in OBC implicit solvent (amber99sbildn.xml + amber99_obc.xml), six CG dihedrals (rad)."""
    return from_pdb(data_path(PDB_FILE), list(CG), temperature, forcefield=FORCEFIELD, name="alanine-tetrapeptide")


register_system("alanine-tetrapeptide", alanine_tetrapeptide, settings=SETTINGS, flow=FLOW)
