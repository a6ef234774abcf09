"""Build ``openmm_cgflow/data/alanine-tetrapeptide.pdb``: ACE-(ALA)3-NME, hydrogens added, minimised.

    python benchmarks/make_tetrapeptide.py [--out PATH] [--phi -75] [--psi 145]

No structure download: the heavy atoms are placed by NeRF (natural extension reference frame) with the
bond lengths and angles of the packaged alanine-dipeptide PDB (ACE-ALA-NME), every peptide bond trans
(omega = 180 deg), the L-alanine CB at the dipeptide's improper offset from phi, and (phi, psi) of each
alanine set to the given values (default: polyproline II, (-75, 145) deg). Hydrogens come from
``Modeller.addHydrogens`` with the tetrapeptide's force field (:mod:`openmm_cgflow.alanine_tetrapeptide`),
then the structure is minimised in that force field (NoCutoff, OBC implicit solvent, no constraints) and
written with residues numbered ACE1 ALA2 ALA3 ALA4 NME5. Units: nm and degrees on the command line.
Not bit-reproducible (``addHydrogens`` places hydrogens with some randomness): reruns reach the same minimum
(-110.3 kJ/mol, phi/psi about (-73, 155) deg) within ~0.002 nm.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from openmm_cgflow.alanine_tetrapeptide import FORCEFIELD, PDB_FILE  # noqa: E402
from openmm_cgflow.systems import data_path  # noqa: E402


def place(a, b, c, bond, angle, torsion):
    """NeRF: position d (nm) with |c d| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion (rad)."""
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d = np.array([-bond * np.cos(angle), bond * np.sin(angle) * np.cos(torsion), bond * np.sin(angle) * np.sin(torsion)])
    return c + d[0] * bc + d[1] * m + d[2] * n


def _dihedral(p0, p1, p2, p3):
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    c1, c2 = np.cross(b2, b3), np.cross(b1, b2)
    return np.arctan2(np.dot(b1, c1) * np.linalg.norm(b2), np.dot(c1, c2))


def _angle(p0, p1, p2):
    u, v = p0 - p1, p2 - p1
    return np.arccos(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def dipeptide_geometry() -> dict:
    """Bond lengths (nm), angles and the CB / O torsion offsets (rad) measured on the packaged dipeptide."""
    pdb = app.PDBFile(data_path("alanine-dipeptide.pdb"))
    xyz = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    at = {(a.residue.name, a.name): xyz[a.index] for a in pdb.topology.atoms()}
    ch3, c0, o0 = at["ACE", "CH3"], at["ACE", "C"], at["ACE", "O"]
    n, ca, cb, c, o = (at["ALA", k] for k in ("N", "CA", "CB", "C", "O"))
    n2, cn = at["NME", "N"], at["NME", "C"]
    d = np.linalg.norm
    return dict(
        r_ch3c=d(c0 - ch3), r_co=d(o0 - c0), r_cn=d(n - c0), r_nca=d(ca - n), r_cac=d(c - ca), r_cacb=d(cb - ca),
        r_ncme=d(cn - n2),
        a_ch3cn=_angle(ch3, c0, n), a_ch3co=_angle(ch3, c0, o0), a_cnca=_angle(c0, n, ca), a_ncac=_angle(n, ca, c),
        a_cacn=_angle(ca, c, n2), a_caco=_angle(ca, c, o), a_ncacb=_angle(n, ca, cb), a_cncme=_angle(c, n2, cn),
        # CB torsion about N-CA relative to phi (L chirality); O torsion about CA-C relative to psi
        cb_offset=_dihedral(c0, n, ca, cb) - _dihedral(c0, n, ca, c),
        o_offset=_dihedral(n, ca, c, o) - _dihedral(n, ca, c, n2),
    )


def heavy_atoms(phi: float, psi: float, n_ala: int = 3) -> list:
    """[(residue name, residue number, atom name, element, xyz nm)] of ACE-(ALA)n-NME, phi/psi in rad."""
    g = dipeptide_geometry()
    out = []
    ch3 = np.zeros(3)
    c_prev = np.array([g["r_ch3c"], 0.0, 0.0])
    n = c_prev + g["r_cn"] * np.array([-np.cos(g["a_ch3cn"]), np.sin(g["a_ch3cn"]), 0.0])
    o = place(n, ch3, c_prev, g["r_co"], g["a_ch3co"], np.pi)
    out += [("ACE", 1, "CH3", "C", ch3), ("ACE", 1, "C", "C", c_prev), ("ACE", 1, "O", "O", o)]
    before = ch3  # the atom before C(i-1) along the backbone: CH3, then CA(i-1)
    for i in range(n_ala):
        resid = 2 + i
        ca = place(before, c_prev, n, g["r_nca"], g["a_cnca"], np.pi)  # omega = 180
        c = place(c_prev, n, ca, g["r_cac"], g["a_ncac"], phi)
        cb = place(c_prev, n, ca, g["r_cacb"], g["a_ncacb"], phi + g["cb_offset"])
        n_next = place(n, ca, c, g["r_cn"], g["a_cacn"], psi)
        o = place(n, ca, c, g["r_co"], g["a_caco"], psi + g["o_offset"])
        out += [("ALA", resid, "N", "N", n), ("ALA", resid, "CA", "C", ca), ("ALA", resid, "C", "C", c),
                ("ALA", resid, "O", "O", o), ("ALA", resid, "CB", "C", cb)]
        before, c_prev, n = ca, c, n_next
    cme = place(before, c_prev, n, g["r_ncme"], g["a_cncme"], np.pi)
    out += [("NME", 2 + n_ala, "N", "N", n), ("NME", 2 + n_ala, "C", "C", cme)]
    return out


def heavy_atom_pdb(atoms) -> app.PDBFile:
    """The heavy atoms as an OpenMM PDBFile (standard bonds from OpenMM's residue templates)."""
    lines = []
    for k, (res, resid, name, element, xyz) in enumerate(atoms, start=1):
        record = "ATOM  " if res == "ALA" else "HETATM"
        x, y, z = 10.0 * xyz
        lines.append(f"{record}{k:5d} {name:<4s} {res:3s} A{resid:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00"
                     f"          {element:>2s}")
    lines.append("END")
    return app.PDBFile(io.StringIO("\n".join(lines) + "\n"))


def build(phi_deg: float = -75.0, psi_deg: float = 145.0, tolerance: float = 0.1):
    """(topology, positions Quantity, energies dict) of the minimised tetrapeptide."""
    pdb = heavy_atom_pdb(heavy_atoms(np.radians(phi_deg), np.radians(psi_deg)))
    ff = app.ForceField(*FORCEFIELD)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(ff)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(modeller.positions)
    e0 = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    openmm.LocalEnergyMinimizer.minimize(context, tolerance * unit.kilojoule_per_mole / unit.nanometer, 0)
    state = context.getState(getEnergy=True, getPositions=True)
    e1 = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return modeller.topology, state.getPositions(), {"before_kJmol": e0, "after_kJmol": e1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=data_path(PDB_FILE))
    ap.add_argument("--phi", type=float, default=-75.0, help="initial phi of every ALA (deg)")
    ap.add_argument("--psi", type=float, default=145.0, help="initial psi of every ALA (deg)")
    args = ap.parse_args(argv)
    topology, positions, energies = build(args.phi, args.psi)
    with open(args.out, "w") as fh:
        app.PDBFile.writeFile(topology, positions, fh, keepIds=True)
    print(f"wrote {args.out}: {topology.getNumAtoms()} atoms, energy {energies['before_kJmol']:.1f} -> "
          f"{energies['after_kJmol']:.1f} kJ/mol (force field {', '.join(FORCEFIELD)})")


if __name__ == "__main__":
    main()
