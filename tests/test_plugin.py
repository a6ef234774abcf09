"""openmm_cgflow_plugin inside real OpenMM Contexts with real TorchForces (Reference platform).

PMFs used here:

* ``analytic``: A(phi, psi) = 2 cos(phi - 1) + sin(psi) + 0.5 cos(phi + psi) kT, a pmf.pt written from a
  tiny scripted module (asymmetric, so sign and axis-order mistakes show);
* ``ensemble``: a small ensemble of MLPs fitted to that function here and written with ``save_pmf``;
* ``double_well``: a 1-D non-periodic A(s) = (s^2 - 1)^2 kT (Mueller-Brown-like CG walkers, no box).
"""

import math
import os
import subprocess
import sys
from typing import List, Tuple

import mdtraj as md
import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch
from torch import nn

from openmm_cgflow_plugin import (BIAS_PARAMETER, CGDynamics, CGReporter, CGSpace, add_pmf_bias,
                                  effective_sample_size, kT_kJmol, load_pmf, plot_pmf, pmf_cmap_force, read_cg_npz,
                                  reweight, reweighted_histogram, save_pmf, swap_pmf)
from openmm_cgflow_plugin.backends import force_backend, force_parameters, plugin_forces
from openmm_cgflow_plugin.modules import CGWalkerEnergy, CGWalkerEnergyPBC, DihedralBias
from openmm_cgflow.metrics import forward_kld

