"""OpenMM forces from a ``pmf.pt``: CG-walker Systems, the all-atom PMF bias, and a CMAP grid export.

Units: positions nm (1 rad of a CG dihedral is read as 1 nm for walkers), energies kJ/mol (the PMF in kT
times kT of the file's temperature), temperature K.

* :func:`cg_walker_system` builds a System of W independent walkers in CG space driven by the mean PMF,
  each walker P = ceil(d / 3) particles whose x, y, z carry its d CG coordinates in order
  (:func:`walker_positions` packs, :func:`walker_cg` unpacks; any d >= 1).
* :func:`add_pmf_bias` adds ``factor * A(s(x))`` (kT -> kJ/mol) to an all-atom System, s(x) the CG
  dihedrals from atom positions; ``factor = -1`` flattens the landscape along s.
* :func:`pmf_cmap_force` exports a two-dihedral PMF as OpenMM's own ``CMAPTorsionForce`` (bicubic spline
  on an n x n grid), for users without torch in their simulation.

The walker force and the bias are built through :func:`openmm_cgflow_plugin.backends.make_force`
(``backend="torch"``: TorchForce; ``"python"``: openmm.PythonForce; None: the default backend).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import openmm
import openmm.app as app

from .backends import force_module, make_force, plugin_forces
from .cgspace import TWO_PI, kT_kJmol, wrap_periodic
from .files import atomic_write
from .modules import CGWalkerEnergy, CGWalkerEnergyPBC, DihedralBias, DihedralBiasPBC, walker_particles
from .pmf import load_pmf

__all__ = ["cg_walker_system", "walker_mass", "walker_positions", "walker_cg", "walker_particles", "add_pmf_bias",
           "pmf_cmap_force", "cmap_grid", "BIAS_PARAMETER", "find_pmf_module", "walker_force", "bonded_pairs",
           "check_bonded_chains"]

#: Default name of the global parameter holding the bias factor of :func:`add_pmf_bias` (Context.setParameter).
BIAS_PARAMETER = "cgflow_bias_factor"


def walker_mass(temperature: float) -> float:
    """Default walker mass in amu: m = kT / (1 nm/ps)^2, so the thermal velocity is 1 rad/ps (or 1 nm/ps).

    With this mass, time is measured in units where an angular frequency sqrt(A'') (A'' the PMF's
    curvature in kT/rad^2) is in 1/ps, independent of the temperature."""
    return kT_kJmol(temperature)


def walker_positions(s, periodic: Sequence[bool], unused=None) -> np.ndarray:
    """Particle positions [W * P, 3] (nm) of W walkers at CG coordinates ``s`` [W, d] (periodic ones wrapped into
    [-pi, pi)), P = ceil(d / 3): walker w's coordinates fill the x, y, z of its particles w P ... w P + P - 1 in
    order. The 3 P - d unused slots (no force acts on them) are 0, or taken from ``unused`` [W * P, 3] (e.g. the
    current positions, to leave those slots where they are)."""
    s = wrap_periodic(np.asarray(s, dtype=np.float64), periodic)
    if s.ndim != 2 or s.shape[1] != len(periodic):
        raise ValueError(f"CG coordinates must have shape [W, {len(periodic)}], got {s.shape}")
    w, d = s.shape
    p = walker_particles(d)
    flat = np.zeros((w, 3 * p)) if unused is None else np.array(unused, dtype=np.float64).reshape(w, 3 * p)
    flat[:, :d] = s
    return flat.reshape(w * p, 3)


def walker_cg(positions, periodic: Sequence[bool]) -> np.ndarray:
    """CG coordinates [W, d] (periodic ones wrapped into [-pi, pi)) of walker particle positions [W * P, 3] nm,
    d = len(periodic): the inverse of :func:`walker_positions`."""
    pos = np.asarray(positions, dtype=np.float64)
    d = len(periodic)
    p = walker_particles(d)
    if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] % p:
        raise ValueError(f"walker positions must be [W * {p}, 3] for {d} CG coordinates, got {pos.shape}")
    return wrap_periodic(pos.reshape(-1, 3 * p)[:, :d], periodic)


def cg_walker_system(pmf, n_walkers: int, mass: Optional[float] = None, backend: Optional[str] = None):
    """(System, Topology) of ``n_walkers`` independent CG walkers driven by the ensemble-mean PMF.

    Each walker is P = ceil(d / 3) particles (one residue "CG" of P atoms) whose x, y, z hold its d CG
    coordinates (radians or nm) in order (:func:`walker_positions`); the unused slots feel no force. If every
    CG coordinate is periodic the System has a cubic periodic box of side 2 pi (nm = rad) and the walker force
    uses PBC; otherwise there is no box and periodic coordinates are wrapped inside the module. ``mass`` in amu
    per particle, i.e. per CG coordinate (default :func:`walker_mass`). No CMMotionRemover: walkers are
    independent. ``backend``: "torch", "python" or None (see :mod:`openmm_cgflow_plugin.backends`).
    """
    pmf = load_pmf(pmf)
    n_walkers = int(n_walkers)
    if n_walkers < 1:
        raise ValueError("n_walkers must be >= 1")
    m = walker_mass(pmf.temperature) if mass is None else float(mass)
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"walker mass must be positive, got {mass!r}")
    per_walker = walker_particles(pmf.n_cg)
    system = openmm.System()
    for _ in range(n_walkers * per_walker):
        system.addParticle(m)
    pbc = all(pmf.periodic)
    if pbc:
        system.setDefaultPeriodicBoxVectors(openmm.Vec3(TWO_PI, 0, 0), openmm.Vec3(0, TWO_PI, 0),
                                            openmm.Vec3(0, 0, TWO_PI))
    system.addForce(walker_force(pmf, uses_pbc=pbc, backend=backend))
    topology = app.Topology()
    chain = topology.addChain()
    names = ["W"] if per_walker == 1 else [f"W{k}" for k in range(per_walker)]
    for w in range(n_walkers):
        residue = topology.addResidue("CG", chain)
        for name in names:
            topology.addAtom(name, None, residue)
    if pbc:
        topology.setPeriodicBoxVectors(system.getDefaultPeriodicBoxVectors())
    return system, topology


def walker_force(pmf, uses_pbc: bool, force_group: Optional[int] = None, backend: Optional[str] = None) -> openmm.Force:
    """The force of :func:`cg_walker_system`: kT * sum over walkers of the mean PMF (kJ/mol).

    ``pmf`` a loaded :class:`~openmm_cgflow_plugin.pmf.PMF`; ``uses_pbc`` whether the System has the periodic
    box of side 2 pi (then the module takes the box vectors); ``backend`` as in :func:`cg_walker_system`.
    """
    cls = CGWalkerEnergyPBC if uses_pbc else CGWalkerEnergy
    return make_force(cls(pmf.module, pmf.n_cg, pmf.periodic, pmf.kT), uses_pbc=uses_pbc, force_group=force_group,
                      backend=backend)


def find_pmf_module(system: openmm.System):
    """The PMF TorchScript module inside the first plugin force of ``system`` (None if there is none)."""
    indices = plugin_forces(system)
    if not indices:
        return None
    return force_module(system.getForce(indices[0])).pmf


def bonded_pairs(system: openmm.System, topology: Optional[app.Topology] = None) -> set:
    """Bonded atom pairs {(i, j), i < j} (0-based): the ``topology``'s bonds when given (and it has any), else
    the System's ``HarmonicBondForce`` bonds and constraints. Empty when neither knows any bond."""
    pairs = set()
    if topology is not None:
        pairs = {tuple(sorted((a.index, b.index))) for a, b in topology.bonds()}
        if pairs:
            return pairs
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for k in range(force.getNumBonds()):
                i, j = force.getBondParameters(k)[:2]
                pairs.add(tuple(sorted((int(i), int(j)))))
    for k in range(system.getNumConstraints()):
        i, j, _ = system.getConstraintParameters(k)
        pairs.add(tuple(sorted((int(i), int(j)))))
    return pairs


