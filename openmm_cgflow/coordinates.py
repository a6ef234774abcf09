"""Coordinate transforms between Cartesian positions and the flow's (fine, CG) coordinates.

Two classes share one interface (batched torch, float64, differentiable):

* :class:`InternalCoordinates` -- a Z-matrix built automatically from a molecule's bond graph.
* :class:`LinearCoordinates` -- the Mueller-Brown particle: fine = x + y, s = x - y.

Shapes and units: Cartesian ``x`` is [B, n_atoms, 3] in nm; ``fine`` is [B, n_fine] (dimensionless z-scores
for non-circular coordinates, radians in [-pi, pi) for circular ones); ``s`` is [B, n_cg] (radians for
dihedrals, mdtraj/IUPAC sign, range (-pi, pi]); ``log_det`` is [B].

Z-matrix construction (:func:`openmm_cgflow.zmatrix.build_zmatrix`, used by :class:`InternalCoordinates`)
----------------------------------------------------------------------------------------------------------
1. Spanning tree. The bonds of every CG dihedral chain (a-b, b-c, c-d) are added first (union-find), then
   the remaining bonds in breadth-first order from the root. Bonds that would close a ring are *not*
   coordinates: ring closure is left to the energy (the flow learns it), so rings need no special case
   (e.g. proline's pyrrolidine ring). Every bond, angle and torsion below is along tree edges.
2. Seeds. For a CG dihedral (a, b, c, d) listed first, the root (atom 0 of the Z-matrix) is c, the second
   seed is b and the third d (for alanine dipeptide's phi = C'-N-CA-C: CA, N, C). Seed 1 sits on +x at
   distance r1 from the root, seed 2 is bonded to the root, in the xy plane (y >= 0) at distance r2 and angle
   theta2 = angle(seed2, root, seed1). Without CG dihedrals the root is the atom of highest degree.
3. Rows. Atoms are placed breadth-first over the rooted tree (children ordered: CG end atoms first, then
   atoms with more than one bond, then by index). Atom i with parent j has bond r(i, j), angle
   theta(i, j, k) with k = parent of j (k = seed 1 when j is the root), and a torsion dihedral(i, j, k, l):

   * the first child of j takes a *proper* torsion, l = parent of k (or the other root seed when k is the
     root). These are free rotations (methyls, side chains, peptide omega) and are **circular**: raw
     angles wrapped to [-pi, pi).
   * later children of j (and all children of the root) take an *improper* torsion whose l is the
     first-placed sibling (bonded to j, not k). These are stiff (they fix the hydrogens' and stereocentres'
     geometry) and are **non-circular**: z-scored around the reference value with the wrapped difference.

   Each CG dihedral is exactly one proper torsion row (its end atom is made the first child of its parent
   and the chain is a descending tree path); dihedral(a, b, c, d) == dihedral(d, c, b, a), so the sign is
   mdtraj's whichever end is placed. The CG torsions form ``s``; everything else forms ``fine``.
4. Standardisation. Bonds (scale 0.005 nm), angles (0.15 rad) and improper torsions (0.2 rad) are z-scored
   around the reference structure's values; proper torsions are raw angles.

Jacobian. With r_i, theta_i the bond and angle of every placed atom (seed 1 has only r1; seed 2 has r2 and
theta2), Cartesian volume factorises into translation x rotation x internal coordinates:
``dx = r1^2 sin(alpha) . r2^2 sin(theta2) . prod_i r_i^2 sin(theta_i) . d(internal) d(translation) d(alpha,
beta, gamma)`` with (alpha, beta) the polar angles of the root->seed1 axis and gamma the spin about it.
Integrating out translation and rotation (8 pi^2 V, a constant),
``log_det = 2 log r1 + 2 log r2 + log sin theta2 + sum_i (2 log r_i + log sin theta_i) + sum log(scales)``
so ``log p(fine, s) = -u(x) + log_det`` (u in kT) is the Boltzmann density in these coordinates, up to a
constant. ``to_cartesian`` writes the structure in the fixed seed frame; ``to_internal`` returns
``-log_det`` at that point. Outside the bijective domain (r > 0, 0 < theta < pi) |r| and |sin theta| are
used, so log_det stays finite.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from openmm_cgflow_plugin.cgspace import wrap_angle

from .zmatrix import ZMatrix, build_zmatrix

__all__ = ["InternalCoordinates", "LinearCoordinates", "dihedral", "angle"]

_DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------- geometry
def angle(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Bond angle p0-p1-p2 in radians, [0, pi]; points [..., 3] -> [...]."""
    u, v = p0 - p1, p2 - p1
    return torch.atan2(torch.linalg.vector_norm(torch.linalg.cross(u, v), dim=-1), (u * v).sum(-1))


