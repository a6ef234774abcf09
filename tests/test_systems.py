"""Systems: built-in molecules, the generic path, the registry (a user's own named system), and clear errors
for bad input."""

import numpy as np
import openmm
import openmm.app as app
import pytest

from openmm_cgflow import registry, systems


def _aldp_parts():
    pdb = systems.load_pdb(systems.data_path("alanine-dipeptide.pdb"))
    ff = app.ForceField("amber96.xml", "amber96_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    return system, pdb


def test_alanine_dipeptide_is_built_through_the_generic_path(aldp):
    assert aldp.n_atoms == 22
    assert aldp.cg_names == ["phi", "psi"]
    assert aldp.cg_atoms == [[4, 6, 8, 14], [6, 8, 14, 16]]
    assert aldp.cg_periodic == [True, True]
    assert aldp.temperature == 300.0
    assert abs(aldp.kT - 2.494338785) < 1e-6
    assert any(isinstance(f, openmm.GBSAOBCForce) for f in aldp.system.getForces())
    assert aldp.system.getNumConstraints() == 0


def test_cg_by_quadruple_and_by_residue_id_agree():
    system, pdb = _aldp_parts()
    by_name = systems.from_openmm(system, pdb.topology, pdb.positions, 300, ["phi:ALA2", "psi:2"])
    by_atoms = systems.from_openmm(system, pdb.topology, pdb.positions, 300, [(4, 6, 8, 14), (6, 8, 14, 16)])
    assert by_name.cg_atoms == by_atoms.cg_atoms
    np.testing.assert_allclose(by_name.cg_of(by_name.positions), by_atoms.cg_of(by_atoms.positions))
    assert by_name.cg_names == ["phi:ALA2", "psi:2"]


def test_wrong_atom_count_is_refused():
    system, pdb = _aldp_parts()
    with pytest.raises(ValueError, match=r"shape \(21, 3\), expected \(22, 3\)"):
        systems.from_openmm(system, pdb.topology, np.zeros((21, 3)), 300, ["phi:ALA"])


def test_nan_positions_are_refused():
    system, pdb = _aldp_parts()
    xyz = np.array(pdb.positions.value_in_unit(openmm.unit.nanometer))
    xyz[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*atoms \[7\]"):
        systems.from_openmm(system, pdb.topology, xyz, 300, ["phi:ALA"])


@pytest.mark.parametrize("temperature", [0.0, -5.0, float("nan")])
def test_non_positive_temperature_is_refused(temperature):
    system, pdb = _aldp_parts()
    with pytest.raises(ValueError, match="temperature"):
        systems.from_openmm(system, pdb.topology, pdb.positions, temperature, ["phi:ALA"])


def test_non_chain_cg_quadruple_is_refused():
    system, pdb = _aldp_parts()
    with pytest.raises(ValueError, match="bond"):
        systems.from_openmm(system, pdb.topology, pdb.positions, 300, [(4, 6, 8, 16)])


def test_unknown_residue_and_bad_spec_are_refused():
    system, pdb = _aldp_parts()
    with pytest.raises(ValueError, match="no residue 'GLY'"):
        systems.from_openmm(system, pdb.topology, pdb.positions, 300, ["phi:GLY"])
    with pytest.raises(ValueError, match="not understood"):
        systems.from_openmm(system, pdb.topology, pdb.positions, 300, ["omega:ALA"])


def test_constraints_and_periodic_systems_are_refused():
    pdb = systems.load_pdb(systems.data_path("alanine-dipeptide.pdb"))
    ff = app.ForceField("amber96.xml", "amber96_obc.xml")
    constrained = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    with pytest.raises(ValueError, match="constraints"):
        systems.from_openmm(constrained, pdb.topology, pdb.positions, 300, ["phi:ALA"])
    periodic, _ = _aldp_parts()
    periodic.setDefaultPeriodicBoxVectors(*np.eye(3) * 3.0)
    periodic.addForce(openmm.MonteCarloBarostat(1.0, 300.0))
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(openmm.NonbondedForce.PME)
    for _ in range(22):
        force.addParticle(0.0, 0.3, 0.0)
    periodic.addForce(force)
    with pytest.raises(ValueError, match="periodic"):
        systems.from_openmm(periodic, pdb.topology, pdb.positions, 300, ["phi:ALA"])


def test_missing_and_corrupt_pdb(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pdb"):
        systems.from_pdb(tmp_path / "nope.pdb", ["phi:ALA"])
    bad = tmp_path / "bad.pdb"
    bad.write_text("this is not a PDB file\n")
    with pytest.raises(ValueError, match="bad.pdb"):
        systems.from_pdb(bad, ["phi:ALA"])


def test_unknown_builtin_system():
    with pytest.raises(ValueError, match="unknown system 'argon'"):
        registry.builtin("argon")


def test_mueller_brown_system(mb):
    assert mb.cg_names == ["s"] and mb.cg_periodic == [False] and mb.cg_atoms == []
    assert abs(mb.beta - 0.1) < 1e-5


def _my_peptide(temperature=300.0):
    return systems.from_pdb(systems.data_path("alanine-dipeptide.pdb"), ["phi:ALA", "psi:ALA"], temperature,
                            name="my-peptide")


def test_a_user_registered_system_is_found_everywhere(tmp_path):
    """register_system -> builtin(name), LearnerSettings.for_system, flow_for, the CLI target and flow.pt all
    find the user's system and its defaults."""
    import torch

    from openmm_cgflow import LearnerSettings, builtin, register_system
    from openmm_cgflow.cli import load_config
    from openmm_cgflow.flow import flow_for
    from openmm_cgflow.model_io import load_model, save_model

    register_system("my-peptide", _my_peptide, settings={"radius": 0.4, "n_walkers": 7},
                    flow={"n_layers": 2, "hidden": (16,)}, replace=True)
    assert "my-peptide" in registry.registered()
    mol = builtin("my-peptide")
    assert mol.builtin == "my-peptide" and mol.name == "my-peptide" and mol.cg_names == ["phi", "psi"]
    st = LearnerSettings.for_system(mol, n_walkers=3)
    assert st.radius == 0.4 and st.n_walkers == 3
    assert LearnerSettings.for_system(systems.from_pdb(systems.data_path("alanine-dipeptide.pdb"),
                                                       ["phi:ALA", "psi:ALA"])).radius == LearnerSettings().radius
    flow = flow_for(mol, dtype=torch.float32)
    assert flow.hparams["n_layers"] == 2
    cgsystem, settings, reference = load_config("my-peptide")
    assert cgsystem.builtin == "my-peptide" and settings == {} and reference is None
    save_model(tmp_path / "flow.pt", flow, mol)
    _, again = load_model(tmp_path / "flow.pt")
    assert again.builtin == "my-peptide" and again.cg_atoms == mol.cg_atoms
    assert [(a.index, b.index) for a, b in again.topology.bonds()] == [(a.index, b.index) for a, b in mol.topology.bonds()]
    with pytest.raises(ValueError, match="already registered"):
        register_system("my-peptide", _my_peptide)


def test_builtin_options_reach_the_factory_and_the_stored_system(tmp_path):
    from openmm_cgflow.model_io import system_from_dict, system_to_dict

    hot = registry.builtin("alanine-dipeptide", temperature=350.0)
    assert hot.temperature == 350.0 and hot.builtin_options == {"temperature": 350.0}
    again = system_from_dict(system_to_dict(hot))
    assert again.temperature == 350.0 and again.builtin == "alanine-dipeptide"
    mb = system_from_dict(system_to_dict(registry.builtin("mueller-brown")))
    assert mb.builtin == "mueller-brown" and mb.cg_periodic == [False]
