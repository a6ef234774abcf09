"""Molecules with coarse-grained coordinates: one interface for built-in and user systems.

A :class:`CGSystem` bundles an OpenMM ``System``, its ``Topology``, a reference structure, the
temperature and the CG coordinates, together with the coordinate transform the flow works in.
Alanine dipeptide is built through the same generic :func:`from_openmm` path a user's molecule takes.
Named systems (built-in or a user's) come from :mod:`openmm_cgflow.registry` (``builtin(name)``).
Units: positions in nm, temperature in K, kT in kJ/mol, CG dihedrals in radians (mdtraj/IUPAC sign).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence, Union

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openmm_cgflow_plugin.cgspace import CGSpace, kT_kJmol
from openmm_cgflow_plugin.forces import bonded_pairs

from .coordinates import InternalCoordinates

CGSpec = Union[Sequence[int], str]


@dataclass
class CGSystem:
    """A molecule (OpenMM System + Topology + reference positions) with its CG coordinates.

    Attributes:
        name: short identifier, e.g. ``"alanine-dipeptide"``.
        system: the all-atom ``openmm.System`` (energies in kJ/mol).
        topology: ``openmm.app.Topology`` matching ``system`` atom for atom.
        positions: reference structure, float64 array [n_atoms, 3] in nm.
        temperature: K.
        cg_atoms: atom quadruples (0-based) of the dihedral CG coordinates; empty for Mueller-Brown.
        cg_names: one name per CG coordinate.
        cg_periodic: whether each CG coordinate is periodic (dihedrals: period 2 pi).
        coordinates: the internal-coordinate transform (fine coordinates + CG coordinates).
        builtin: the registered name it was built from by :func:`openmm_cgflow.registry.builtin` (None for
            a system built directly); ``builtin_options`` the factory options it was built with.
    """

    name: str
    system: openmm.System
    topology: app.Topology
    positions: np.ndarray
    temperature: float
    cg_atoms: list
    cg_names: list
    cg_periodic: list
    coordinates: object = field(repr=False)
    builtin: str | None = None
    builtin_options: dict = field(default_factory=dict)

    @property
    def kT(self) -> float:
        """Thermal energy in kJ/mol."""
        return kT_kJmol(self.temperature)

    @property
    def cgspace(self) -> CGSpace:
        """The CG coordinates as the plugin's :class:`~openmm_cgflow_plugin.cgspace.CGSpace` (pmf.pt metadata)."""
        return CGSpace(self.cg_names, self.cg_periodic, self.temperature, self.cg_atoms)

    @property
    def beta(self) -> float:
        """Inverse thermal energy in mol/kJ."""
        return 1.0 / self.kT

    @property
    def n_atoms(self) -> int:
        return self.system.getNumParticles()

    @property
    def n_cg(self) -> int:
        return len(self.cg_names)

    def cg_of(self, positions) -> np.ndarray:
        """CG coordinates [B, n_cg] (radians for dihedrals) of positions [B, n_atoms, 3] or [n_atoms, 3] in nm."""
        import torch

        x = torch.as_tensor(np.asarray(positions, dtype=np.float64))
        if x.ndim == 2:
            x = x[None]
        _, s, _ = self.coordinates.to_internal(x)
        return s.numpy()


def _check_temperature(temperature) -> float:
    if unit.is_quantity(temperature):
        temperature = temperature.value_in_unit(unit.kelvin)
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number of kelvin, got {temperature!r}")
    return temperature


#: Median bonded distance (nm) above which bare-number positions are taken for angstrom (bonds are 0.1-0.2 nm).
ANGSTROM_SUSPECT_NM = 0.5


def _positions_nm(positions, n_atoms: int, bonds=()) -> np.ndarray:
    """Positions as float64 [n_atoms, 3] nm. Bare numbers are read as nm; if the bonded distances (``bonds``,
    pairs of atom indices) say they are angstrom (median > 0.5 nm), ValueError rather than a molecule 10x too
    large."""
    quantity = unit.is_quantity(positions)
    if quantity:
        positions = positions.value_in_unit(unit.nanometer)
    xyz = np.asarray(positions, dtype=np.float64)
    if xyz.shape != (n_atoms, 3):
        raise ValueError(f"positions have shape {xyz.shape}, expected ({n_atoms}, 3) for a System of {n_atoms} particles")
    if not np.all(np.isfinite(xyz)):
        bad = np.where(~np.isfinite(xyz).all(axis=1))[0]
        raise ValueError(f"positions contain NaN or infinite values at atoms {bad.tolist()}")
    if len(bonds):
        ij = np.asarray(bonds, dtype=np.int64)
        median = float(np.median(np.linalg.norm(xyz[ij[:, 0]] - xyz[ij[:, 1]], axis=1)))
        if median > ANGSTROM_SUSPECT_NM:
            how = ("the Quantity's unit is wrong" if quantity else
                   "positions look like angstrom; pass nm (divide by 10) or an OpenMM Quantity, e.g. pdb.positions")
            raise ValueError(f"the median bonded distance of these positions is {median:.3g} nm (bonds are "
                             f"0.1-0.2 nm): {how}")
    return xyz