def check_bonded_chains(system: openmm.System, quads, topology: Optional[app.Topology] = None) -> None:
    """ValueError unless each atom quadruple (a, b, c, d) is a bonded chain a-b-c-d (a proper dihedral), by the
    bonds of :func:`bonded_pairs`; no check when the System and topology carry no bonds at all."""
    pairs = bonded_pairs(system, topology)
    if not pairs:
        return
    source = "the topology's bonds" if topology is not None and any(True for _ in topology.bonds()) else \
        "the System's HarmonicBondForce bonds and constraints"
    for q in quads:
        missing = [f"{i}-{j}" for i, j in zip(q[:-1], q[1:]) if tuple(sorted((i, j))) not in pairs]
        if missing:
            raise ValueError(f"cg_atoms {list(q)} is not a bonded chain in this System: atoms {', '.join(missing)} are "
                             f"not bonded (checked against {source}); give each dihedral's four atoms in bond order "
                             "(e.g. the file's cg_atoms for the same molecule), or check_bonds=False for an "
                             "improper/non-bonded quadruple you mean")


def add_pmf_bias(system: openmm.System, pmf_path, factor: float = -1.0, temperature=None,
                 cg_atoms: Optional[Sequence[Sequence[int]]] = None, force_group: Optional[int] = None,
                 parameter: str = BIAS_PARAMETER, uses_pbc: Optional[bool] = None,
                 backend: Optional[str] = None, topology: Optional[app.Topology] = None,
                 check_bonds: bool = True, cap_kT: Optional[float] = None) -> openmm.Force:
    """Add ``factor * kT * A(s(x))`` (A capped at ``cap_kT``, if given) to an all-atom System and return the force.

    Args:
        system: the all-atom ``openmm.System`` (periodic or not); modified in place.
        pmf_path: a ``pmf.pt`` (path, or a loaded :class:`~openmm_cgflow_plugin.pmf.PMF`).
        factor: scale of the PMF; -1 flattens the landscape along s (enhanced sampling), +1 adds it.
            Stored as the global parameter ``parameter`` (change it with ``context.setParameter``).
        temperature: K of the simulation, checked against the file's (the PMF is in kT at that temperature).
        cg_atoms: atom quadruples (0-based) of the CG dihedrals in *this* System; default: the file's.
        force_group: optional force group of the bias (handy for reading the bias energy per frame).
        parameter: name of the global parameter holding ``factor``.
        uses_pbc: take the dihedrals' bond vectors by the minimum-image convention of the periodic box.
            None (default): if ``system.usesPeriodicBoundaryConditions()``, i.e. if a force already in the
            System is periodic, so add the bias after the force field's forces (or pass True).
        backend: "torch" (TorchForce), "python" (openmm.PythonForce; serialisable with XmlSerializer) or
            None (the default: "torch" when openmm-torch is installed).
        topology: optional ``Topology`` of the System; its bonds are used for the bonded-chain check.
        check_bonds: refuse a quadruple that is not a bonded chain a-b-c-d (by the topology's bonds, else the
            System's HarmonicBondForce bonds and constraints; no check if neither has bonds).
        cap_kT: use min(A, cap_kT) (kT, on the file's scale of A): where the PMF rates a region above the cap
            the bias is flat, so a flattening bias (factor -1) does not push the molecule into regions that an
            extrapolated PMF overrates, and reweighting factors stay below exp(cap_kT). Pass the same cap to
            :func:`~openmm_cgflow_plugin.reweight.reweight`. Useful for d >= 3, where most of CG space is far
            from any data.
    Returns the force (already added to ``system``).
    """
    pmf = load_pmf(pmf_path, temperature=temperature)
    if not all(pmf.periodic):
        raise ValueError(f"the all-atom bias needs dihedral CG coordinates; this PMF's coordinates {pmf.cg_names} "
                         f"are not all periodic (Mueller-Brown-like PMFs run as CG walkers only)")
    quads = [[int(i) for i in q] for q in (cg_atoms if cg_atoms is not None else pmf.cg_atoms)]
    if not quads:
        raise ValueError("this PMF file carries no cg_atoms; pass cg_atoms (one atom quadruple per CG dihedral)")
    if len(quads) != pmf.n_cg or any(len(q) != 4 for q in quads):
        raise ValueError(f"CG dimension mismatch: the PMF has {pmf.n_cg} CG coordinates {pmf.cg_names} but cg_atoms "
                         f"has {len(quads)} entries {quads}; give one atom quadruple per CG coordinate")
    n = system.getNumParticles()
    bad = [q for q in quads if any(i < 0 or i >= n for i in q) or len(set(q)) != 4]
    if bad:
        raise ValueError(f"cg_atoms {bad} are not four distinct atom indices of this System (0..{n - 1})")
    if check_bonds:
        check_bonded_chains(system, quads, topology)
    factor = float(factor)
    if not math.isfinite(factor):
        raise ValueError(f"factor must be finite, got {factor}")
    pbc = system.usesPeriodicBoundaryConditions() if uses_pbc is None else bool(uses_pbc)
    cap = math.inf if cap_kT is None else float(cap_kT)
    if math.isnan(cap):
        raise ValueError("cap_kT must be a number (kT) or None")
    cls = DihedralBiasPBC if pbc else DihedralBias
    module = cls(pmf.module, quads, pmf.kT, cap)
    force = make_force(module, uses_pbc=pbc, global_parameters={str(parameter): factor}, force_group=force_group,
                       backend=backend)
    system.addForce(force)
    return force