def dihedral(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
    """Dihedral p0-p1-p2-p3 in radians, (-pi, pi], IUPAC/mdtraj sign; points [..., 3] -> [...]."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    c1 = torch.linalg.cross(b2, b3)
    c2 = torch.linalg.cross(b1, b2)
    y = (b1 * c1).sum(-1) * torch.linalg.vector_norm(b2, dim=-1)
    return torch.atan2(y, (c1 * c2).sum(-1))


def _place(a, b, c, r, theta, phi):
    """NeRF: atom d with |c d| = r, angle(b, c, d) = theta, dihedral(a, b, c, d) = phi. a, b, c: [..., 3]."""
    bc = c - b
    bc = bc / torch.linalg.vector_norm(bc, dim=-1, keepdim=True)
    n = torch.linalg.cross(b - a, bc)
    n = n / torch.linalg.vector_norm(n, dim=-1, keepdim=True)
    m = torch.linalg.cross(n, bc)
    rs = r * torch.sin(theta)
    d = (-r * torch.cos(theta)).unsqueeze(-1) * bc + (rs * torch.cos(phi)).unsqueeze(-1) * m
    return c + d + (rs * torch.sin(phi)).unsqueeze(-1) * n


def _as_float64(t, name: str) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.to(_DTYPE)
    try:
        return torch.as_tensor(np.asarray(t, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor or array of numbers, got {type(t).__name__}") from exc


def _check_positions(x, n_atoms: int) -> torch.Tensor:
    """Validate Cartesian positions [B, n_atoms, 3] (nm); NaN/inf -> ValueError naming the sample."""
    x = _as_float64(x, "x")
    if x.ndim != 3 or x.shape[1] != n_atoms or x.shape[2] != 3:
        hint = " (use x[None] for a single structure)" if x.ndim == 2 else ""
        raise ValueError(f"positions must have shape [B, {n_atoms}, 3] in nm, got {tuple(x.shape)}{hint}")
    finite = torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(
            f"positions of sample(s) {bad[:10]}{' ...' if len(bad) > 10 else ''} contain NaN or inf "
            f"({len(bad)} of {x.shape[0]} samples)"
        )
    return x


# ----------------------------------------------------------------------------------------------- Z-matrix
class InternalCoordinates:
    """Z-matrix internal coordinates split into flow coordinates ``fine`` and CG dihedrals ``s``.

    Args:
        bonds: bonded atom pairs (0-based) of one connected molecule.
        n_atoms: number of atoms (>= 3).
        reference_xyz: reference structure [n_atoms, 3] in nm (z-scoring centre, chirality reference).
        cg_dihedrals: CG dihedrals as bonded chains (a, b, c, d), each 0-based; they become ``s`` in this order.
        chiral_centres: (centre, a, b, c) quadruples whose handedness (sign of the triple product of
            a-centre, b-centre, c-centre) must match the reference; None or [] for none.
        bond_scale: nm, angle_scale: rad, torsion_scale: rad -- fixed z-score scales of non-circular coordinates.
        atom_names: optional labels (for :meth:`coordinate_names` and error messages).

    Attributes:
        n_atoms, n_fine (= 3 n_atoms - 6 - n_cg), n_cg, circular (BoolTensor [n_fine]), cg_periodic,
        zmat (the :class:`~openmm_cgflow.zmatrix.ZMatrix` built from the bonds), zmatrix (its rows: int array
        [n_atoms, 4]: atom, bond ref, angle ref, torsion ref in placement order, -1 = none), torsion_kind (per Z-matrix torsion: "cg", "proper" or "improper"), ring_closures (bonds not used).
    """

    def __init__(
        self,
        bonds: Iterable[Sequence[int]],
        n_atoms: int,
        reference_xyz,
        cg_dihedrals: Sequence[Sequence[int]],
        chiral_centres: Sequence[Sequence[int]] | None = None,
        bond_scale: float = 0.005,
        angle_scale: float = 0.15,
        torsion_scale: float = 0.2,
        atom_names: Sequence[str] | None = None,
    ):
        n = int(n_atoms)
        if n < 3:
            raise ValueError(f"a Z-matrix needs at least 3 atoms, got {n}")
        for nm_, val in (("bond_scale", bond_scale), ("angle_scale", angle_scale), ("torsion_scale", torsion_scale)):
            if not (val > 0 and math.isfinite(val)):
                raise ValueError(f"{nm_} must be positive and finite, got {val}")
        self.n_atoms = n
        self.atom_names = list(atom_names) if atom_names is not None else [str(i) for i in range(n)]
        if len(self.atom_names) != n:
            raise ValueError(f"{len(self.atom_names)} atom names for {n} atoms")
        ref = np.asarray(reference_xyz, dtype=np.float64)
        if ref.shape != (n, 3):
            raise ValueError(f"reference_xyz must have shape [{n}, 3] in nm, got {ref.shape}")
        if not np.all(np.isfinite(ref)):
            raise ValueError("reference_xyz contains NaN or inf")

        zm = build_zmatrix(bonds, n, cg_dihedrals, self.atom_names)
        self.zmat: ZMatrix = zm
        self.cg_dihedrals = zm.cg_dihedrals
        self.n_cg = len(zm.cg_dihedrals)
        self.cg_periodic = [True] * self.n_cg
        self.seeds = zm.seeds
        self.ring_closures = zm.ring_closures
        self.placement_order = zm.placement_order
        self.parent = zm.parent
        self.zmatrix = zm.rows
        self.torsion_kind = zm.torsion_kind
        root, s1, s2 = zm.seeds
        bond_ij, angle_ijk, torsions, kinds = zm.bonds, zm.angles, zm.torsions, zm.torsion_kind
        cg_rows, fine_rows = zm.cg_rows, zm.fine_rows

        self._bond_idx = torch.tensor(bond_ij, dtype=torch.long)  # [n-1, 2]
        self._angle_idx = torch.tensor(angle_ijk, dtype=torch.long)  # [n-2, 3]
        self._torsion_idx = torch.tensor(torsions, dtype=torch.long).reshape(-1, 4)  # [n-3, 4]
        self._cg_rows = torch.tensor(cg_rows, dtype=torch.long)
        self._fine_rows = torch.tensor(fine_rows, dtype=torch.long)
        n_tor = len(torsions)
        # position in cat([fine torsions, s]) of every torsion row
        perm = [0] * n_tor
        for p, t in enumerate(fine_rows):
            perm[t] = p
        for ci, t in enumerate(cg_rows):
            perm[t] = len(fine_rows) + ci
        self._tor_perm = torch.tensor(perm, dtype=torch.long)
        fine_circ = torch.tensor([kinds[t] == "proper" for t in fine_rows], dtype=torch.bool)
        self.n_fine = (n - 1) + (n - 2) + len(fine_rows)
        assert self.n_fine == 3 * n - 6 - self.n_cg
        self.circular = torch.cat([torch.zeros(2 * n - 3, dtype=torch.bool), fine_circ])
        self.bond_scale, self.angle_scale, self.torsion_scale = float(bond_scale), float(angle_scale), float(torsion_scale)
        self._tor_circ = fine_circ

        # placement levels for vectorised NeRF: rows whose references are all placed
        level = {root: 0, s1: 0, s2: 0}
        levels: dict[int, list[int]] = {}
        for t, (i, j, k, l) in enumerate(torsions):
            level[i] = 1 + max(level[j], level[k], level[l])
            levels.setdefault(level[i], []).append(t)
        self._levels = [torch.tensor(levels[lv], dtype=torch.long) for lv in sorted(levels)]

        # reference values
        xr = torch.as_tensor(ref)[None]
        r_ref, th_ref, tor_ref = self._raw(xr)
        self._r_ref, self._th_ref = r_ref[0], th_ref[0]
        self._tor_ref_fine = tor_ref[0, self._fine_rows]
        # constant part of log_det: scales of standardised coordinates
        n_std_tor = int((~fine_circ).sum())
        self._log_scale = (n - 1) * math.log(self.bond_scale) + (n - 2) * math.log(self.angle_scale) + n_std_tor * math.log(
            self.torsion_scale
        )

        # chirality
        cc = [] if chiral_centres is None else [tuple(int(v) for v in q) for q in chiral_centres]
        for q in cc:
            if len(q) != 4 or any(not (0 <= v < n) for v in q):
                raise ValueError(f"chiral centre {q} must be 4 atom indices in 0..{n - 1} (centre, a, b, c)")
        self.chiral_centres = cc
        self._chiral_idx = torch.tensor(cc, dtype=torch.long).reshape(-1, 4)
        vol = self._signed_volumes(xr)[0]
        small = torch.nonzero(vol.abs() < 1e-6).flatten().tolist()
        if small:
            raise ValueError(f"chiral centre(s) {[cc[i] for i in small]} are planar in the reference structure")
        self._chiral_sign = torch.sign(vol)

    # ------------------------------------------------------------------------------------------ builders
    @classmethod
    def from_topology(cls, topology, positions_nm, cg_dihedrals, chiral_centres=None, **kwargs) -> "InternalCoordinates":
        """Build from an ``openmm.app.Topology`` (its bonds) and reference positions [n_atoms, 3] in nm.

        ``chiral_centres=None`` uses every residue's CA with neighbours (N, C, CB) (all L amino acids except
        GLY); pass [] to disable the check. Extra keyword arguments go to the constructor (scales).
        """
        try:
            import openmm.unit as unit

            if unit.is_quantity(positions_nm):
                positions_nm = positions_nm.value_in_unit(unit.nanometer)
        except ImportError:  # pragma: no cover
            pass
        xyz = np.asarray([[float(c) for c in p] for p in positions_nm], dtype=np.float64)
        atoms = list(topology.atoms())
        names = [f"{a.residue.name}{a.residue.id}:{a.name}" for a in atoms]
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        if chiral_centres is None:
            chiral_centres = []
            for res in topology.residues():
                idx = {a.name: a.index for a in res.atoms()}
                if all(k in idx for k in ("CA", "N", "C", "CB")):
                    chiral_centres.append((idx["CA"], idx["N"], idx["C"], idx["CB"]))
        kwargs.setdefault("atom_names", names)
        return cls(bonds, len(atoms), xyz, cg_dihedrals, chiral_centres=chiral_centres, **kwargs)

    # ------------------------------------------------------------------------------------------ helpers
    def _raw(self, x: torch.Tensor):
        """Raw bonds [B, n-1] (nm), angles [B, n-2] (rad), torsions [B, n-3] (rad) of x [B, n, 3]."""
        bi, ai, ti = self._bond_idx.to(x.device), self._angle_idx.to(x.device), self._torsion_idx.to(x.device)
        r = torch.linalg.vector_norm(x[:, bi[:, 0]] - x[:, bi[:, 1]], dim=-1)
        th = angle(x[:, ai[:, 0]], x[:, ai[:, 1]], x[:, ai[:, 2]])
        tor = dihedral(x[:, ti[:, 0]], x[:, ti[:, 1]], x[:, ti[:, 2]], x[:, ti[:, 3]])
        return r, th, tor

    def _log_det_raw(self, r: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.log(r.abs()).sum(-1) + torch.log(torch.sin(th).abs()).sum(-1) + self._log_scale

    def _signed_volumes(self, x: torch.Tensor) -> torch.Tensor:
        ci = self._chiral_idx.to(x.device)
        c = x[:, ci[:, 0]]
        u, v, w = x[:, ci[:, 1]] - c, x[:, ci[:, 2]] - c, x[:, ci[:, 3]] - c
        return (u * torch.linalg.cross(v, w)).sum(-1)

    def coordinate_names(self) -> tuple[list[str], list[str]]:
        """Human-readable names of the fine coordinates [n_fine] and CG coordinates [n_cg]."""
        nm = self.atom_names
        bonds = [f"bond {nm[i]}-{nm[j]}" for i, j in self._bond_idx.tolist()]
        angles = [f"angle {nm[i]}-{nm[j]}-{nm[k]}" for i, j, k in self._angle_idx.tolist()]
        tors = [
            f"{self.torsion_kind[t]} torsion " + "-".join(nm[a] for a in self._torsion_idx[t].tolist())
            for t in range(len(self.torsion_kind))
        ]
        return bonds + angles + [tors[t] for t in self._fine_rows.tolist()], [tors[t] for t in self._cg_rows.tolist()]

    @property
    def reference_fine(self) -> torch.Tensor:
        """fine coordinates [n_fine] of the reference structure (zeros except circular dims)."""
        return torch.cat(
            [torch.zeros(2 * self.n_atoms - 3, dtype=_DTYPE), torch.where(self._tor_circ, wrap_angle(self._tor_ref_fine), 0.0)]
        )

    # ------------------------------------------------------------------------------------------ transforms
    def to_internal(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cartesian x [B, n_atoms, 3] (nm) -> (fine [B, n_fine], s [B, n_cg] rad, log_det [B]).

        log_det = log|d(fine, s)/dx| with the 6 rigid-body degrees of freedom removed (= -log_det of
        :meth:`to_cartesian` at the same point). Raises ValueError for wrong shapes or non-finite positions.
        """
        x = _check_positions(x, self.n_atoms)
        dev = x.device
        r, th, tor = self._raw(x)
        fine_tor = tor[:, self._fine_rows.to(dev)]
        circ = self._tor_circ.to(dev)
        std = wrap_angle(fine_tor - self._tor_ref_fine.to(dev)) / self.torsion_scale
        fine = torch.cat(
            [
                (r - self._r_ref.to(dev)) / self.bond_scale,
                (th - self._th_ref.to(dev)) / self.angle_scale,
                torch.where(circ, wrap_angle(fine_tor), std),
            ],
            dim=1,
        )
        s = tor[:, self._cg_rows.to(dev)]
        return fine, s, -self._log_det_raw(r, th)

    def to_cartesian(self, fine, s) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine [B, n_fine], s [B, n_cg] rad) -> (x [B, n_atoms, 3] nm, log_det [B]).

        x is in the fixed seed frame (root at the origin, seed 1 on +x, seed 2 in the xy plane with y >= 0).
        log_det = log|det dx/d(fine, s)| including the rotational measure and the standardisation scales,
        so log p(fine, s) = -u(x) + log_det (u in kT). Differentiable in fine and s.
        """
        fine = _as_float64(fine, "fine")
        s = _as_float64(s, "s")
        if fine.ndim != 2 or fine.shape[1] != self.n_fine:
            raise ValueError(f"fine must have shape [B, {self.n_fine}], got {tuple(fine.shape)}")
        if s.ndim != 2 or s.shape[1] != self.n_cg or s.shape[0] != fine.shape[0]:
            raise ValueError(f"s must have shape [{fine.shape[0]}, {self.n_cg}], got {tuple(s.shape)}")
        dev = fine.device
        s = s.to(dev)
        n = self.n_atoms
        nb, na = n - 1, n - 2
        r = self._r_ref.to(dev) + self.bond_scale * fine[:, :nb]
        th = self._th_ref.to(dev) + self.angle_scale * fine[:, nb : nb + na]
        ft = fine[:, nb + na :]
        ft = torch.where(self._tor_circ.to(dev), ft, self._tor_ref_fine.to(dev) + self.torsion_scale * ft)
        tor = torch.cat([ft, s], dim=1)[:, self._tor_perm.to(dev)]

        B = fine.shape[0]
        root, s1, s2 = self.seeds
        pos: list = [None] * n
        zero = torch.zeros(B, dtype=_DTYPE, device=dev)
        pos[root] = torch.zeros(B, 3, dtype=_DTYPE, device=dev)
        pos[s1] = torch.stack([r[:, 0], zero, zero], dim=-1)
        pos[s2] = torch.stack([r[:, 1] * torch.cos(th[:, 0]), r[:, 1] * torch.sin(th[:, 0]), zero], dim=-1)
        zi = self._torsion_idx.tolist()
        for rows in self._levels:
            rl = rows.tolist()
            a = torch.stack([pos[zi[t][3]] for t in rl], dim=1)
            b = torch.stack([pos[zi[t][2]] for t in rl], dim=1)
            c = torch.stack([pos[zi[t][1]] for t in rl], dim=1)
            rows_d = rows.to(dev)
            new = _place(a, b, c, r[:, rows_d + 2], th[:, rows_d + 1], tor[:, rows_d])
            for m, t in enumerate(rl):
                pos[zi[t][0]] = new[:, m]
        x = torch.stack(pos, dim=1)
        return x, self._log_det_raw(r, th)

    def chirality_ok(self, x) -> torch.Tensor:
        """BoolTensor [B]: every chiral centre of x [B, n_atoms, 3] has the reference handedness (L for ALA)."""
        x = _as_float64(x, "x")
        if x.ndim != 3 or x.shape[1] != self.n_atoms or x.shape[2] != 3:
            raise ValueError(f"positions must have shape [B, {self.n_atoms}, 3] in nm, got {tuple(x.shape)}")
        if len(self.chiral_centres) == 0:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        vol = self._signed_volumes(x)
        return (torch.sign(vol) == self._chiral_sign.to(x.device)).all(dim=1)

    def __repr__(self) -> str:
        return (
            f"InternalCoordinates(n_atoms={self.n_atoms}, n_fine={self.n_fine} ({int(self.circular.sum())} circular), "
            f"n_cg={self.n_cg}, seeds={self.seeds}, ring_closures={self.ring_closures})"
        )


# ----------------------------------------------------------------------------------------------- Mueller-Brown
class LinearCoordinates:
    """Mueller-Brown particle: fine = [x + y], s = [x - y] (nm); z is ignored (set to 0 by to_cartesian).

    ``to_cartesian`` log_det = log(1/2) (|det d(x, y)/d(f, s)|); ``to_internal`` log_det = log 2.
    """

    n_atoms = 1
    n_fine = 1
    n_cg = 1

    def __init__(self):
        self.circular = torch.zeros(1, dtype=torch.bool)
        self.cg_periodic = [False]

    def to_internal(self, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, 1, 3] nm -> (fine [B, 1], s [B, 1], log_det [B] = log 2)."""
        x = _check_positions(x, 1)
        px, py = x[:, 0, 0], x[:, 0, 1]
        return (px + py)[:, None], (px - py)[:, None], torch.full_like(px, math.log(2.0))

    def to_cartesian(self, fine, s) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine [B, 1], s [B, 1]) nm -> (x [B, 1, 3] nm with z = 0, log_det [B] = log(1/2))."""
        fine = _as_float64(fine, "fine")
        s = _as_float64(s, "s").to(fine.device)
        if fine.ndim != 2 or fine.shape[1] != 1:
            raise ValueError(f"fine must have shape [B, 1], got {tuple(fine.shape)}")
        if s.ndim != 2 or s.shape != fine.shape:
            raise ValueError(f"s must have shape [{fine.shape[0]}, 1], got {tuple(s.shape)}")
        f, c = fine[:, 0], s[:, 0]
        x = torch.stack([(c + f) / 2, (f - c) / 2, torch.zeros_like(f)], dim=-1)[:, None]
        return x, torch.full_like(f, math.log(0.5))

    def chirality_ok(self, x) -> torch.Tensor:
        """All True [B] (a point particle has no handedness)."""
        x = _as_float64(x, "x")
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def __repr__(self) -> str:
        return "LinearCoordinates(fine = x + y, s = x - y)"
