"""Shared pieces of the alanine-dipeptide benchmarks (reference metadynamics, plain-MD baseline, baselines.py).

System: amber96.xml + amber96_obc.xml, NoCutoff, no constraints, 300 K, from
openmm_cgflow/data/alanine-dipeptide.pdb. Units: nm, kJ/mol, K, ps, radians (IUPAC/mdtraj sign).
Built here directly (not through openmm_cgflow.systems) so the reference depends on nothing but OpenMM (and
the plugin's gas constant). :func:`build_registered` builds any registered variant (e.g.
"alanine-dipeptide-customgb") the same way for benchmarks/baselines.py.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
from openmm_cgflow_plugin.cgspace import kT_kJmol

TEMPERATURE = 300.0  # K
KT = kT_kJmol(TEMPERATURE)  # kJ/mol

PHI = (4, 6, 8, 14)
PSI = (6, 8, 14, 16)
#: Per-frame observables that are not CG coordinates: name -> atom tuple (dihedral: 4 atoms, angle: 3).
OBSERVABLES = {
    "omega1": (1, 4, 6, 8),       # CH3(ACE)-C-N-CA peptide bond
    "omega2": (8, 14, 16, 18),    # CA-C-N-C(NME) peptide bond
    "chi_cb": (6, 8, 10, 11),     # N-CA-CB-HB1 methyl rotor
    "angle_ncac": (6, 8, 14),     # N-CA-C bond angle (tau)
}


def pdb_path() -> str:
    """Path of the packaged alanine-dipeptide PDB."""
    return str(resources.files("openmm_cgflow").joinpath("data", "alanine-dipeptide.pdb"))


def build_system(hydrogen_mass: float | None = None):
    """(system, topology, positions [22, 3] nm) for alanine dipeptide in OBC implicit solvent.

    ``hydrogen_mass`` (amu): hydrogen mass repartitioning; masses do not change the configurational
    Boltzmann distribution, only the dynamics (and the stable time step).
    """
    pdb = app.PDBFile(pdb_path())
    ff = app.ForceField("amber96.xml", "amber96_obc.xml")
    kw = dict(nonbondedMethod=app.NoCutoff, constraints=None)
    if hydrogen_mass is not None:
        kw["hydrogenMass"] = hydrogen_mass * unit.amu
    system = ff.createSystem(pdb.topology, **kw)
    pos = np.array(pdb.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return system, pdb.topology, pos


def repartition_hydrogen_mass(system: openmm.System, topology, hydrogen_mass: float) -> openmm.System:
    """Set every hydrogen bonded to a heavy atom to ``hydrogen_mass`` (amu), taking the difference from that
    atom, in place (what ``ForceField.createSystem(hydrogenMass=...)`` does). Returns ``system``."""
    for a, b in topology.bonds():
        if a.element is app.element.hydrogen:
            a, b = b, a
        if b.element is app.element.hydrogen and a.element not in (app.element.hydrogen, None):
            transfer = hydrogen_mass * unit.amu - system.getParticleMass(b.index)
            system.setParticleMass(b.index, hydrogen_mass * unit.amu)
            system.setParticleMass(a.index, system.getParticleMass(a.index) - transfer)
    return system


def build_registered(name: str, hydrogen_mass: float | None = None):
    """(system, topology, positions [n, 3] nm, cg_atoms) of the registered system ``name`` (a fresh copy of its
    System, hydrogen masses repartitioned to ``hydrogen_mass`` amu when given); cg_atoms: its CG dihedral quads.
    For "alanine-dipeptide" this is the same System as :func:`build_system` (checked in tests/test_baselines.py)."""
    from openmm_cgflow import builtin

    mol = builtin(name)
    if not mol.cg_atoms or not all(mol.cg_periodic):
        raise ValueError(f"{name}: the baselines need periodic dihedral CG coordinates, got {mol.cg_names}")
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(mol.system))
    if hydrogen_mass is not None:
        repartition_hydrogen_mass(system, mol.topology, hydrogen_mass)
    return system, mol.topology, np.array(mol.positions, dtype=np.float64), [tuple(q) for q in mol.cg_atoms]


def make_platform(name: str):
    """(platform, properties) with one thread for CPU."""
    platform = openmm.Platform.getPlatformByName(name)
    props = {"Threads": "1"} if name == "CPU" else {}
    return platform, props


def dihedrals(x: np.ndarray, quads) -> np.ndarray:
    """Dihedral angles (radians, IUPAC sign as mdtraj) of positions x [F, n, 3] for quads -> [F, len(quads)]."""
    x = np.asarray(x, dtype=np.float64)
    out = []
    for a, b, c, d in quads:
        b0 = x[:, a] - x[:, b]
        b1 = x[:, c] - x[:, b]
        b2 = x[:, d] - x[:, c]
        b1n = b1 / np.linalg.norm(b1, axis=1, keepdims=True)
        v = b0 - np.sum(b0 * b1n, axis=1, keepdims=True) * b1n
        w = b2 - np.sum(b2 * b1n, axis=1, keepdims=True) * b1n
        xx = np.sum(v * w, axis=1)
        yy = np.sum(np.cross(b1n, v) * w, axis=1)
        out.append(np.arctan2(yy, xx))
    return np.stack(out, axis=1)


def angles(x: np.ndarray, triples) -> np.ndarray:
    """Bond angles (radians) of positions x [F, n, 3] for atom triples -> [F, len(triples)]."""
    x = np.asarray(x, dtype=np.float64)
    out = []
    for a, b, c in triples:
        u = x[:, a] - x[:, b]
        v = x[:, c] - x[:, b]
        cos = np.sum(u * v, axis=1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
        out.append(np.arccos(np.clip(cos, -1.0, 1.0)))
    return np.stack(out, axis=1)


def frame_observables(x: np.ndarray) -> dict:
    """phi, psi and the OBSERVABLES of positions x [F, 22, 3] nm, each a float array [F] (radians)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    out = {}
    d = dihedrals(x, [PHI, PSI])
    out["phi"], out["psi"] = d[:, 0], d[:, 1]
    for name, atoms in OBSERVABLES.items():
        out[name] = (dihedrals(x, [atoms]) if len(atoms) == 4 else angles(x, [atoms]))[:, 0]
    return out


def save_npz_atomic(path: str, **arrays) -> None:
    """np.savez_compressed to a temp file in the same directory, then rename (atomic)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