ALDP_QUADS = [[4, 6, 8, 14], [6, 8, 14, 16]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALDP_PDB = os.path.join(ROOT, "openmm_cgflow", "data", "alanine-dipeptide.pdb")
REFERENCE = openmm.Platform.getPlatformByName("Reference")


def analytic_A(phi, psi):
    """The analytic test PMF in kT (NumPy)."""
    return 2.0 * np.cos(phi - 1.0) + np.sin(psi) + 0.5 * np.cos(phi + psi)


class AnalyticPMF(nn.Module):
    """pmf.pt-contract module for A = 2 cos(phi - 1) + sin(psi) + 0.5 cos(phi + psi) kT (spread: 0.1 + |sin phi|)."""

    cg_names: List[str]
    periodic: List[bool]
    temperature: float
    cg_atoms: List[List[int]]

    def __init__(self, temperature: float = 300.0, cg_atoms=None):
        super().__init__()
        self.cg_names = ["phi", "psi"]
        self.periodic = [True, True]
        self.temperature = float(temperature)
        self.cg_atoms = [list(q) for q in (ALDP_QUADS if cg_atoms is None else cg_atoms)]

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        phi = s[:, 0]
        psi = s[:, 1]
        return 2.0 * torch.cos(phi - 1.0) + torch.sin(psi) + 0.5 * torch.cos(phi + psi)

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.forward(s), 0.1 + torch.abs(torch.sin(s[:, 0]))


class DoubleWellPMF(nn.Module):
    """1-D non-periodic A(s) = (s^2 - 1)^2 kT, spread 0.05 (s) ** 2."""

    cg_names: List[str]
    periodic: List[bool]
    temperature: float
    cg_atoms: List[List[int]]

    def __init__(self):
        super().__init__()
        self.cg_names = ["s"]
        self.periodic = [False]
        self.temperature = 1202.7
        self.cg_atoms = []

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        x = s[:, 0]
        return (x * x - 1.0) ** 2

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.forward(s), 0.05 * s[:, 0] ** 2


def save_module(module: nn.Module, path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


@pytest.fixture(scope="module")
def analytic(tmp_path_factory):
    return save_module(AnalyticPMF(), tmp_path_factory.mktemp("pmf") / "analytic.pt")


@pytest.fixture(scope="module")
def double_well(tmp_path_factory):
    return save_module(DoubleWellPMF(), tmp_path_factory.mktemp("pmf") / "double_well.pt")


class SmallEnsemble(nn.Module):
    """K MLPs on (cos, sin) features of periodic s: mean and standard deviation over the members, kT."""

    def __init__(self, n_models: int = 4, hidden: int = 16, d: int = 2):
        super().__init__()
        self.nets = nn.ModuleList([nn.Sequential(nn.Linear(2 * d, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                                 nn.Tanh(), nn.Linear(hidden, 1)) for _ in range(n_models)])

    def members(self, s: torch.Tensor) -> torch.Tensor:
        x = torch.cat([torch.cos(s), torch.sin(s)], dim=1)
        return torch.stack([net(x)[:, 0] for net in self.nets], dim=0)

    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a = self.members(s)
        return a.mean(dim=0), a.std(dim=0)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """A small ensemble (4 MLPs [16, 16]) fitted to the analytic function, written with save_pmf."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    s = (torch.rand(300, 2, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    target = torch.as_tensor(analytic_A(s[:, 0].numpy(), s[:, 1].numpy()))
    ens = SmallEnsemble().double()
    opt = torch.optim.Adam(ens.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = ((ens.members(s) - target) ** 2).mean()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("pmf") / "ensemble.pt"
    return save_pmf(ens, path, CGSpace(["phi", "psi"], [True, True], 300.0, ALDP_QUADS))


@pytest.fixture(scope="module")
def aldp_system():
    """Alanine dipeptide, amber96 + OBC, NoCutoff, no constraints (system, topology, positions nm, cg_atoms)."""
    import types

    import openmm.app as app

    pdb = app.PDBFile(ALDP_PDB)
    ff = app.ForceField("amber96.xml", "amber96_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    traj = md.Trajectory(positions[None].astype(np.float32), md.Topology.from_openmm(pdb.topology))
    cg_atoms = [[int(i) for i in md.compute_phi(traj)[0][0]], [int(i) for i in md.compute_psi(traj)[0][0]]]
    return types.SimpleNamespace(system=system, topology=pdb.topology, positions=positions, cg_atoms=cg_atoms)


def _context(system, integrator=None):
    return openmm.Context(system, integrator or openmm.VerletIntegrator(0.001), REFERENCE)


def _energy_forces(context, positions, groups=-1):
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return e, f


def _module_energy_forces(module, positions, *args):
    x = torch.tensor(np.asarray(positions, dtype=np.float64), requires_grad=True)
    e = module(x, *args)
    (g,) = torch.autograd.grad(e, x)
    return float(e.detach()), -g.numpy()


def _assert_close(actual, expected, rtol=1e-6):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    atol = rtol * max(1e-12, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def _angle_diff(a, b):
    return np.abs(np.mod(np.asarray(a) - np.asarray(b) + math.pi, 2 * math.pi) - math.pi)


# ------------------------------------------------------------------------------------------ imports
def test_plugin_imports_only_torch_openmm_numpy(analytic):
    code = ("import sys, openmm_cgflow_plugin; "
            "bad = [m for m in ('openmm_cgflow', 'matplotlib', 'mdtraj') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    # the user jobs (load a pmf.pt, CG walkers, all-atom bias with both backends) pull in no sampler code
    code = "\n".join([
        "import sys, numpy as np, openmm",
        "from openmm_cgflow_plugin import CGDynamics, add_pmf_bias, load_pmf",
        "pmf = load_pmf(sys.argv[1])",
        "dyn = CGDynamics(pmf, np.zeros((3, 2)), backend='python')",
        "dyn.simulation.step(2)",
        "system = openmm.System()",
        "[system.addParticle(12.0) for _ in range(5)]",
        "add_pmf_bias(system, pmf, cg_atoms=[[0, 1, 2, 3], [1, 2, 3, 4]], backend='python')",
        "add_pmf_bias(system, pmf, cg_atoms=[[0, 1, 2, 3], [1, 2, 3, 4]], backend='torch')",
        "bad = [m for m in sys.modules if m == 'openmm_cgflow' or m.startswith('openmm_cgflow.')]",
        "print(bad); sys.exit(1 if bad else 0)"])
    res = subprocess.run([sys.executable, "-c", code, analytic], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


# ---------------------------------------------------------------------------------- a) CG walkers
@pytest.mark.parametrize("which", ["analytic", "ensemble"])
def test_walker_torchforce_matches_module_and_autograd(which, request):
    path = request.getfixturevalue(which)
    rng = np.random.default_rng(1)
    s0 = rng.uniform(-math.pi, math.pi, size=(7, 2))
    dyn = CGDynamics(path, s0, seed=1)
    pmf = dyn.pmf
    pos = np.zeros((7, 3))
    pos[:, :2] = rng.uniform(-3 * math.pi, 3 * math.pi, size=(7, 2))   # inside and outside the box
    pos[:, 2] = rng.normal(size=7)                                      # ignored coordinate
    e, f = _energy_forces(dyn.context, pos)
    module = CGWalkerEnergyPBC(pmf.module, pmf.n_cg, pmf.periodic, pmf.kT)
    box = torch.eye(3, dtype=torch.float64) * 2 * math.pi
    e_ref, f_ref = _module_energy_forces(module, pos, box)
    _assert_close(e, e_ref)
    _assert_close(f, f_ref)
    # and the module is what it claims: kT * sum_w A(s_w)
    expected = pmf.kT * analytic_A(pos[:, 0], pos[:, 1]).sum()
    if which == "analytic":
        _assert_close(e, expected, rtol=1e-12)
    assert np.all(f[:, 2] == 0.0)
    assert dyn.energy_kT() == pytest.approx(e / pmf.kT, rel=1e-12)
    # the CPU platform runs the same TorchForce
    cpu = CGDynamics(path, s0, seed=1, platform="CPU")
    e_cpu, f_cpu = _energy_forces(cpu.context, pos)
    _assert_close(e_cpu, e_ref)
    _assert_close(f_cpu, f_ref, rtol=1e-5)     # the CPU platform accumulates forces in float32


def test_walker_torchforce_nonperiodic_1d(double_well):
    """A non-periodic PMF runs without a box (CGWalkerEnergy); forces are -kT A'(s) on the first coordinate."""
    s0 = np.array([[-1.3], [0.2], [0.9], [2.0]])
    dyn = CGDynamics(double_well, s0, seed=2)
    assert not dyn.simulation.system.usesPeriodicBoundaryConditions()
    pos = np.zeros((4, 3))
    pos[:, 0] = s0[:, 0]
    e, f = _energy_forces(dyn.context, pos)
    pmf = dyn.pmf
    e_ref, f_ref = _module_energy_forces(CGWalkerEnergy(pmf.module, 1, [False], pmf.kT), pos)
    _assert_close(e, e_ref)
    _assert_close(f, f_ref)
    x = s0[:, 0]
    _assert_close(f[:, 0], -pmf.kT * 4 * x * (x * x - 1), rtol=1e-9)
    assert np.all(f[:, 1:] == 0.0)


# ---------------------------------------------------------------------------- b) all-atom bias
@pytest.mark.parametrize("which", ["analytic", "ensemble"])
def test_allatom_bias_energy_forces_and_dihedrals(which, request, aldp_system):
    path = request.getfixturevalue(which)
    cg = aldp_system
    assert cg.cg_atoms == ALDP_QUADS
    pmf = load_pmf(path)
    plain = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(cg.system))
    biased = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(cg.system))
    add_pmf_bias(biased, path, factor=-1, temperature=300 * unit.kelvin, force_group=7)
    c_plain, c_biased = _context(plain), _context(biased)
    rng = np.random.default_rng(3)
    module = torch.jit.script(DihedralBias(pmf.module, ALDP_QUADS, pmf.kT))
    top = md.Topology.from_openmm(cg.topology)
    for _ in range(4):
        # positions representable in float32, so mdtraj (float32) sees exactly the same configuration
        x = (cg.positions + rng.normal(scale=0.02, size=cg.positions.shape)).astype(np.float32).astype(np.float64)
        # s(x) in the module == mdtraj's phi/psi (mdtraj computes in float32: ~2e-7 rad apart)
        s_module = module.cg(torch.as_tensor(x)).numpy()[0]
        traj = md.Trajectory(x[None].astype(np.float32), top)
        _, phi = md.compute_phi(traj)
        _, psi = md.compute_psi(traj)
        s_md = np.array([phi[0, 0], psi[0, 0]], dtype=np.float64)
        assert np.all(_angle_diff(s_module, s_md) < 1e-6), (s_module, s_md)
        # TorchForce (bias group alone) == module + autograd
        e_bias, f_bias = _energy_forces(c_biased, x, groups={7})
        e_ref, f_ref = _module_energy_forces(module, x, torch.tensor(-1.0, dtype=torch.float64))
        _assert_close(e_bias, e_ref)
        _assert_close(f_bias, f_ref)
        # total potential == U(x) - kT A(s(x))
        u_plain, f_plain = _energy_forces(c_plain, x)
        e_total, f_total = _energy_forces(c_biased, x)
        a = pmf.mean(s_module[None])[0]
        _assert_close(e_total, u_plain - pmf.kT * a)
        _assert_close(f_total, f_plain + f_ref)
    # the factor is a global parameter: +0.5 gives +0.5 kT A
    c_biased.setParameter(BIAS_PARAMETER, 0.5)
    e_half, _ = _energy_forces(c_biased, cg.positions, groups={7})
    s_ref = module.cg(torch.as_tensor(cg.positions)).numpy()
    _assert_close(e_half, 0.5 * pmf.kT * pmf.mean(s_ref)[0])


def test_allatom_bias_periodic_box_minimum_image(analytic, aldp_system):
    """In a periodic System the dihedrals are taken by minimum image: moving one atom by a box vector changes nothing."""
    cg = aldp_system
    system = openmm.System()
    for i in range(cg.system.getNumParticles()):
        system.addParticle(cg.system.getParticleMass(i))
    a, b, c = openmm.Vec3(2.0, 0, 0), openmm.Vec3(0.3, 2.2, 0), openmm.Vec3(-0.4, 0.5, 2.5)
    system.setDefaultPeriodicBoxVectors(a, b, c)
    periodic_force = openmm.CustomBondForce("0")      # stands in for a periodic force field (PME water ...)
    periodic_force.setUsesPeriodicBoundaryConditions(True)
    system.addForce(periodic_force)
    force = add_pmf_bias(system, analytic, factor=-1)
    assert force.usesPeriodicBoundaryConditions()      # detected from the System
    ctx = _context(system)
    x = cg.positions.copy()
    e0, f0 = _energy_forces(ctx, x)
    x_shift = x.copy()
    x_shift[8] += np.array([0.3, 2.2, 0.0]) - np.array([-0.4, 0.5, 2.5])   # CA moved by b - c
    e1, f1 = _energy_forces(ctx, x_shift)
    _assert_close(e1, e0, rtol=1e-9)
    _assert_close(f1, f0, rtol=1e-7)
    s = DihedralBias(load_pmf(analytic).module, ALDP_QUADS, 1.0).cg(torch.as_tensor(x)).numpy()
    _assert_close(e0, -load_pmf(analytic).kT * analytic_A(*s[0]), rtol=1e-9)
    # a bare System (no periodic force yet) is taken as non-periodic unless uses_pbc=True is passed
    bare = openmm.System()
    for i in range(cg.system.getNumParticles()):
        bare.addParticle(1.0)
    bare.setDefaultPeriodicBoxVectors(a, b, c)
    assert not add_pmf_bias(bare, analytic, factor=-1, force_group=1).usesPeriodicBoundaryConditions()
    assert add_pmf_bias(bare, analytic, factor=-1, uses_pbc=True, force_group=2).usesPeriodicBoundaryConditions()
    ctx = _context(bare)
    e_auto, _ = _energy_forces(ctx, x_shift, groups={1})
    e_pbc, _ = _energy_forces(ctx, x_shift, groups={2})
    _assert_close(e_pbc, e0, rtol=1e-9)
    assert abs(e_auto - e0) > 1e-3                      # without minimum image the shifted atom matters


# ------------------------------------------------------------------------------------- c) wrapping
def test_walker_wrapping_across_the_box_edge(analytic):
    dyn = CGDynamics(analytic, np.zeros((1, 2)), seed=3)
    psi = 0.7
    eps = 1e-7
    e_lo, f_lo = _energy_forces(dyn.context, [[-math.pi + eps, psi, 0.0]])
    e_hi, f_hi = _energy_forces(dyn.context, [[math.pi - eps, psi, 0.0]])
    kT = dyn.pmf.kT
    # A is smooth across phi = +-pi: the two sides differ by O(eps), forces agree to O(eps)
    assert abs(e_lo - e_hi) <= 2 * eps * np.max(np.abs(f_lo)) + 1e-12 * kT
    np.testing.assert_allclose(f_lo, f_hi, atol=10 * eps * kT)
    dA_dphi = -2.0 * math.sin(-math.pi - 1.0) - 0.5 * math.sin(-math.pi + psi)
    assert f_lo[0, 0] == pytest.approx(-kT * dA_dphi, rel=1e-5)
    # positions outside [-pi, pi) give the energy and forces of the wrapped ones
    rng = np.random.default_rng(4)
    s = rng.uniform(-math.pi, math.pi, size=(5, 2))
    e_in, f_in = _energy_forces(dyn.context, [[*s[0], 0.0]])
    for shift in [(2, 0), (-1, 0), (0, 3), (-4, 5), (17, -9)]:
        p = [[s[0, 0] + 2 * math.pi * shift[0], s[0, 1] + 2 * math.pi * shift[1], 0.0]]
        e_out, f_out = _energy_forces(dyn.context, p)
        _assert_close(e_out, e_in, rtol=1e-9)
        _assert_close(f_out, f_in, rtol=1e-7)
    # the walkers' s is reported wrapped into [-pi, pi)
    dyn.context.setPositions([[3 * math.pi - 0.1, -5.0, 0.0]])
    np.testing.assert_allclose(dyn.s, [[math.pi - 0.1, 2 * math.pi - 5.0]], atol=1e-12)


# ---------------------------------------------------------------------- d) 1,000 walkers sampling
def exact_bin_probabilities(n_bins=24, sub=20):
    """Bin probabilities of exp(-A) on n_bins x n_bins bins of [-pi, pi)^2 ([i_phi, j_psi]), midpoint rule on a
    (n_bins * sub)^2 grid (error ~ (h_sub)^2 A'' / 24 relative, < 1e-4 here)."""
    e = np.linspace(-math.pi, math.pi, n_bins * sub + 1)
    c = 0.5 * (e[1:] + e[:-1])
    phi, psi = np.meshgrid(c, c, indexing="ij")
    w = np.exp(-analytic_A(phi, psi)).reshape(n_bins, sub, n_bins, sub).sum(axis=(1, 3))
    return w / w.sum()


def test_one_context_of_1000_walkers_samples_the_analytic_pmf(analytic):
    """1,000 walkers in ONE Context, started uniformly, sample exp(-A): forward KLD <= 0.01 on 24 x 24 bins.

    5 ps of burn-in, then 120 ps (6,000 steps of 0.02 ps) recorded every 1 ps: 120,000 samples. The finite-sample
    floor of the raw-histogram divergence is (bins - 1) / (2 n_independent) ~ 0.003 at this length (measured
    0.003-0.005 over seeds; 0.0015 at 400 ps, i.e. no time-step bias)."""
    rng = np.random.default_rng(11)
    s0 = rng.uniform(-math.pi, math.pi, size=(1000, 2))
    dyn = CGDynamics(analytic, s0, seed=11)
    assert dyn.simulation.system.getNumParticles() == 1000
    dyn.run(250, 250)
    s, spread = dyn.run(6000, 50)
    assert s.shape == (120, 1000, 2) and spread.shape == (120, 1000)
    assert np.all(s >= -math.pi) and np.all(s < math.pi)
    np.testing.assert_allclose(spread, 0.1 + np.abs(np.sin(s[..., 0])), rtol=1e-12)
    edges = np.linspace(-math.pi, math.pi, 25)
    h, _, _ = np.histogram2d(s[..., 0].ravel(), s[..., 1].ravel(), bins=[edges, edges])
    kld = forward_kld(exact_bin_probabilities(), h + 1e-12)
    assert kld <= 0.01, kld
    # a wrong sign or swapped axes would be far off: the mirrored PMF gives a large divergence
    assert forward_kld(exact_bin_probabilities()[::-1, ::-1], h + 1e-12) > 0.5


# --------------------------------------------------------------------------------- e) errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="PMF file not found"):
        load_pmf(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        CGDynamics(tmp_path / "nope.pt", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="directory"):
        load_pmf(tmp_path)


def test_corrupt_files(tmp_path, analytic):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="could not be loaded as a TorchScript PMF"):
        load_pmf(junk)
    data = open(analytic, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        load_pmf(truncated)
    with pytest.raises(ValueError, match="truncated.pt"):
        add_pmf_bias(openmm.System(), truncated)
    pickled = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(ValueError, match="could not be loaded"):
        load_pmf(pickled)

    class NoMeta(nn.Module):
        def forward(self, s: torch.Tensor) -> torch.Tensor:
            return s[:, 0]

    bare = save_module(NoMeta(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="missing cg_names, periodic, temperature, cg_atoms, mean_and_spread"):
        load_pmf(bare)


def test_cg_dimension_mismatch(analytic, double_well, aldp_system):
    with pytest.raises(ValueError, match=r"CG dimension mismatch: s0 has shape \(4, 3\).*2 CG coordinates"):
        CGDynamics(analytic, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="CG dimension mismatch"):
        CGDynamics(analytic, np.zeros(3))
    with pytest.raises(ValueError, match=r"CG dimension mismatch: .* has 2 CG coordinates \(phi, psi\) but 3"):
        load_pmf(analytic, expected_cg=3)
    with pytest.raises(ValueError, match=r"CG coordinate mismatch.*\['phi', 'psi'\].*\['psi', 'phi'\]"):
        load_pmf(analytic, expected_cg=["psi", "phi"])
    with pytest.raises(ValueError, match="CG atom mismatch"):
        load_pmf(analytic, expected_cg=[[1, 2, 3, 4], [2, 3, 4, 5]])
    assert load_pmf(analytic, expected_cg=["phi", "psi"]).n_cg == 2
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aldp_system.system))
    with pytest.raises(ValueError, match="CG dimension mismatch: the PMF has 2 CG coordinates"):
        add_pmf_bias(system, analytic, cg_atoms=[[4, 6, 8, 14]])
    with pytest.raises(ValueError, match="not four distinct atom indices"):
        add_pmf_bias(system, analytic, cg_atoms=[[4, 6, 8, 14], [6, 8, 14, 99]])
    with pytest.raises(ValueError, match="not all periodic"):
        add_pmf_bias(system, double_well)
    with pytest.raises(ValueError, match="must have shape"):
        load_pmf(analytic).mean(np.zeros((5, 3)))


def test_wrong_temperature(analytic, aldp_system):
    with pytest.raises(ValueError, match=r"temperature mismatch: .*300 K.*310 K was requested"):
        CGDynamics(analytic, np.zeros((2, 2)), temperature=310.0)
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aldp_system.system))
    with pytest.raises(ValueError, match=r"temperature mismatch: .*300 K.*350 K was requested"):
        add_pmf_bias(system, analytic, temperature=350 * unit.kelvin)
    with pytest.raises(ValueError, match="positive number of kelvin"):
        load_pmf(analytic, temperature=-5)
    assert system.getNumForces() == aldp_system.system.getNumForces()   # nothing added on failure
    # the right temperature, as a number or a Quantity, is accepted
    CGDynamics(analytic, np.zeros((2, 2)), temperature=300.0 * unit.kelvin)