def cmap_grid(pmf, n_grid: int = 24) -> np.ndarray:
    """Mean PMF (kT) on OpenMM's CMAP grid: [n_grid, n_grid] with entry [i, j] at angles
    (2 pi i / n, 2 pi j / n) radians, as CMAPTorsionForce.addMap documents (checked against OpenMM 8.6)."""
    pmf = load_pmf(pmf)
    a = TWO_PI * np.arange(n_grid) / n_grid
    g1, g2 = np.meshgrid(a, a, indexing="ij")
    # The pmf.pt contract defines A on [-pi, pi): wrap the grid angles (pi..2 pi -> -pi..0) before evaluating.
    points = wrap_periodic(np.stack([g1.ravel(), g2.ravel()], axis=1), pmf.periodic)
    return pmf.mean(points).reshape(n_grid, n_grid)


def pmf_cmap_force(pmf_path, n_grid: int = 24, factor: float = 1.0, temperature=None,
                   cg_atoms: Optional[Sequence[Sequence[int]]] = None, xml_path: Optional[str] = None
                   ) -> openmm.CMAPTorsionForce:
    """The mean PMF of a two-dihedral ``pmf.pt`` as an ``openmm.CMAPTorsionForce``, energy factor * kT * A.

    OpenMM interpolates the ``n_grid`` x ``n_grid`` map with natural bicubic splines; the grid error
    falls roughly as h^4 (h = 2 pi / n_grid). ``xml_path`` also saves the force with
    ``openmm.XmlSerializer`` so it can be added to a System without torch
    (``system.addForce(XmlSerializer.deserialize(open(path).read()))``). Other arguments as in
    :func:`add_pmf_bias`.
    """
    pmf = load_pmf(pmf_path, temperature=temperature)
    if pmf.n_cg != 2 or not all(pmf.periodic):
        raise ValueError(f"a CMAP needs exactly two dihedral CG coordinates; this PMF has {pmf.cg_names} "
                         f"(periodic {pmf.periodic})")
    quads = [[int(i) for i in q] for q in (cg_atoms if cg_atoms is not None else pmf.cg_atoms)]
    if len(quads) != 2 or any(len(q) != 4 for q in quads):
        raise ValueError("cg_atoms must be two atom quadruples (the file has none; pass cg_atoms)")
    n_grid = int(n_grid)
    if n_grid < 4:
        raise ValueError("n_grid must be >= 4")
    grid = cmap_grid(pmf, n_grid) * pmf.kT * float(factor)   # kJ/mol, [i (first angle), j (second)]
    force = openmm.CMAPTorsionForce()
    # OpenMM: energy[i + size * j] is the energy at (first angle i, second angle j): Fortran order.
    force.addMap(n_grid, grid.ravel(order="F").tolist())
    force.addTorsion(0, *quads[0], *quads[1])
    if xml_path is not None:
        with atomic_write(xml_path, "w") as fh:
            fh.write(openmm.XmlSerializer.serialize(force))
    return force
