"""Internal coordinates: round trips, Jacobians against autograd, mdtraj dihedral convention, chirality, rings."""

import math
from importlib import resources

import mdtraj as md
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_cgflow.coordinates import InternalCoordinates, LinearCoordinates, dihedral
from openmm_cgflow_plugin.cgspace import wrap_angle


def _data(name):
    return str(resources.files("openmm_cgflow").joinpath("data", name))


def _load(name):
    pdb = app.PDBFile(_data(name))
    xyz = np.array(pdb.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return pdb, xyz


def _atom(topology, res_name, atom_name):
    hits = [a.index for a in topology.atoms() if a.residue.name == res_name and a.name == atom_name]
    assert len(hits) == 1, (res_name, atom_name)
    return hits[0]


def _phi_psi(topology, res):
    t = topology
    phi = (_atom(t, "ACE", "C"), _atom(t, res, "N"), _atom(t, res, "CA"), _atom(t, res, "C"))
    psi = (_atom(t, res, "N"), _atom(t, res, "CA"), _atom(t, res, "C"), _atom(t, "NME", "N"))
    return phi, psi


@pytest.fixture(scope="module")
def ala():
    pdb, xyz = _load("alanine-dipeptide.pdb")
    phi, psi = _phi_psi(pdb.topology, "ALA")
    return pdb, xyz, InternalCoordinates.from_topology(pdb.topology, xyz, [phi, psi]), (phi, psi)


@pytest.fixture(scope="module")
def pro():
    pdb, xyz = _load("proline-dipeptide.pdb")
    phi, psi = _phi_psi(pdb.topology, "PRO")
    return pdb, xyz, InternalCoordinates.from_topology(pdb.topology, xyz, [phi, psi]), (phi, psi)


def _random_internal(ic, batch, gen, scale=0.5):
    """Random (fine, s) near the reference: z-scores ~ scale * N(0, 1), circular and CG angles uniform."""
    fine = scale * torch.randn(batch, ic.n_fine, generator=gen, dtype=torch.float64)
    unif = (torch.rand(batch, ic.n_fine, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    fine = torch.where(ic.circular, unif, fine)
    s = (torch.rand(batch, ic.n_cg, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    return fine, s


def _random_rotation(gen):
    q = torch.randn(4, generator=gen, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)]),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)]),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]),
        ]
    )