# ------------------------------------------------------------------------------------------- f) CMAP
def _chain_system():
    """Five free particles, CG dihedrals (0,1,2,3) and (1,2,3,4): random positions cover the whole torus."""
    system = openmm.System()
    for _ in range(5):
        system.addParticle(12.0)
    return system


def test_cmap_export_agrees_with_torchforce_within_grid_error(analytic, tmp_path):
    """Tolerance. OpenMM's CMAP is a bicubic patch per cell whose nodal derivatives come from periodic cubic
    splines through the grid values. Per axis, a cubic spline's value error is <= 5/384 h^4 M and its derivative
    error <= 1/24 h^3 M (M = max |fourth derivative| along that axis); a cubic Hermite patch turns derivative
    errors d into value errors <= (4/27) h d < h d / 4. So per axis <= (5/384 + 1/96) h^4 M = 0.0234 h^4 M, and
    the bound used adds the two axes and doubles the sum for the mixed (cross-derivative) term:
    2 * 0.0234 h^4 (M_phi + M_psi) kT = 0.19 h^4 kT for A = 2 cos(phi - 1) + sin(psi) + 0.5 cos(phi + psi)
    (M_phi = 2.5, M_psi = 1.5): 8.8e-4 kT at n = 24 (h = 15 deg), 5.5e-5 kT at n = 48. Forces: one power of h
    less, 2 * (1/24 + 1/6) h^3 * 4 kT/rad times |ds/dx| (from the bias module's own Jacobian). Checked on 150
    random configurations of a five-particle chain whose two dihedrals cover the whole torus; the error must
    also fall like h^4 (a factor 16 expected when n doubles; > 8 asserted), which a wrong axis order, sign or
    angle origin would not give."""
    pmf = load_pmf(analytic)
    kT = pmf.kT
    quads = [[0, 1, 2, 3], [1, 2, 3, 4]]
    torch_sys = _chain_system()
    add_pmf_bias(torch_sys, analytic, factor=-1, cg_atoms=quads)
    c_torch = _context(torch_sys)
    module = DihedralBias(pmf.module, quads, kT)
    rng = np.random.default_rng(6)
    configs = [rng.normal(scale=0.15, size=(5, 3)) for _ in range(150)]
    torch_ef = [_energy_forces(c_torch, x) for x in configs]
    f_scale = []
    for x in configs:
        jac = torch.autograd.functional.jacobian(lambda y: module.cg(y)[0], torch.tensor(x))   # [2, 5, 3]
        f_scale.append(float(jac.abs().amax(dim=(1, 2)).sum()))
    max_err = {}
    for n_grid in (24, 48):
        xml = tmp_path / f"cmap{n_grid}.xml"
        cmap = pmf_cmap_force(analytic, n_grid=n_grid, factor=-1, cg_atoms=quads, xml_path=str(xml))
        assert cmap.getNumMaps() == 1 and cmap.getNumTorsions() == 1
        cmap_sys = _chain_system()
        cmap_sys.addForce(openmm.XmlSerializer.deserialize(xml.read_text()))   # the saved force, as a user would
        c_cmap = _context(cmap_sys)
        h = 2 * math.pi / n_grid
        e_err, f_err = [], []
        for x, (e_t, f_t) in zip(configs, torch_ef):
            e_c, f_c = _energy_forces(c_cmap, x)
            e_err.append(abs(e_t - e_c))
            f_err.append(np.max(np.abs(f_t - f_c)))
        max_err[n_grid] = max(e_err)
        assert max(e_err) <= 0.19 * h ** 4 * kT, (n_grid, max(e_err) / kT)
        f_bound = 2 * (1 / 24 + 1 / 6) * h ** 3 * 4 * kT * np.array(f_scale)
        assert np.all(np.array(f_err) <= f_bound), (n_grid, np.max(np.array(f_err) / f_bound))
    assert max_err[24] > 0 and max_err[48] < max_err[24] / 8, max_err


