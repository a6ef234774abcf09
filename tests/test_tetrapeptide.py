"""Alanine tetrapeptide (ACE-(ALA)3-NME, six CG dihedrals) and residue-addressed CG specs ("phi:ALA3", "phi:3")."""

import math

import mdtraj as md
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch
from openmm_cgflow_plugin.cgspace import wrap_angle

from openmm_cgflow import alanine_tetrapeptide  # noqa: F401  (registers "alanine-tetrapeptide")
from openmm_cgflow.flow import flow_for
from openmm_cgflow.registry import builtin
from openmm_cgflow.settings import LearnerSettings
from openmm_cgflow.systems import data_path, resolve_cg

NAMES = ["phi:ALA2", "psi:ALA2", "phi:ALA3", "psi:ALA3", "phi:ALA4", "psi:ALA4"]


@pytest.fixture(scope="module")
def tetra():
    return builtin("alanine-tetrapeptide")


def _context(system):
    return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))


def _mdtraj_dihedrals(topology, xyz):
    """mdtraj's (phi, psi) of ALA2..4 interleaved [B, 6] (rad) and their atom quadruples [6, 4]."""
    traj = md.Trajectory(np.asarray(xyz, dtype=np.float64).reshape(-1, topology.getNumAtoms(), 3),
                         md.Topology.from_openmm(topology))
    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    assert len(phi_idx) == len(psi_idx) == 3  # the caps have neither (no CA): ALA2..4 only
    quads = [q for pair in zip(phi_idx, psi_idx) for q in pair]
    values = np.stack([v for pair in zip(phi.T, psi.T) for v in pair], axis=1)
    return values, np.array(quads)


def test_builds_with_six_named_dihedrals(tetra):
    assert tetra.n_atoms == 42 and tetra.temperature == 300.0
    assert [f"{r.name}{r.id}" for r in tetra.topology.residues()] == ["ACE1", "ALA2", "ALA3", "ALA4", "NME5"]
    assert tetra.cg_names == NAMES and tetra.cg_periodic == [True] * 6
    assert tetra.system.getNumConstraints() == 0 and not tetra.system.usesPeriodicBoundaryConditions()
    kinds = {type(f).__name__ for f in tetra.system.getForces()}
    assert "GBSAOBCForce" in kinds  # implicit solvent
    nb = [f for f in tetra.system.getForces() if isinstance(f, openmm.NonbondedForce)][0]
    assert nb.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    coords = tetra.coordinates
    assert coords.n_cg == 6 and coords.n_fine == 3 * 42 - 6 - 6 and coords.ring_closures == []


def test_minimised_structure_is_sane(tetra):
    context = _context(tetra.system)
    context.setPositions(tetra.positions)
    e0 = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert math.isfinite(e0) and -400.0 < e0 < 0.0
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 0)
    e1 = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert e0 - e1 < 2.0  # the shipped structure is a minimum (PDB rounding of 1e-4 nm costs ~1 kJ/mol)
    x = tetra.positions
    at = {(a.residue.id, a.name): a.index for a in tetra.topology.atoms()}
    # every peptide bond trans: omega = CA/CH3(i-1)-C(i-1)-N(i)-CA/C(i), 4 of them
    chain = [("1", "CH3")] + [(str(i), "CA") for i in (2, 3, 4)] + [("5", "C")]
    for i in range(4):
        prev, here = chain[i], chain[i + 1]
        quad = [at[prev], at[(prev[0], "C")], at[(here[0], "N")], at[here]]
        omega = _dihedral(x[quad])
        assert abs(abs(omega) - math.pi) < math.radians(20), f"peptide bond {prev}->{here}: omega {math.degrees(omega):.1f}"
    # L-alanine: the virtual torsion CA-N-C-CB (zeta) is about +34 deg for L, -34 deg for D
    for r in ("2", "3", "4"):
        zeta = math.degrees(_dihedral(x[[at[(r, "CA")], at[(r, "N")], at[(r, "C")], at[(r, "CB")]]]))
        assert 20.0 < zeta < 50.0, f"ALA{r}: zeta {zeta:.1f} deg is not L"
    # bonds physical
    bonds = np.array([(a.index, b.index) for a, b in tetra.topology.bonds()])
    lengths = np.linalg.norm(x[bonds[:, 0]] - x[bonds[:, 1]], axis=1)
    assert len(bonds) == 41 and lengths.min() > 0.09 and lengths.max() < 0.16