def _residue_label(residue) -> str:
    return f"{residue.name}{residue.id}"


def _residue_atom(residue, name: str, spec: str) -> int:
    for atom in residue.atoms():
        if atom.name == name:
            return atom.index
    raise ValueError(f"CG coordinate {spec!r}: residue {_residue_label(residue)} has no atom named {name!r} "
                     "(phi/psi need the backbone atoms N, CA and C of an amino-acid residue)")


def _find_residue(topology: app.Topology, key: str, spec: str):
    """The one residue ``key`` names: ``"ALA"`` (name, must be unique), ``"ALA3"`` (name + PDB residue
    number) or ``"3"`` (number). ValueError naming the candidates when it is ambiguous or absent."""
    residues = list(topology.residues())
    matches = [r for r in residues if key in (r.id, _residue_label(r))]
    by = "residue number" if key.isdigit() else "residue"
    if not matches:
        matches = [r for r in residues if r.name == key]
        by = "residue name"
    if len(matches) > 1:
        where = [f"{_residue_label(r)} (chain {r.chain.id}, index {r.index})" for r in matches]
        hint = (f"give name and number, e.g. {spec.partition(':')[0]}:{_residue_label(matches[0])}"
                if by == "residue name" and len({r.id for r in matches}) == len(matches)
                else "give the dihedral as four atom indices")
        raise ValueError(f"CG coordinate {spec!r}: {by} {key!r} is ambiguous, it matches {len(matches)} residues "
                         f"{where}; {hint}")
    if not matches:
        known = [_residue_label(r) for r in residues]
        shown = known if len(known) <= 30 else known[:30] + ["..."]
        raise ValueError(f"CG coordinate {spec!r}: no residue {key!r} in the topology (residues: {shown}); "
                         "use a residue name (if unique), name + number such as 'ALA2', or a number such as '2'")
    return matches[0]


def _bonded_neighbour(topology: app.Topology, atom_index: int, name: str, spec: str, residue, side: str) -> int:
    for a1, a2 in topology.bonds():
        for here, there in ((a1, a2), (a2, a1)):
            if here.index == atom_index and there.name == name and there.residue.index != here.residue.index:
                return there.index
    raise ValueError(f"CG coordinate {spec!r}: residue {_residue_label(residue)} has no {side} residue bonded to it "
                     f"(no atom {name!r} of a neighbouring residue bonded to its {'N' if name == 'C' else 'C'}); "
                     f"{spec.partition(':')[0]} is not defined at a chain end")


def resolve_cg(topology: app.Topology, spec: CGSpec) -> tuple[tuple[int, int, int, int], str]:
    """Atom quadruple (0-based) and name of one CG dihedral.

    ``spec`` is either four 0-based atom indices or ``"phi:RES"`` / ``"psi:RES"`` where RES names one residue:
    ``"ALA"`` (a residue name, only when exactly one residue has it), ``"ALA3"`` (name + PDB residue number)
    or ``"3"`` (residue number). phi = C(i-1)-N-CA-C, psi = N-CA-C-N(i+1), as mdtraj defines them (its sign,
    radians). The name is ``"phi"`` / ``"psi"`` for a residue given by its unique name, else the spec itself
    (``"phi:ALA3"``). ValueError naming the problem for an unknown, ambiguous or terminal residue.
    """
    if isinstance(spec, str):
        kind, _, key = spec.partition(":")
        key = key.strip()
        if kind not in ("phi", "psi") or not key:
            raise ValueError(f"CG coordinate {spec!r} not understood: use 'phi:RES' or 'psi:RES' (RES a residue "
                             "name such as 'ALA', name + number 'ALA3' or number '3') or four atom indices")
        residue = _find_residue(topology, key, spec)
        n, ca, c = (_residue_atom(residue, name, spec) for name in ("N", "CA", "C"))
        if kind == "phi":
            quad = (_bonded_neighbour(topology, n, "C", spec, residue, "preceding"), n, ca, c)
        else:
            quad = (n, ca, c, _bonded_neighbour(topology, c, "N", spec, residue, "following"))
        name = kind if key == residue.name else f"{kind}:{key}"
        return quad, name
    try:
        quad = tuple(int(i) for i in spec)
    except (TypeError, ValueError):
        raise ValueError(f"CG coordinate {spec!r} not understood: use 'phi:RES', 'psi:RES' or four atom indices") from None
    if len(quad) != 4:
        raise ValueError(f"a dihedral CG coordinate needs four atom indices, got {spec!r}")
    return quad, "dihedral(" + ",".join(map(str, quad)) + ")"