def test_cmap_sign_and_axes_on_alanine_dipeptide(analytic, aldp_system):
    """On the real molecule with the file's own cg_atoms: CMAP energy == -kT A(phi, psi) at mdtraj's angles."""
    cg = aldp_system
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(cg.system))
    force = pmf_cmap_force(analytic, n_grid=48, factor=-1)
    force.setForceGroup(9)
    system.addForce(force)
    ctx = _context(system)
    rng = np.random.default_rng(8)
    top = md.Topology.from_openmm(cg.topology)
    kT = kT_kJmol(300.0)
    for _ in range(3):
        x = cg.positions + rng.normal(scale=0.03, size=cg.positions.shape)
        e, _ = _energy_forces(ctx, x, groups={9})
        traj = md.Trajectory(x[None].astype(np.float32), top)
        phi, psi = md.compute_phi(traj)[1][0, 0], md.compute_psi(traj)[1][0, 0]
        assert e == pytest.approx(-kT * analytic_A(phi, psi), abs=0.19 * (2 * math.pi / 48) ** 4 * kT + 1e-4)


# ------------------------------------------------------------------------------------ g) reweighting
def test_reweighting_recovers_unbiased_populations(analytic):
    """Samples from p_b ~ exp(-A - factor A) (factor = -0.6, drawn by rejection) reweighted with exp(factor A)
    give the populations of exp(-A) (exact quadrature) within 4 standard errors; Kish's ESS matches its
    large-sample value (E_b w)^2 / E_b w^2 within 5 %."""
    rng = np.random.default_rng(9)
    factor = -0.6
    n = 200_000
    cand = rng.uniform(-math.pi, math.pi, size=(4 * n, 2))   # acceptance ~31 %
    log_pb = -(1 + factor) * analytic_A(cand[:, 0], cand[:, 1])
    keep = np.log(rng.uniform(size=len(cand))) < log_pb - log_pb.max()
    s = cand[keep][:n]
    assert len(s) == n
    rw = reweight(s, analytic, factor=factor)
    # the same weights from per-frame bias energies (V = factor kT A) in kT or kJ/mol
    a = analytic_A(s[:, 0], s[:, 1])
    np.testing.assert_allclose(reweight(bias_kT=factor * a).weights, rw.weights, rtol=1e-10)
    np.testing.assert_allclose(reweight(bias_kJmol=factor * a * kT_kJmol(300.0), temperature=300.0).weights,
                               rw.weights, rtol=1e-10)
    # angles given in [0, 2 pi) (another convention) are wrapped before A is evaluated
    np.testing.assert_allclose(reweight(np.mod(s, 2 * math.pi), analytic, factor=factor).weights, rw.weights,
                               rtol=1e-10)
    # exact populations of exp(-A)
    e = np.linspace(-math.pi, math.pi, 801)
    c = 0.5 * (e[1:] + e[:-1])
    P, S = np.meshgrid(c, c, indexing="ij")
    p = np.exp(-analytic_A(P, S))
    p /= p.sum()
    regions = {"phi>0": (lambda f, g: f > 0), "band": (lambda f, g: (g > -2.0) & (g < 1.0) & (f < 0)),
               "corner": (lambda f, g: (f > 1.5) & (g > 1.5))}
    for name, region in regions.items():
        exact = float(p[region(P, S)].sum())
        est, se = rw.population(region(s[:, 0], s[:, 1]))
        assert abs(est - exact) < 4 * se, (name, est, exact, se)
        biased_raw = float(np.mean(region(s[:, 0], s[:, 1])))
        assert abs(biased_raw - exact) > 10 * se or name == "band"   # the raw biased fractions are wrong
    pb = np.exp(-(1 + factor) * analytic_A(P, S))
    pb /= pb.sum()
    w = np.exp(factor * analytic_A(P, S))
    ess_fraction_exact = float((pb * w).sum() ** 2 / (pb * w * w).sum())
    assert rw.ess_fraction == pytest.approx(ess_fraction_exact, rel=0.05)
    assert 0 < rw.ess <= rw.n_frames and rw.weights.sum() == pytest.approx(1.0)
    # the reweighted histogram on 8 x 8 bins matches the exact bin probabilities
    q = np.exp(-analytic_A(P, S)).reshape(8, 100, 8, 100).sum(axis=(1, 3))
    hist, edges = reweighted_histogram(s, rw.weights, bins=8)
    assert hist.shape == (8, 8) and len(edges) == 2 and hist.sum() == pytest.approx(1.0)
    assert forward_kld(q / q.sum(), hist) < 2e-3
    np.testing.assert_allclose(rw.histogram(s, bins=8)[0], hist)