def _kabsch_rmsd(a, b):
    """RMSD (nm) of a [n, 3] onto b [n, 3] after optimal rigid superposition (rotation only, no reflection)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(((a @ rot - b) ** 2).sum(1).mean()))


def _perturbed_cartesian(xyz, batch, gen, sigma=0.01):
    x = torch.as_tensor(xyz)[None] + sigma * torch.randn(batch, *xyz.shape, generator=gen, dtype=torch.float64)
    out = []
    for b in range(batch):
        rot = _random_rotation(gen)
        out.append(x[b] @ rot.T + torch.randn(3, generator=gen, dtype=torch.float64))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("mol", ["ala", "pro"])
def test_counts_and_cg_torsions(mol, request):
    pdb, xyz, ic, (phi, psi) = request.getfixturevalue(mol)
    n = pdb.topology.getNumAtoms()
    assert ic.n_atoms == n and ic.n_cg == 2
    assert ic.n_fine + ic.n_cg == 3 * n - 6
    assert ic.circular.shape == (ic.n_fine,) and ic.circular.dtype == torch.bool
    assert ic.cg_periodic == [True, True]
    assert ic.zmatrix.shape == (n, 4) and sorted(ic.zmatrix[:, 0].tolist()) == list(range(n))
    # every CG dihedral is one Z-matrix row (either direction)
    rows = {tuple(r) for r in ic.zmatrix.tolist()}
    for q in (phi, psi):
        assert tuple(q) in rows or tuple(q[::-1]) in rows
    # seeds: central bond of phi
    assert ic.seeds == (phi[2], phi[1], phi[3])
    if mol == "pro":
        assert len(ic.ring_closures) == 1  # the pyrrolidine ring: one bond is not a coordinate
    else:
        assert ic.ring_closures == []


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("mol", ["ala", "pro"])
def test_internal_cartesian_internal(mol, request):
    _, _, ic, _ = request.getfixturevalue(mol)
    gen = torch.Generator().manual_seed(1)
    fine, s = _random_internal(ic, 64, gen)
    x, log_det = ic.to_cartesian(fine, s)
    assert x.shape == (64, ic.n_atoms, 3) and x.dtype == torch.float64 and log_det.shape == (64,)
    fine2, s2, log_det2 = ic.to_internal(x)
    d = fine2 - fine
    d = torch.where(ic.circular, wrap_angle(d), d)
    assert d.abs().max() < 1e-10
    assert wrap_angle(s2 - s).abs().max() < 1e-10
    assert (log_det + log_det2).abs().max() < 1e-10
    assert bool(((fine2.abs() <= math.pi) | ~ic.circular).all())


@pytest.mark.parametrize("mol", ["ala", "pro"])
def test_cartesian_internal_cartesian(mol, request):
    _, xyz, ic, _ = request.getfixturevalue(mol)
    gen = torch.Generator().manual_seed(2)
    x = _perturbed_cartesian(xyz, 16, gen)
    fine, s, _ = ic.to_internal(x)
    x2, _ = ic.to_cartesian(fine, s)
    for b in range(len(x)):
        assert _kabsch_rmsd(x2[b].numpy(), x[b].numpy()) < 1e-8
    # the reference structure maps to fine = 0 for every non-circular coordinate
    fine_ref, _, _ = ic.to_internal(torch.as_tensor(xyz)[None])
    assert fine_ref[0][~ic.circular].abs().max() < 1e-12


# --------------------------------------------------------------------------------------------- Jacobian
def _rot_spherical(alpha, beta, gamma):
    """R = Rz(beta) Ry(alpha - pi/2) Rx(gamma): maps +x to the unit vector with polar angle alpha, azimuth beta."""
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)

    def rz(a):
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack([torch.stack([c, -s, zero]), torch.stack([s, c, zero]), torch.stack([zero, zero, one])])

    def ry(a):
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack([torch.stack([c, zero, s]), torch.stack([zero, one, zero]), torch.stack([-s, zero, c])])

    def rx(a):
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, c, -s]), torch.stack([zero, s, c])])

    return rz(beta) @ ry(alpha - math.pi / 2) @ rx(gamma)


@pytest.mark.parametrize("mol", ["ala", "pro"])
def test_log_det_matches_autograd(mol, request):
    _, _, ic, _ = request.getfixturevalue(mol)
    gen = torch.Generator().manual_seed(3)
    fine, s = _random_internal(ic, 3, gen, scale=1.0)
    nf, nc = ic.n_fine, ic.n_cg

    def full_map(v):
        x, _ = ic.to_cartesian(v[None, :nf], v[None, nf : nf + nc])
        t, (alpha, beta, gamma) = v[nf + nc : nf + nc + 3], v[nf + nc + 3 :]
        return (x[0] @ _rot_spherical(alpha, beta, gamma).T + t).reshape(-1)

    for b in range(3):
        rigid = torch.tensor([0.3, -1.2, 2.0, 0.4 + 0.8 * b, 1.0 - 0.7 * b, 0.5 + b], dtype=torch.float64)
        v = torch.cat([fine[b], s[b], rigid])
        jac = torch.autograd.functional.jacobian(full_map, v)
        assert jac.shape == (3 * ic.n_atoms, 3 * ic.n_atoms)
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        _, log_det = ic.to_cartesian(fine[b : b + 1], s[b : b + 1])
        expected = log_det[0] + torch.log(torch.sin(rigid[3]))  # rotation measure sin(polar angle)
        assert abs(float(logabs - expected)) < 1e-8, (float(logabs), float(expected))
        # to_internal of the rotated, translated structure gives minus the same log-det
        x = full_map(v).reshape(1, ic.n_atoms, 3)
        _, _, ld_inv = ic.to_internal(x)
        assert abs(float(ld_inv[0] + log_det[0])) < 1e-9


def test_log_det_is_differentiable(ala):
    _, _, ic, _ = ala
    gen = torch.Generator().manual_seed(4)
    fine, s = _random_internal(ic, 4, gen)
    fine.requires_grad_(True)
    x, log_det = ic.to_cartesian(fine, s)
    (x.pow(2).sum() + log_det.sum()).backward()
    assert fine.grad is not None and torch.isfinite(fine.grad).all()


# --------------------------------------------------------------------------------------------- conventions
def test_phi_psi_match_mdtraj(ala):
    pdb, _, ic, (phi, psi) = ala
    gen = torch.Generator().manual_seed(5)
    fine, s = _random_internal(ic, 32, gen, scale=0.3)
    x, _ = ic.to_cartesian(fine, s)
    # mdtraj works in float32: round the positions to float32 first, compare at float32 precision
    x32 = x.to(torch.float32).to(torch.float64)
    traj = md.Trajectory(x32.numpy(), md.Topology.from_openmm(pdb.topology))
    idx_phi, ang_phi = md.compute_phi(traj)
    idx_psi, ang_psi = md.compute_psi(traj)
    assert [tuple(q) for q in idx_phi.tolist()] == [phi]
    assert [tuple(q) for q in idx_psi.tolist()] == [psi]
    _, s32, _ = ic.to_internal(x32)
    ref = np.concatenate([ang_phi, ang_psi], axis=1)
    assert np.abs(np.angle(np.exp(1j * (s32.numpy() - ref)))).max() < 1e-5
    # float64: mdtraj's own formula (geometry/dihedral.py _dihedral) reimplemented in numpy, to 1e-10
    xn = x.numpy()
    for q, col in ((phi, 0), (psi, 1)):
        b1, b2, b3 = (xn[:, q[1]] - xn[:, q[0]]), (xn[:, q[2]] - xn[:, q[1]]), (xn[:, q[3]] - xn[:, q[2]])
        c1, c2 = np.cross(b2, b3), np.cross(b1, b2)
        ang = np.arctan2((b1 * c1).sum(-1) * (b2 * b2).sum(-1) ** 0.5, (c1 * c2).sum(-1))
        assert np.abs(np.angle(np.exp(1j * (ang - s[:, col].numpy())))).max() < 1e-10
    # and the reference structure's phi/psi equal mdtraj's from the PDB file directly
    t0 = md.load(_data("alanine-dipeptide.pdb"))
    _, s0, _ = ic.to_internal(torch.as_tensor(t0.xyz.astype(np.float64)))
    assert np.abs(np.angle(np.exp(1j * (s0[0].numpy() - [md.compute_phi(t0)[1][0, 0], md.compute_psi(t0)[1][0, 0]])))).max() < 1e-5


def test_dihedral_reversal_symmetry():
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(4, 10, 3, generator=gen, dtype=torch.float64)
    assert torch.allclose(dihedral(p[0], p[1], p[2], p[3]), dihedral(p[3], p[2], p[1], p[0]), atol=1e-12)


def test_chirality(ala, pro):
    for _, xyz, ic, _ in (ala, pro):
        x = torch.as_tensor(xyz)[None]
        assert len(ic.chiral_centres) == 1
        assert ic.chirality_ok(x).tolist() == [True]
        mirror = x * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
        assert ic.chirality_ok(mirror).tolist() == [False]
        assert ic.chirality_ok(torch.cat([x, mirror, x])).tolist() == [True, False, True]
        # samples generated near the reference keep the handedness
        fine, s = _random_internal(ic, 8, torch.Generator().manual_seed(7), scale=0.3)
        assert ic.chirality_ok(ic.to_cartesian(fine, s)[0]).all()


# --------------------------------------------------------------------------------------------- variants
def test_single_cg_coordinate(ala):
    pdb, xyz, _, (phi, psi) = ala
    ic = InternalCoordinates.from_topology(pdb.topology, xyz, [phi])
    assert ic.n_cg == 1 and ic.n_fine == 3 * ic.n_atoms - 7
    gen = torch.Generator().manual_seed(8)
    fine, s = _random_internal(ic, 8, gen)
    x, _ = ic.to_cartesian(fine, s)
    fine2, s2, _ = ic.to_internal(x)
    assert wrap_angle(s2 - s).abs().max() < 1e-10
    # psi is now a circular fine coordinate
    names, cg_names = ic.coordinate_names()
    assert len(cg_names) == 1 and "ACE1:C" in cg_names[0]
    # a CG dihedral listed the other way round gives the same value
    ic_rev = InternalCoordinates.from_topology(pdb.topology, xyz, [phi[::-1]])
    _, s_rev, _ = ic_rev.to_internal(x)
    assert torch.allclose(s_rev, s2, atol=1e-12)


def test_psi_first_and_custom_scales(ala):
    pdb, xyz, ic_default, (phi, psi) = ala
    gen = torch.Generator().manual_seed(9)
    x = _perturbed_cartesian(xyz, 4, gen)
    _, s_def, ld_def = ic_default.to_internal(x)
    ic_psi = InternalCoordinates.from_topology(pdb.topology, xyz, [psi, phi])
    assert ic_psi.seeds == (psi[2], psi[1], psi[3])
    _, s_psi, _ = ic_psi.to_internal(x)
    assert torch.allclose(s_psi, s_def.flip(1), atol=1e-12)
    x2, _ = ic_psi.to_cartesian(*ic_psi.to_internal(x)[:2])
    assert _kabsch_rmsd(x2[0].numpy(), x[0].numpy()) < 1e-8
    ic = InternalCoordinates.from_topology(pdb.topology, xyz, [phi, psi], bond_scale=0.01, angle_scale=0.1)
    _, s, ld = ic.to_internal(x)
    assert torch.allclose(s, s_def, atol=1e-12)
    # log-dets differ by the change of scales only: (n-1) log 2 (bonds) + (n-2) log(2/3) (angles)
    n = ic.n_atoms
    assert torch.allclose(ld_def - ld, torch.full_like(ld, (n - 1) * math.log(2) + (n - 2) * math.log(2 / 3)), atol=1e-9)


def test_proline_energy_of_reconstruction(pro):
    """The shipped proline dipeptide builds an amber96/OBC System; a round trip keeps its energy."""
    pdb, xyz, ic, _ = pro
    ff = app.ForceField("amber96.xml", "amber96_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))

    def energy(pos):
        ctx.setPositions(pos * unit.nanometer)
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    e0 = energy(xyz)
    assert e0 < 0  # minimised structure
    fine, s, _ = ic.to_internal(torch.as_tensor(xyz)[None])
    x, _ = ic.to_cartesian(fine, s)
    assert abs(energy(x[0].numpy()) - e0) < 1e-6


# --------------------------------------------------------------------------------------------- errors
def test_errors(ala):
    pdb, xyz, ic, (phi, psi) = ala
    bonds = [(b[0].index, b[1].index) for b in pdb.topology.bonds()]
    n = len(xyz)
    bad = (phi[0], phi[1], phi[2], psi[3])  # CA and N(NME) are not bonded
    with pytest.raises(ValueError, match="not a bonded chain"):
        InternalCoordinates(bonds, n, xyz, [bad])
    with pytest.raises(ValueError, match="outside"):
        InternalCoordinates(bonds, n, xyz, [(0, 1, 4, n)])
    with pytest.raises(ValueError, match="shape"):
        InternalCoordinates(bonds, n, xyz[:-1], [phi])
    with pytest.raises(ValueError, match="not connected"):
        InternalCoordinates([b for b in bonds if set(b) != {psi[2], psi[3]}], n, xyz, [phi])
    x = torch.as_tensor(xyz)[None].repeat(3, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        ic.to_internal(x[:, :-1])
    with pytest.raises(ValueError, match="shape"):
        ic.to_internal(x[0])
    x_nan = x.clone()
    x_nan[2, 5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\]"):
        ic.to_internal(x_nan)
    with pytest.raises(ValueError, match="shape"):
        ic.to_cartesian(torch.zeros(2, ic.n_fine + 1, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        ic.to_cartesian(torch.zeros(2, ic.n_fine, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))


# --------------------------------------------------------------------------------------------- Mueller-Brown
def test_linear_coordinates():
    lc = LinearCoordinates()
    assert (lc.n_atoms, lc.n_fine, lc.n_cg) == (1, 1, 1)
    assert lc.circular.tolist() == [False] and lc.cg_periodic == [False]
    fine = torch.tensor([[0.3], [-1.0]], dtype=torch.float64)
    s = torch.tensor([[-0.5], [0.2]], dtype=torch.float64)
    x, ld = lc.to_cartesian(fine, s)
    assert x.shape == (2, 1, 3) and torch.all(x[:, 0, 2] == 0)
    assert torch.allclose(x[:, 0, 0] + x[:, 0, 1], fine[:, 0]) and torch.allclose(x[:, 0, 0] - x[:, 0, 1], s[:, 0])
    jac = torch.autograd.functional.jacobian(
        lambda v: lc.to_cartesian(v[None, :1], v[None, 1:])[0][0, 0, :2], torch.tensor([0.3, -0.5], dtype=torch.float64)
    )
    assert torch.allclose(ld, torch.full((2,), float(torch.linalg.slogdet(jac)[1]), dtype=torch.float64))
    assert abs(float(ld[0]) - math.log(0.5)) < 1e-15
    f2, s2, ld2 = lc.to_internal(x)
    assert torch.allclose(f2, fine) and torch.allclose(s2, s) and torch.allclose(ld2, -ld)
    assert lc.chirality_ok(x).all()
    with pytest.raises(ValueError):
        lc.to_internal(torch.zeros(2, 2, 3, dtype=torch.float64))