def from_openmm(
    system: openmm.System,
    topology: app.Topology,
    positions,
    temperature,
    cg: Sequence[CGSpec],
    name: str = "molecule",
    cg_names: Sequence[str] | None = None,
    chiral_centres=None,
) -> CGSystem:
    """Build a :class:`CGSystem` for any molecule.

    Args:
        system: all-atom ``openmm.System`` without constraints and without periodic boundaries.
        topology: its ``Topology`` (bonds define the internal coordinates).
        positions: reference structure, [n_atoms, 3] in nm (array or OpenMM Quantity); bare numbers whose
            bonded distances look like angstrom are refused.
        temperature: K (number or Quantity), > 0.
        cg: CG dihedrals, each four atom indices or ``"phi:RES"`` / ``"psi:RES"`` with RES a unique residue
            name (``"ALA"``), name + number (``"ALA3"``) or number (``"3"``); see :func:`resolve_cg`.
        name: label for logs and files.
        cg_names: optional names overriding the derived ones.
        chiral_centres: optional (centre, a, b, c) quadruples for the chirality check (default: CA atoms).
    """
    n_atoms = system.getNumParticles()
    if topology.getNumAtoms() != n_atoms:
        raise ValueError(f"the topology has {topology.getNumAtoms()} atoms but the System has {n_atoms} particles")
    if system.getNumConstraints() > 0:
        raise ValueError(
            f"the System has {system.getNumConstraints()} constraints; internal coordinates need every bond free. "
            "Create it with constraints=None (and rigidWater=False)."
        )
    if system.usesPeriodicBoundaryConditions():
        raise ValueError(
            "the System uses periodic boundary conditions (explicit solvent?); openmm-cgflow supports gas-phase or "
            "implicit-solvent molecules only: create it with nonbondedMethod=NoCutoff and an implicit-solvent model."
        )
    temperature = _check_temperature(temperature)
    xyz = _positions_nm(positions, n_atoms, sorted(bonded_pairs(system, topology)))
    if len(cg) == 0:
        raise ValueError("at least one CG coordinate is needed")
    resolved = [resolve_cg(topology, spec) for spec in cg]
    quads = [q for q, _ in resolved]
    names = list(cg_names) if cg_names is not None else [n for _, n in resolved]
    if len(names) != len(quads):
        raise ValueError(f"{len(names)} cg_names given for {len(quads)} CG coordinates")
    for q in quads:
        if any(i < 0 or i >= n_atoms for i in q):
            raise ValueError(f"CG dihedral {q} has atom indices outside 0..{n_atoms - 1}")
    coordinates = InternalCoordinates.from_topology(topology, xyz, quads, chiral_centres=chiral_centres)
    return CGSystem(
        name=name,
        system=system,
        topology=topology,
        positions=xyz,
        temperature=temperature,
        cg_atoms=[list(q) for q in quads],
        cg_names=names,
        cg_periodic=[True] * len(quads),
        coordinates=coordinates,
    )


def data_path(filename: str) -> str:
    """Path of a file shipped in ``openmm_cgflow/data``."""
    return str(resources.files("openmm_cgflow").joinpath("data", filename))


def load_pdb(path: str | os.PathLike) -> app.PDBFile:
    """Read a PDB file, with errors that name the file when it is missing or unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PDB file not found: {path}")
    try:
        pdb = app.PDBFile(path)
    except Exception as exc:  # OpenMM raises assorted errors for malformed files
        raise ValueError(f"could not read PDB file {path}: {exc}") from exc
    if pdb.topology.getNumAtoms() == 0:
        raise ValueError(f"PDB file {path} contains no atoms")
    return pdb


def from_pdb(
    pdb_path: str | os.PathLike,
    cg: Sequence[CGSpec],
    temperature=300.0,
    forcefield: Sequence[str] = ("amber96.xml", "amber96_obc.xml"),
    name: str | None = None,
) -> CGSystem:
    """Molecule from a PDB file with an OpenMM force field (NoCutoff, no constraints; implicit solvent by default)."""
    pdb = load_pdb(pdb_path)
    ff = app.ForceField(*forcefield)
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    label = name or os.path.splitext(os.path.basename(os.fspath(pdb_path)))[0]
    return from_openmm(system, pdb.topology, pdb.positions, temperature, cg, name=label)