def test_effective_sample_size_limits():
    assert effective_sample_size(np.ones(50)) == pytest.approx(50)
    assert effective_sample_size([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_sample_size([0.0, 0.0]) == 0.0
    rw = reweight(bias_kT=[0.0, 0.0, 800.0])   # huge log-weights do not overflow
    np.testing.assert_allclose(rw.weights, [0, 0, 1], atol=1e-300)
    with pytest.raises(ValueError, match="finite"):
        reweight(bias_kT=[0.0, np.inf])
    with pytest.raises(ValueError, match="temperature"):
        reweight(bias_kJmol=[1.0, 2.0])


# ---------------------------------------------------------------------------- h) reporter and plots
def test_cg_reporter_npz_round_trip(ensemble, tmp_path):
    rng = np.random.default_rng(10)
    dyn = CGDynamics(ensemble, rng.uniform(-math.pi, math.pi, size=(6, 2)), seed=4)
    out = tmp_path / "walkers.npz"
    reporter = CGReporter(out, 10, flush_every=3)
    dyn.simulation.reporters.append(reporter)
    s, spread = dyn.run(50, 10)
    assert out.exists()                    # flushed after 3 frames already
    reporter.close()
    with np.load(out) as z:
        data = {k: z[k] for k in z.files}
    assert data["s"].shape == (5, 6, 2) and data["s"].dtype == np.float32
    assert data["spread"].shape == (5, 6)
    np.testing.assert_allclose(data["time_ps"], 0.02 * 10 * np.arange(1, 6), rtol=1e-12)
    np.testing.assert_array_equal(data["step"], 10 * np.arange(1, 6))
    np.testing.assert_allclose(data["s"], s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data["spread"], spread, rtol=1e-5, atol=1e-6)
    assert list(data["cg_names"]) == ["phi", "psi"] and list(data["periodic"]) == [True, True]
    assert float(data["temperature"]) == 300.0
    for k, v in reporter.arrays().items():
        np.testing.assert_array_equal(np.asarray(v), data[k])
    # spread in the file is the ensemble's spread at the stored s
    _, sd = load_pmf(ensemble).mean_and_spread(data["s"][-1].astype(np.float64))
    np.testing.assert_allclose(data["spread"][-1], sd, rtol=1e-5)
    with pytest.raises(RuntimeError, match="after close"):
        reporter.report(dyn.simulation, dyn.context.getState(getPositions=True))


def test_plot_pmf_writes_png_1d_and_2d(ensemble, double_well, tmp_path):
    p2 = plot_pmf(ensemble, tmp_path / "plots" / "pmf2d.png", points=np.zeros((3, 2)), threshold=0.2, n_grid=40)
    p1 = plot_pmf(double_well, tmp_path / "pmf1d.png", ranges=[(-1.8, 1.8)], threshold=0.05, n_grid=60,
                  points=np.array([[-1.0], [1.0]]))
    for p in (p1, p2):
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000


# ------------------------------------------------------------------ i) force backends: TorchForce and PythonForce
def _aldp_copy(aldp_system):
    return openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aldp_system.system))


