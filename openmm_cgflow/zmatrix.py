"""Z-matrix construction from a molecule's bond graph (the graph half of the internal coordinates).

:func:`build_zmatrix` turns bonds, the number of atoms and the CG dihedrals into a :class:`ZMatrix`: seeds,
spanning tree (rings are left open: ring-closing bonds are not coordinates), placement order and one row
per atom with its bond, angle and torsion references, each torsion labelled "cg", "proper" (circular) or
"improper" (z-scored). :class:`openmm_cgflow.coordinates.InternalCoordinates` takes the result and adds
the numerics (reference values, scales, Jacobian, NeRF placement); the construction rules are described
in that module's docstring. Atom indices are 0-based; no units here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["ZMatrix", "build_zmatrix"]


@dataclass(frozen=True)
class ZMatrix:
    """The Z-matrix of one molecule (all indices 0-based atom indices unless said otherwise).

    n_atoms: number of atoms. cg_dihedrals: the validated CG dihedral chains (a, b, c, d), in input order.
    seeds: (root, seed 1, seed 2). ring_closures: bonds not in the spanning tree (min, max) sorted.
    parent: [n_atoms] parent of each atom in the rooted tree (-1 for the root). placement_order: atoms in
    placement order. rows: int array [n_atoms, 4] (atom, bond ref, angle ref, torsion ref; -1 = none).
    bonds [n-1] (i, j), angles [n-2] (i, j, k), torsions [n-3] (i, j, k, l): the coordinates in row order
    (bonds and angles start with the seeds'). torsion_kind [n-3]: "cg", "proper" or "improper".
    cg_rows [n_cg]: torsion row of each CG dihedral. fine_rows: torsion rows that are fine coordinates.
    """

    n_atoms: int
    cg_dihedrals: list
    seeds: tuple
    ring_closures: list
    parent: list
    placement_order: list
    rows: np.ndarray
    bonds: list
    angles: list
    torsions: list
    torsion_kind: list
    cg_rows: list
    fine_rows: list


def _adjacency(bonds, n: int):
    """Neighbour sets [n] of the bond graph; ValueError for bad bonds or a disconnected graph."""
    adj: list[set[int]] = [set() for _ in range(n)]
    for bond in bonds:
        a, b = (int(v) for v in bond)
        if not (0 <= a < n and 0 <= b < n):
            raise ValueError(f"bond ({a}, {b}) has atom indices outside 0..{n - 1}")
        if a == b:
            raise ValueError(f"bond ({a}, {b}) bonds an atom to itself")
        adj[a].add(b)
        adj[b].add(a)
    seen, queue = {0}, deque([0])
    while queue:
        u = queue.popleft()
        for v in adj[u] - seen:
            seen.add(v)
            queue.append(v)
    if len(seen) != n:
        missing = sorted(set(range(n)) - seen)
        raise ValueError(
            f"the bond graph is not connected: {len(missing)} atoms (e.g. {missing[:5]}) are not bonded to atom 0; "
            "internal coordinates need one molecule (check the topology's bonds / CONECT records)"
        )
    return adj


def _cg_chains(cg_dihedrals, adj, names):
    """The CG dihedrals as validated bonded chains (tuples of 4 atom indices), in input order."""
    n = len(adj)
    cg = []
    for q in cg_dihedrals:
        q = tuple(int(v) for v in q)
        if len(q) != 4:
            raise ValueError(f"CG dihedral {q} must have 4 atoms")
        if any(not (0 <= v < n) for v in q):
            raise ValueError(f"CG dihedral {q} has atom indices outside 0..{n - 1}")
        if len(set(q)) != 4:
            raise ValueError(f"CG dihedral {q} repeats an atom")
        for u, v in zip(q[:-1], q[1:]):
            if v not in adj[u]:
                raise ValueError(
                    f"CG dihedral {q} is not a bonded chain: atoms {u} ({names[u]}) and "
                    f"{v} ({names[v]}) are not bonded"
                )
        if q in cg or q[::-1] in cg:
            raise ValueError(f"CG dihedral {q} is listed twice")
        cg.append(q)
    return cg


def _spanning_tree(adj, cg, root: int):
    """(tree neighbour sets [n], ring-closing bonds): the CG chain bonds first (union-find), then
    breadth-first from ``root``; bonds that would close a ring are left out."""
    n = len(adj)
    parent_uf = list(range(n))

    def find(u):
        while parent_uf[u] != u:
            parent_uf[u] = parent_uf[parent_uf[u]]
            u = parent_uf[u]
        return u

    tree: list[set[int]] = [set() for _ in range(n)]

    def add(u, v):
        ru, rv = find(u), find(v)
        if ru == rv:
            return False
        parent_uf[ru] = rv
        tree[u].add(v)
        tree[v].add(u)
        return True

    for q in cg:
        for u, v in zip(q[:-1], q[1:]):
            if v not in tree[u] and not add(u, v):
                raise ValueError(
                    f"the bonds of the CG dihedrals close a ring at bond ({u}, {v}) of {q}; "
                    "CG dihedrals must not form a ring among themselves"
                )
    visited, queue = {root}, deque([root])
    while queue:
        u = queue.popleft()
        for v in sorted(adj[u]):
            add(u, v)
            if v not in visited:
                visited.add(v)
                queue.append(v)
    ring_closures = sorted({(min(u, v), max(u, v)) for u in range(n) for v in adj[u] if v not in tree[u]})
    return tree, ring_closures


def _rooted(tree, root: int):
    """Parent [n] of every atom in the tree rooted at ``root`` (-1 for the root), breadth-first."""
    par = [-1] * len(tree)
    queue = deque([root])
    seen = {root}
    while queue:
        u = queue.popleft()
        for v in sorted(tree[u]):
            if v not in seen:
                seen.add(v)
                par[v] = u
                queue.append(v)
    return par


def build_zmatrix(bonds: Iterable[Sequence[int]], n_atoms: int, cg_dihedrals: Sequence[Sequence[int]],
                  atom_names: Sequence[str] | None = None) -> ZMatrix:
    """The Z-matrix of a connected molecule with ``n_atoms`` (>= 3) atoms, its ``bonds`` (atom pairs) and CG
    dihedrals (bonded chains, each made exactly one proper torsion row). ``atom_names`` label error
    messages. Raises ValueError for bad indices, a disconnected graph or CG dihedrals that cannot be
    single Z-matrix torsions."""
    n = int(n_atoms)
    if n < 3:
        raise ValueError(f"a Z-matrix needs at least 3 atoms, got {n}")
    names = list(atom_names) if atom_names is not None else [str(i) for i in range(n)]

    adj = _adjacency(bonds, n)
    cg = _cg_chains(cg_dihedrals, adj, names)

    # --- seeds
    if cg:
        a, b, c, d = cg[0]
        root, s1, s2 = c, b, d
    else:
        root = max(range(n), key=lambda i: (len(adj[i]), -i))
        if len(adj[root]) < 2:
            raise ValueError("no atom has two bonds; cannot seed a Z-matrix")
        s1, s2 = sorted(adj[root])[:2]
    seeds = (root, s1, s2)

    tree, ring_closures = _spanning_tree(adj, cg, root)
    par = _rooted(tree, root)

    def proper_l(j, k):
        """Torsion reference for the first child of j (k = parent of j)."""
        if k == root:
            return s1 if j != s1 else s2
        return par[k]

    # which end of each CG dihedral is placed, and must be the first child of its parent
    required_first: dict[int, int] = {}
    cg_end: list[int] = []
    for q in cg:
        a, b, c, d = q
        end = None
        for (w, x, y, z) in ((a, b, c, d), (d, c, b, a)):
            # end atom z, parent y, grandparent x, torsion reference must be w
            if par[z] == y and par[y] == x and proper_l(y, x) == w and y != root:
                end = z
                break
        if end is None:
            raise ValueError(
                f"CG dihedral {q} cannot be made a single Z-matrix torsion with the tree rooted at atom {root} "
                f"(seeds {seeds}); list first a CG dihedral whose central bond is near it, or pass fewer CG dihedrals"
            )
        if required_first.get(par[end], end) != end:
            raise ValueError(
                f"CG dihedral {q} and another CG dihedral both need atom {par[end]}'s first torsion; "
                "two CG dihedrals sharing three atoms are not supported"
            )
        required_first[par[end]] = end
        cg_end.append(end)

    children: list[list[int]] = [[] for _ in range(n)]
    for v in range(n):
        if par[v] >= 0:
            children[par[v]].append(v)
    for u in range(n):
        if u == root:
            children[u].sort(key=lambda v: (v != s1, v != s2, len(adj[v]) == 1, v))
        else:
            children[u].sort(key=lambda v: (required_first.get(u) != v, len(adj[v]) == 1, v))
    order, queue = [root], deque([root])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            order.append(v)
            queue.append(v)

    # --- rows
    zmat = [[root, -1, -1, -1], [s1, root, -1, -1], [s2, root, s1, -1]]
    bond_ij = [(s1, root), (s2, root)]
    angle_ijk = [(s2, root, s1)]
    torsions, kinds = [], []
    cg_index = {end: ci for ci, end in enumerate(cg_end)}
    for i in order[3:]:
        j = par[i]
        if j == root:
            k, l, kind = s1, s2, "improper"
        else:
            k = par[j]
            first = children[j][0]
            if i == first:
                l, kind = proper_l(j, k), "proper"
            else:
                l, kind = first, "improper"
        if i in cg_index:
            kind = "cg"
        zmat.append([i, j, k, l])
        bond_ij.append((i, j))
        angle_ijk.append((i, j, k))
        torsions.append((i, j, k, l))
        kinds.append(kind)
    # CG torsions are the expected dihedrals (same value either direction)
    cg_rows = [None] * len(cg)
    for t, (i, *_rest) in enumerate(torsions):
        if i in cg_index:
            ci = cg_index[i]
            assert set(torsions[t]) == set(cg[ci]) and torsions[t][2] in cg[ci][1:3]
            cg_rows[ci] = t
    fine_rows = [t for t, kd in enumerate(kinds) if kd != "cg"]

    return ZMatrix(
        n_atoms=n, cg_dihedrals=cg, seeds=seeds, ring_closures=ring_closures, parent=par,
        placement_order=order, rows=np.array(zmat, dtype=np.int64), bonds=bond_ij, angles=angle_ijk,
        torsions=torsions, torsion_kind=kinds, cg_rows=cg_rows, fine_rows=fine_rows,
    )