def _dihedral(p):
    b1, b2, b3 = p[1] - p[0], p[2] - p[1], p[3] - p[2]
    c1, c2 = np.cross(b2, b3), np.cross(b1, b2)
    return float(np.arctan2(np.dot(b1, c1) * np.linalg.norm(b2), np.dot(c1, c2)))


def test_six_dihedrals_equal_mdtraj(tetra):
    ref, quads = _mdtraj_dihedrals(tetra.topology, tetra.positions)
    assert [list(q) for q in quads] == tetra.cg_atoms
    assert np.allclose(tetra.cg_of(tetra.positions)[0], ref[0], atol=1e-10)
    # structures all around the torus (Z-matrix with random CG values): same values and signs as mdtraj
    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(32, 6, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    fine = tetra.coordinates.reference_fine.expand(32, -1)
    x, _ = tetra.coordinates.to_cartesian(fine, s)
    values, _ = _mdtraj_dihedrals(tetra.topology, x.numpy())
    assert float(wrap_angle(torch.as_tensor(values) - s).abs().max()) < 1e-5  # mdtraj computes in float32
    assert float(wrap_angle(torch.as_tensor(tetra.cg_of(x.numpy())) - s).abs().max()) < 1e-10


def test_zmatrix_round_trip(tetra):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.as_tensor(tetra.positions)[None]
    x = x0 + 0.01 * torch.randn(8, 42, 3, generator=gen, dtype=torch.float64)
    fine, s, log_det = tetra.coordinates.to_internal(x)
    x2, log_det2 = tetra.coordinates.to_cartesian(fine, s)
    assert (log_det + log_det2).abs().max() < 1e-9
    for b in range(len(x)):
        a, c = x2[b].numpy() - x2[b].numpy().mean(0), x[b].numpy() - x[b].numpy().mean(0)
        u, _, vt = np.linalg.svd(a.T @ c)
        rot = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
        assert np.abs(a @ rot - c).max() < 1e-6  # nm
    assert bool(tetra.coordinates.chirality_ok(x).all())
    # energies of the reconstruction equal those of the original
    context = _context(tetra.system)
    for b in (0, 1):
        energies = []
        for xyz in (x[b], x2[b]):
            context.setPositions(xyz.numpy())
            energies.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        assert abs(energies[0] - energies[1]) < 1e-4


def test_registry_defaults_and_flow_for_six_dims(tetra):
    st = LearnerSettings.for_system(tetra)
    assert st.radius == alanine_tetrapeptide.SETTINGS["radius"]
    st.validate(tetra)
    flow = flow_for(tetra, seed=0, n_layers=2, hidden=(16,))
    assert flow.n_cg == 6 and flow.n_context == 12 and flow.n_fine == tetra.coordinates.n_fine
    s = torch.as_tensor(tetra.cg_of(tetra.positions)).expand(5, -1)
    ctx = flow.context(s)
    assert torch.allclose(ctx, torch.cat([torch.cos(s), torch.sin(s)], dim=1))
    fine, log_q = flow.sample(s, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(flow.log_prob(fine, s), log_q, atol=1e-8)


def test_residue_addressed_specs(tetra):
    top = tetra.topology
    by_number, name = resolve_cg(top, "phi:3")
    assert name == "phi:3" and by_number == resolve_cg(top, "phi:ALA3")[0] == tuple(tetra.cg_atoms[2])
    assert resolve_cg(top, "psi:ALA4")[0] == tuple(tetra.cg_atoms[5])
    with pytest.raises(ValueError, match=r"'ALA' is ambiguous.*ALA2.*ALA3.*ALA4.*phi:ALA2"):
        resolve_cg(top, "phi:ALA")
    with pytest.raises(ValueError, match=r"no residue 'ALA7'.*ACE1.*NME5"):
        resolve_cg(top, "phi:ALA7")
    with pytest.raises(ValueError, match=r"no residue '9'"):
        resolve_cg(top, "psi:9")
    with pytest.raises(ValueError, match=r"no residue 'GLY2'"):
        resolve_cg(top, "phi:GLY2")
    with pytest.raises(ValueError, match=r"ACE1 has no atom named 'N'"):
        resolve_cg(top, "phi:1")
    with pytest.raises(ValueError, match=r"not understood"):
        resolve_cg(top, "omega:ALA2")


def test_chain_ends_and_duplicate_numbers():
    pdb = app.PDBFile(data_path("alanine-tetrapeptide.pdb"))
    # an uncapped fragment: ALA2..ALA4 alone (no ACE / NME): phi of the first and psi of the last are undefined
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete([r for r in modeller.topology.residues() if r.name in ("ACE", "NME")])
    with pytest.raises(ValueError, match=r"ALA2 has no preceding residue"):
        resolve_cg(modeller.topology, "phi:ALA2")
    with pytest.raises(ValueError, match=r"ALA4 has no following residue"):
        resolve_cg(modeller.topology, "psi:4")
    assert len(resolve_cg(modeller.topology, "phi:ALA3")[0]) == 4
    # two chains with the same residue numbers: a number is ambiguous, the error names both chains
    two = app.Modeller(pdb.topology, pdb.positions)
    shifted = np.asarray(pdb.positions.value_in_unit(unit.nanometer)) + 2.0
    two.add(pdb.topology, shifted * unit.nanometer)
    with pytest.raises(ValueError, match=r"'ALA3' is ambiguous.*chain.*chain.*four atom indices"):
        resolve_cg(two.topology, "phi:ALA3")


def test_stored_and_rebuilt_with_its_six_dihedrals(tetra):
    from openmm_cgflow.model_io import system_from_dict, system_to_dict

    again = system_from_dict(system_to_dict(tetra))
    assert again.cg_atoms == tetra.cg_atoms and again.cg_names == NAMES and again.builtin == "alanine-tetrapeptide"
    assert np.allclose(again.cg_of(tetra.positions), tetra.cg_of(tetra.positions), atol=1e-12)


def test_backmapping_six_dimensional_frames_keeps_the_six_dihedrals(tetra, tmp_path):
    """Backmapping a six-dimensional CG trajectory (a flow of the tetrapeptide, untrained: the dihedrals are
    set by construction, whatever the flow's quality): every all-atom sample, as mdtraj reads it from the
    written file, has its frame's six dihedrals to 1e-6 rad (mdtraj computes in float32)."""
    from openmm_cgflow import backmap
    from openmm_cgflow.bridge import EnergyBridge

    flow = flow_for(tetra, dtype=torch.float64, seed=0)
    rng = np.random.default_rng(0)
    s = rng.uniform(-math.pi, math.pi, (12, 6))
    bridge = EnergyBridge(tetra.system, tetra.temperature, n_workers=0)
    res = backmap(s, flow, tetra, bridge=bridge, n_per_frame=3, seed=1, progress=False)
    assert res.trajectory.n_atoms == 42 and len(res.index) >= 30
    path = tmp_path / "backmapped.dcd"
    res.trajectory.save(str(path))
    back = md.load(str(path), top=res.trajectory.topology)
    got, _ = _mdtraj_dihedrals(back.topology.to_openmm(), back.xyz)
    assert np.abs(wrap_angle(got - s[res.index])).max() < 1e-6


def test_a_toml_config_with_residue_addressed_dihedrals_runs(tmp_path):
    """A user's molecule (here a copy of the tetrapeptide PDB under another name) from a TOML config whose six
    CG dihedrals are addressed by residue number and by name + number: one tiny iteration through the CLI
    writes a six-dimensional pmf.pt with those CG coordinates."""
    import shutil

    from openmm_cgflow.cli import main
    from openmm_cgflow_plugin import load_pmf

    shutil.copy(data_path("alanine-tetrapeptide.pdb"), tmp_path / "mine.pdb")
    (tmp_path / "mine.toml").write_text(
        '[system]\npdb = "mine.pdb"\nforcefield = ["amber99sbildn.xml", "amber99_obc.xml"]\n'
        'cg = ["phi:2", "psi:2", "phi:ALA3", "psi:ALA3", "phi:4", "psi:ALA4"]\ntemperature = 300.0\nname = "mine"\n'
        "[settings]\ninitial_points = 8\nfirst_epochs = 1\nsamples_per_point = 4\npoints_per_batch = 8\n"
        "label_samples = 8\nn_models = 2\nfit_steps = 20\nn_walkers = 4\nwalker_steps = 20\nreport_interval = 10\n"
        "max_iterations = 1\nn_workers = 0\n")
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "mine.toml"), "--out", str(out), "--quiet", "--no-plots"]) == 0
    pmf = load_pmf(out / "pmf.pt")
    assert pmf.n_cg == 6 and all(pmf.periodic)
    assert pmf.cg_names == ["phi:2", "psi:2", "phi:ALA3", "psi:ALA3", "phi:4", "psi:ALA4"]  # as the user named them
    mean, spread = pmf.mean_and_spread(np.zeros((3, 6)))
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(spread))