def _periodic_aldp(aldp_system):
    """The alanine-dipeptide particles in a triclinic periodic box with one periodic force (no interactions)."""
    system = openmm.System()
    for i in range(aldp_system.system.getNumParticles()):
        system.addParticle(aldp_system.system.getParticleMass(i))
    system.setDefaultPeriodicBoxVectors(openmm.Vec3(2.0, 0, 0), openmm.Vec3(0.3, 2.2, 0), openmm.Vec3(-0.4, 0.5, 2.5))
    periodic_force = openmm.CustomBondForce("0")
    periodic_force.setUsesPeriodicBoundaryConditions(True)
    system.addForce(periodic_force)
    return system


@pytest.mark.parametrize("which", ["analytic", "ensemble"])
@pytest.mark.parametrize("periodic", [False, True])
def test_python_backend_allatom_bias_matches_torchforce(which, periodic, request, aldp_system):
    """The all-atom bias through openmm.PythonForce gives the TorchForce's energies and forces (1e-6 relative),
    without and with a periodic box (minimum image), and follows the global parameter."""
    path = request.getfixturevalue(which)
    system = _periodic_aldp(aldp_system) if periodic else _aldp_copy(aldp_system)
    f_torch = add_pmf_bias(system, path, factor=-1, force_group=7, backend="torch")
    f_python = add_pmf_bias(system, path, factor=-1, force_group=8, backend="python")
    assert isinstance(f_python, openmm.PythonForce)
    assert f_torch.usesPeriodicBoundaryConditions() == f_python.usesPeriodicBoundaryConditions() == periodic
    assert [force_backend(system.getForce(i)).name for i in plugin_forces(system)] == ["torch", "python"]
    ctx = _context(system)
    rng = np.random.default_rng(12)
    for k in range(4):
        x = aldp_system.positions + rng.normal(scale=0.05, size=aldp_system.positions.shape)
        if periodic and k % 2:
            x[8] += np.array([0.3, 2.2, 0.0]) - np.array([-0.4, 0.5, 2.5])   # an atom moved by b - c
        e_t, f_t = _energy_forces(ctx, x, groups={7})
        e_p, f_p = _energy_forces(ctx, x, groups={8})
        assert abs(e_t) > 1e-3
        _assert_close(e_p, e_t)
        _assert_close(f_p, f_t)
    ctx.setParameter(BIAS_PARAMETER, 0.5)          # both forces share the parameter
    e_t, _ = _energy_forces(ctx, aldp_system.positions, groups={7})
    e_p, _ = _energy_forces(ctx, aldp_system.positions, groups={8})
    _assert_close(e_p, e_t)
    s = DihedralBias(load_pmf(path).module, ALDP_QUADS, 1.0).cg(torch.as_tensor(aldp_system.positions)).numpy()
    _assert_close(e_p, 0.5 * load_pmf(path).kT * load_pmf(path).mean(s)[0])


@pytest.mark.parametrize("which", ["analytic", "ensemble", "double_well"])
def test_python_backend_walkers_match_torchforce(which, request, tmp_path):
    """CG walkers through openmm.PythonForce (periodic box for dihedrals; none for the 1-D double well) give the
    TorchForce's energies and forces (1e-6 relative), also for positions outside the box."""
    path = request.getfixturevalue(which)
    rng = np.random.default_rng(13)
    d = load_pmf(path).n_cg
    s0 = rng.uniform(-math.pi, math.pi, size=(6, d))
    dyn_t = CGDynamics(path, s0, seed=1, backend="torch")
    dyn_p = CGDynamics(path, s0, seed=1, backend="python")
    sys_p = dyn_p.simulation.system
    assert [force_backend(sys_p.getForce(i)).name for i in plugin_forces(sys_p)] == ["python"]
    assert sys_p.usesPeriodicBoundaryConditions() == (which != "double_well")
    for _ in range(3):
        pos = np.zeros((6, 3))
        pos[:, :d] = rng.uniform(-3 * math.pi, 3 * math.pi, size=(6, d)) if d == 2 else rng.uniform(-1.6, 1.6, (6, 1))
        pos[:, d:] = rng.normal(size=(6, 3 - d))
        e_t, f_t = _energy_forces(dyn_t.context, pos)
        e_p, f_p = _energy_forces(dyn_p.context, pos)
        _assert_close(e_p, e_t)
        _assert_close(f_p, f_t)
    # the python backend steps, and its reporter finds the PMF inside the PythonForce
    reporter = CGReporter(tmp_path / "walkers.npz", 10)
    dyn_p.simulation.reporters.append(reporter)
    s, spread = dyn_p.run(20, 10)
    assert s.shape == (2, 6, d) and np.all(np.isfinite(s)) and np.all(np.isfinite(spread))
    reporter.close()
    with np.load(tmp_path / "walkers.npz") as z:
        np.testing.assert_allclose(z["spread"], spread, rtol=1e-5, atol=1e-6)


def test_default_backend_falls_back_to_python_with_a_warning(analytic, monkeypatch):
    from openmm_cgflow_plugin import backends

    assert backends.default_backend_name() == "torch"          # openmm-torch is installed here
    monkeypatch.setattr(backends.get_backend("torch"), "available", lambda: False)
    with pytest.warns(RuntimeWarning, match="openmm-torch is not installed.*PythonForce"):
        dyn = CGDynamics(analytic, np.zeros((2, 2)))
    assert isinstance(dyn.simulation.system.getForce(0), openmm.PythonForce)
    with pytest.raises(ImportError, match="openmm-torch is required"):
        backends.get_backend("torch")
    with pytest.raises(ValueError, match="unknown force backend 'jax'"):
        backends.get_backend("jax")


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_swap_pmf_keeps_custom_parameter_name_and_value(backend, analytic, ensemble, aldp_system):
    """swap_pmf re-adds the all-atom bias under the user's global-parameter name with its current value (it used
    to fall back to the default name), with the same backend and force group; CG walkers swap too."""
    import openmm.app as app

    system = _aldp_copy(aldp_system)
    add_pmf_bias(system, analytic, factor=-0.3, parameter="lambda_bias", force_group=5, backend=backend)
    sim = app.Simulation(aldp_system.topology, system, openmm.VerletIntegrator(0.001), REFERENCE)
    sim.context.setPositions(aldp_system.positions)
    sim.context.setParameter("lambda_bias", 0.7)
    assert swap_pmf(sim, ensemble) == 1
    (i,) = plugin_forces(sim.system)
    force = sim.system.getForce(i)
    assert force_backend(force).name == backend and force.getForceGroup() == 5
    assert [name for name, _ in force_parameters(force)] == ["lambda_bias"]
    assert BIAS_PARAMETER not in sim.context.getParameters()
    assert sim.context.getParameter("lambda_bias") == pytest.approx(0.7)
    new = load_pmf(ensemble)
    s = DihedralBias(new.module, ALDP_QUADS, 1.0).cg(torch.as_tensor(aldp_system.positions)).numpy()
    e = sim.context.getState(getEnergy=True, groups={5}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    _assert_close(e, 0.7 * new.kT * new.mean(s)[0])
    sim.context.setParameter("lambda_bias", -1.0)                 # the parameter still drives the new force
    e = sim.context.getState(getEnergy=True, groups={5}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    _assert_close(e, -new.kT * new.mean(s)[0])
    # CG walkers: swapping keeps positions and the backend
    dyn = CGDynamics(analytic, np.array([[0.3, -1.2], [2.0, 1.0]]), backend=backend)
    before = dyn.s
    dyn.swap_pmf(ensemble)
    np.testing.assert_allclose(dyn.s, before, atol=1e-12)
    assert force_backend(dyn.simulation.system.getForce(0)).name == backend
    assert dyn.energy_kT() == pytest.approx(float(new.mean(before).sum()), rel=1e-9)


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_capped_bias_is_flat_above_the_cap_and_reweights_consistently(backend, analytic, aldp_system):
    """add_pmf_bias(cap_kT=c): energy factor * kT * min(A, c), no bias force where A > c, the same as the uncapped
    bias where A < c; swap_pmf keeps the cap; reweight(cap_kT=c) uses min(A, c)."""
    import openmm.app as app

    pmf = load_pmf(analytic)
    x0 = aldp_system.positions
    s0 = DihedralBias(pmf.module, ALDP_QUADS, 1.0).cg(torch.as_tensor(x0)).numpy()
    a0 = float(pmf.mean(s0)[0])
    plain = _aldp_copy(aldp_system)
    c_plain = _context(plain)
    for cap, capped in ((a0 + 0.5, False), (a0 - 0.5, True)):
        system = _aldp_copy(aldp_system)
        add_pmf_bias(system, analytic, factor=-1, force_group=6, backend=backend, cap_kT=cap)
        c = _context(system)
        e_bias, f_bias = _energy_forces(c, x0, groups={6})
        _assert_close(e_bias, -pmf.kT * min(a0, cap))
        if capped:
            assert np.max(np.abs(f_bias)) < 1e-9
        else:
            uncapped = _aldp_copy(aldp_system)
            add_pmf_bias(uncapped, analytic, factor=-1, force_group=6, backend=backend)
            _assert_close(f_bias, _energy_forces(_context(uncapped), x0, groups={6})[1])
            assert np.max(np.abs(f_bias)) > 1e-3
        e_total, _ = _energy_forces(c, x0)
        _assert_close(e_total, _energy_forces(c_plain, x0)[0] - pmf.kT * min(a0, cap))
    # swap keeps the cap (the last System: capped below A)
    sim = app.Simulation(aldp_system.topology, system, openmm.VerletIntegrator(0.001), REFERENCE)
    sim.context.setPositions(x0)
    assert swap_pmf(sim, analytic) == 1
    e = sim.context.getState(getEnergy=True, groups={6}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    _assert_close(e, -pmf.kT * (a0 - 0.5))
    # reweighting with the cap: log weights = -min(A, cap)
    s = np.array([[0.1, 0.2], [-2.0, 2.5], [1.0, -1.0]])
    a = pmf.mean(s)
    cap = float(np.median(a))
    np.testing.assert_allclose(reweight(s, analytic, factor=-1, cap_kT=cap).log_weights, -np.minimum(a, cap))
    with pytest.raises(ValueError, match="cap_kT"):
        add_pmf_bias(_aldp_copy(aldp_system), analytic, cap_kT=float("nan"))


@pytest.mark.parametrize("periodic", [False, True])
def test_python_backend_system_survives_xml_serialization(periodic, ensemble, aldp_system, tmp_path):
    """A System carrying the bias through the PythonForce backend round-trips XmlSerializer (as a file) and gives
    the same energies and forces in a new Context; the plugin still recognises the deserialized force.
    (Not done with a TorchForce: deserializing one segfaults with the openmm-torch CPU wheel.)"""
    system = _periodic_aldp(aldp_system) if periodic else _aldp_copy(aldp_system)
    add_pmf_bias(system, ensemble, factor=-0.8, parameter="lam", backend="python")
    xml = tmp_path / "system.xml"
    xml.write_text(openmm.XmlSerializer.serialize(system))
    restored = openmm.XmlSerializer.deserialize(xml.read_text())
    assert [force_backend(restored.getForce(i)).name for i in plugin_forces(restored)] == ["python"]
    assert force_parameters(restored.getForce(plugin_forces(restored)[0])) == [("lam", -0.8)]
    c_old, c_new = _context(system), _context(restored)
    rng = np.random.default_rng(14)
    for _ in range(3):
        x = aldp_system.positions + rng.normal(scale=0.05, size=aldp_system.positions.shape)
        e_old, f_old = _energy_forces(c_old, x)
        e_new, f_new = _energy_forces(c_new, x)
        _assert_close(e_new, e_old, rtol=1e-12)
        _assert_close(f_new, f_old, rtol=1e-12)
    c_new.setParameter("lam", 0.25)
    c_old.setParameter("lam", 0.25)
    _assert_close(_energy_forces(c_new, x)[0], _energy_forces(c_old, x)[0], rtol=1e-12)


# ------------------------------------------------------------------------------ j) pmf.pt ranges and old files
def test_pmf_ranges_from_the_file_and_old_files_load(double_well, tmp_path):
    path = save_pmf(DoubleWellPMF(), tmp_path / "dw.pt", CGSpace(["s"], [False], 1202.7), ranges=[(-1.8, 1.5)])
    pmf = load_pmf(path)
    assert pmf.default_range(0) == (-1.8, 1.5) and pmf.cg_ranges == [(-1.8, 1.5)]
    assert pmf.cgspace == CGSpace(["s"], [False], 1202.7)
    assert load_pmf(double_well).default_range(0) == (-math.pi, math.pi)    # no cg_ranges: the fallback
    old = load_pmf(os.path.join(ROOT, "benchmarks", "data", "aldp_al", "pmf.pt"))   # attributes on the module
    assert old.cg_names == ["phi", "psi"] and old.cg_ranges is None and old.cgspace.atoms == ALDP_QUADS
    assert old.default_range(0) == (-math.pi, math.pi)


# -------------------------------------------------------------------------------- k) the reporter appends
def test_cg_reporter_appends_chunks_and_survives_a_crash(analytic, tmp_path):
    """Flushes append new zip members (earlier bytes untouched, size and member count grow); a file left by a run
    that never closed is readable with read_cg_npz; describeNextReport is OpenMM's dict form in a real Simulation."""
    import zipfile

    dyn = CGDynamics(analytic, np.random.default_rng(15).uniform(-math.pi, math.pi, size=(4, 2)), seed=5)
    out = tmp_path / "walkers.npz"
    reporter = CGReporter(out, 5, flush_every=2)
    assert reporter.describeNextReport(dyn.simulation) == {"steps": 5, "periodic": None, "include": ["positions"]}
    dyn.simulation.reporters.append(reporter)
    dyn.simulation.step(10)                                          # 2 frames: one chunk
    with zipfile.ZipFile(out) as zf:
        first = zf.getinfo("s.000001.npy")
        n_members = len(zf.namelist())
    size_1 = os.path.getsize(out)
    with open(out, "rb") as fh:
        first_bytes = fh.read(first.header_offset + 30 + len(first.filename) + first.compress_size)
    sizes, members = [size_1], [n_members]
    for _ in range(3):
        dyn.simulation.step(10)
        with zipfile.ZipFile(out) as zf:
            members.append(len(zf.namelist()))
        sizes.append(os.path.getsize(out))
    assert all(b > a for a, b in zip(sizes, sizes[1:])) and all(b > a for a, b in zip(members, members[1:]))
    with open(out, "rb") as fh:
        assert fh.read(len(first_bytes)) == first_bytes              # the first chunk was not rewritten
    # a "crash" now (no close): the chunked file holds every flushed frame
    left = read_cg_npz(out)
    assert left["s"].shape == (8, 4, 2) and left["spread"].shape == (8, 4) and left["time_ps"].shape == (8,)
    np.testing.assert_array_equal(left["step"], 5 * np.arange(1, 9))
    assert list(left["cg_names"]) == ["phi", "psi"]
    dyn.simulation.step(5)                                           # one frame still in memory
    assert reporter.n_frames == 9
    reporter.close()
    with np.load(out) as z:
        assert sorted(z.files) == ["cg_names", "periodic", "s", "spread", "step", "temperature", "time_ps"]
        np.testing.assert_array_equal(z["s"][:8], left["s"])
        assert z["s"].shape == (9, 4, 2)
    closed = read_cg_npz(out)
    np.testing.assert_array_equal(closed["step"], 5 * np.arange(1, 10))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]

