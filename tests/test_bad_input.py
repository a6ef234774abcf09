"""Bad input is refused before any work, with a message that names the problem (issue #12).

One test per class of bad input: settings (types, ranges, domain, start, memory), config files and the CLI
(misspelled keys, references, notices about inputs that run code, --version), CG frames to backmap (degrees,
outside the trained domain), OpenMM inputs (a bias quadruple that is not a bonded chain, positions in
angstrom), and broken checkpoints (printed without a traceback). Every "silent wrong answer" of the issue is
here. The CLI runs in-process (``openmm_cgflow.cli.main``); nothing here trains a flow or starts a worker.
"""

import os
import shutil

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_cgflow import LearnerSettings, backmap, from_openmm
from openmm_cgflow.backmapping import resolve_inputs, training_domain
from openmm_cgflow.cg_input import OutsideDomainError, cg_frames, check_cg_values
from openmm_cgflow.cli import load_config, main
from openmm_cgflow.flow import flow_for
from openmm_cgflow.metrics import check_reference
from openmm_cgflow.model_io import save_model
from openmm_cgflow.settings import SettingsError, check_memory, estimate_memory
from openmm_cgflow.systems import data_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALDP_PMF = os.path.join(ROOT, "benchmarks", "data", "aldp_al", "pmf.pt")  # committed, with cg_atoms


def _cli(capsys, *args):
    """(exit code, stdout, stderr) of ``cgflow ARGS`` run in-process."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _toml(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _run_refused(capsys, tmp_path, *args):
    """``cgflow run ARGS --out tmp/x``: refused with exit code 2, one line, no traceback, nothing written."""
    rc, _, err = _cli(capsys, "run", *args, "--out", tmp_path / "x", "--quiet", "--no-plots")
    assert rc == 2, err
    assert "Traceback" not in err
    assert not (tmp_path / "x" / "checkpoint.pt").exists() and not (tmp_path / "x" / "pmf.pt").exists()
    return err


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("settings, words", [
    ('threshold_kT = "0.2"', ["threshold_kT", "number", "str"]),            # was a TypeError deep inside
    ("n_walkers = 1e9", ["n_walkers", "integer", "float"]),                  # was a MemoryError after training
    ("n_walkers = 1000000000", ["memory", "n_walkers", "GiB"]),              # the memory an allocation needs
    ("start = [nan]", ["start", "finite"]),                                  # was a RuntimeError
    ("domain = [[1.1, -2.5]]", ["domain", "inverted"]),                      # was "converged", KLD 2.29
    ("start = [5.0]", ["start", "outside the domain", "[-2.5, 1.1]"]),       # was "converged", KLD 2.29
    ("domain = [-2.5, 1.1]", ["domain", "pairs"]),
    ("domain = [[-2.5, 1.1], [0.0, 1.0]]", ["domain", "2", "1 non-periodic"]),
    ("label_samples = 100.5", ["label_samples", "integer"]),
    ("n_models = true", ["n_models", "integer", "bool"]),
    ("lr = -1e-3", ["lr", "> 0"]),
    ("seed = -1", ["seed", ">= 0"]),
    ("threshhold_kT = 0.3", ["unknown setting", "did you mean 'threshold_kT'"]),
    ("flow_kwargs = {hiden = [8]}", ["flow_kwargs", "did you mean 'hidden'"]),
    ('flow_dtype = "float16"', ["flow_dtype", "float16"]),
    ('device = "tpu"', ["device", "'tpu'"]),
    ('energy_platform = "Referense"', ["energy_platform", "did you mean 'Reference'"]),
    ("ensemble_hidden = [64, 0]", ["ensemble_hidden", "integers >= 1"]),
    ("change_tolerance_kT = 0", ["change_tolerance_kT", "> 0"]),
    ('final_fit_loss = "expo"', ["final_fit_loss", "did you mean 'exp'"]),
    ('fit_loss = "square"', ["fit_loss", "did you mean 'squared'"]),
    ('walker_starts = "popular"', ["walker_starts", "did you mean 'populated'"]),
    ("polish_epochs = -5", ["polish_epochs", ">= 0"]),
    ("polish_window_kT = 0.0", ["polish_window_kT", "> 0"]),
    ("polish_samples = 0", ["polish_samples", ">= 1"]),
])
def test_bad_settings_in_a_config_are_refused_before_any_work(capsys, tmp_path, settings, words):
    cfg = _toml(tmp_path, f'[system]\nbuiltin = "mueller-brown"\n[settings]\n{settings}\n')
    err = _run_refused(capsys, tmp_path, cfg)
    for w in words:
        assert w in err, err


def test_settings_validate_the_api_way_too(aldp, mb):
    LearnerSettings.for_system(mb).validate(mb)
    LearnerSettings.for_system(aldp).validate(aldp)
    with pytest.raises(SettingsError, match=r"start: phi reaches -150.*degrees.*np\.radians"):
        LearnerSettings.for_system(aldp, start=[-150.0, 150.0]).validate(aldp)
    with pytest.raises(SettingsError, match="0 non-periodic"):
        LearnerSettings.for_system(aldp, domain=[[0.0, 1.0]]).validate(aldp)
    with pytest.raises(SettingsError, match="start has 1 entries but the system has 2"):
        LearnerSettings.for_system(aldp, start=[0.1]).validate(aldp)
    with pytest.raises(ValueError, match="threshold_kT must be a number"):  # SettingsError is a ValueError
        LearnerSettings(threshold_kT="0.2").validate(2)
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="device.*CUDA is not available"):
            LearnerSettings.for_system(mb, device="cuda").validate(mb)
    LearnerSettings.for_system(mb, device="cpu").validate(mb)


def test_memory_estimate_names_the_setting_that_does_not_fit(mb, aldp):
    st = LearnerSettings.for_system(aldp)
    parts = estimate_memory(st, 2, aldp.n_atoms)
    assert set(parts) == {"walkers", "labels", "training", "points"} and sum(parts.values()) < 2**30
    check_memory(st, 2, aldp.n_atoms, available=8 * 2**30)          # the defaults fit in 8 GiB
    with pytest.raises(SettingsError, match=r"memory.*labels.*lower label_samples"):
        check_memory(LearnerSettings.for_system(aldp, label_samples=10**7), 2, aldp.n_atoms, available=8 * 2**30)
    with pytest.raises(SettingsError, match=r"lower n_walkers"):
        LearnerSettings.for_system(mb, n_walkers=10**9).validate(mb)


# ------------------------------------------------------------------------------------ config and CLI
@pytest.mark.parametrize("system, words", [
    ('builtin = "mueller-brown"\ntemprature = 350.0', ["temprature", "did you mean 'temperature'"]),
    ('pdb = "x.pdb"\ncg = ["phi:ALA"]\nforcefeild = ["amber14-all.xml"]', ["forcefeild", "did you mean 'forcefield'"]),
    ('builtin = "mueller-brown"\npdb = "x.pdb"', ["pdb", "no effect with builtin"]),
    ('builtin = "mueller-brown"\ntemperature = 350.0', ["fixed temperature"]),
    ('builtin = "mueler-brown"', ["unknown builtin", "did you mean 'mueller-brown'"]),
    ('pdb = "x.pdb"\ncg = ["phi:ALA"]\ntemperature = "300"', ["temperature must be a number", "str"]),
])
def test_bad_system_tables_are_refused(capsys, tmp_path, system, words):
    cfg = _toml(tmp_path, f"[system]\n{system}\n")
    err = _run_refused(capsys, tmp_path, cfg)
    for w in words:
        assert w in err, err


def test_reference_is_checked_before_any_work(capsys, tmp_path):
    err = _run_refused(capsys, tmp_path, "mueller-brown", "--reference", "alanine-dipeptide")
    assert "2 grid axis" in err and "1 CG coordinate" in err and "another system" in err
    np.savez(tmp_path / "ref.npz", p=np.ones(10))
    err = _run_refused(capsys, tmp_path, "mueller-brown", "--reference", tmp_path / "ref.npz")
    assert "no array 'probabilities'" in err
    err = _run_refused(capsys, tmp_path, "mueller-brown", "--reference", tmp_path / "missing.npz")
    assert "reference file not found" in err
    err = _run_refused(capsys, tmp_path, "mueller-brown", "--reference", "mueller-bown")
    assert "unknown system 'mueller-bown'" in err
    with pytest.raises(ValueError, match="periodic axes"):
        check_reference({"probabilities": np.ones(4) / 4, "edges": [np.linspace(0, 1, 5)], "periodic": [True]},
                        [False])


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "openmm-cgflow" in capsys.readouterr().out


def test_inputs_that_run_code_are_announced(capsys, tmp_path, aldp):
    """A System XML (OpenMM unpickles a PythonForce's function) and a user force-field file (OpenMM executes
    its <InitializationScript>) are read with a one-line notice; OpenMM's own force fields without one."""
    shutil.copy(data_path("alanine-dipeptide.pdb"), tmp_path / "ala.pdb")
    (tmp_path / "ala.xml").write_text(openmm.XmlSerializer.serialize(aldp.system))
    notices = []
    cfg = _toml(tmp_path, '[system]\npdb = "ala.pdb"\nsystem_xml = "ala.xml"\ncg = ["phi:ALA", "psi:ALA"]\n')
    load_config(str(cfg), notices)
    assert len(notices) == 1 and "PythonForce" in notices[0] and "Security" in notices[0]
    ff_dir = os.path.join(os.path.dirname(app.__file__), "data")
    shutil.copy(os.path.join(ff_dir, "amber96.xml"), tmp_path / "my_ff.xml")
    notices = []
    cfg = _toml(tmp_path, '[system]\npdb = "ala.pdb"\nforcefield = ["my_ff.xml", "amber96_obc.xml"]\n'
                          'cg = ["phi:ALA", "psi:ALA"]\n')
    load_config(str(cfg), notices)
    assert len(notices) == 1 and "my_ff.xml" in notices[0] and "InitializationScript" in notices[0]
    # and the CLI prints it, also when the run is refused afterwards
    cfg = _toml(tmp_path, '[system]\npdb = "ala.pdb"\nforcefield = ["my_ff.xml", "amber96_obc.xml"]\n'
                          'cg = ["phi:ALA", "psi:ALA"]\n[settings]\nthreshold_kT = "x"\n')
    err = _run_refused(capsys, tmp_path, cfg)
    assert "notice" in err and "InitializationScript" in err and "threshold_kT" in err


# --------------------------------------------------------------------------------------- backmapping
@pytest.fixture(scope="module")
def tiny_aldp_run(aldp, tmp_path_factory):
    """A run directory holding an (untrained, tiny) alanine-dipeptide flow.pt."""
    run = tmp_path_factory.mktemp("aldp") / "run"
    run.mkdir()
    save_model(run / "flow.pt", flow_for(aldp, dtype=torch.float32, n_layers=1, hidden=(8,), seed=0), aldp)
    return run


def test_degrees_are_refused_where_radians_are_meant(capsys, tmp_path, aldp, tiny_aldp_run):
    deg = np.array([[-150.0, 150.0], [-70.0, 140.0]])
    with pytest.raises(ValueError, match=r"phi reaches -150.*degrees.*np\.radians"):
        cg_frames(deg, aldp)
    np.save(tmp_path / "deg.npy", deg)
    rc, _, err = _cli(capsys, "backmap", tiny_aldp_run, tmp_path / "deg.npy", "-o", tmp_path / "o.dcd", "--quiet",
                      "--workers", "0")
    assert rc == 2 and "degrees" in err and "np.radians" in err and "Traceback" not in err
    assert not (tmp_path / "o.dcd").exists()
    # radians, also in [0, 2 pi), are fine (wrapped)
    assert np.allclose(cg_frames(np.radians(deg) % (2 * np.pi), aldp).s, np.radians(deg))


def test_frames_outside_the_trained_domain_are_refused(mb, tmp_path):
    flow = flow_for(mb)
    with pytest.raises(OutsideDomainError, match=r"s = 50 .*outside the domain \[-2.5, 1.1\].*allow_outside_domain"):
        backmap(np.array([0.0, 50.0]), flow, mb, bridge=object())
    assert training_domain(mb) == [(-2.5, 1.1)]
    inputs = resolve_inputs(np.array([50.0]), flow, mb, allow_outside_domain=True)  # the explicit opt-in
    assert inputs.frames.s[0, 0] == 50.0
    with pytest.raises(OutsideDomainError, match="outside the domain"):
        check_cg_values(np.array([[1.2]]), [False], domain=[(-2.5, 1.1)])


def test_cli_refuses_frames_outside_the_run_pmf_ranges(capsys, tmp_path, mb):
    """The domain comes from the run's pmf.pt (its cg_ranges), here narrower than the registered one."""
    from openmm_cgflow.ensemble import PMFEnsemble, export_pmf

    run = tmp_path / "mbrun"
    run.mkdir()
    save_model(run / "flow.pt", flow_for(mb), mb)
    export_pmf(PMFEnsemble([False], n_models=2, hidden=(8,)), run / "pmf.pt", mb.cgspace, ranges=[(-2.0, 1.0)])
    assert training_domain(mb, str(run)) == [(-2.0, 1.0)]
    np.save(tmp_path / "s.npy", np.array([[0.0], [-2.2]]))
    rc, _, err = _cli(capsys, "backmap", run, tmp_path / "s.npy", "-o", tmp_path / "o.dcd", "--quiet", "--workers", "0")
    assert rc == 2 and "s = -2.2" in err and "outside the domain [-2, 1]" in err and "--allow-outside-domain" in err
    assert "Traceback" not in err and not (tmp_path / "o.dcd").exists()


# ------------------------------------------------------------------------------------- OpenMM inputs
def test_bias_on_atoms_that_are_not_a_bonded_chain_is_refused(aldp):
    from openmm_cgflow_plugin import add_pmf_bias

    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aldp.system))
    n_forces = system.getNumForces()
    with pytest.raises(ValueError, match=r"\[0, 6, 8, 20\] is not a bonded chain.*8-20.*HarmonicBondForce"):
        add_pmf_bias(system, ALDP_PMF, cg_atoms=[[4, 6, 8, 14], [0, 6, 8, 20]])
    with pytest.raises(ValueError, match="not a bonded chain.*topology"):
        add_pmf_bias(system, ALDP_PMF, cg_atoms=[[4, 6, 8, 14], [14, 8, 6, 20]], topology=aldp.topology)
    assert system.getNumForces() == n_forces
    add_pmf_bias(system, ALDP_PMF, backend="python")  # the file's own quadruples are bonded chains
    assert system.getNumForces() == n_forces + 1


def test_positions_in_angstrom_are_refused(aldp):
    with pytest.raises(ValueError, match="positions look like angstrom; pass nm"):
        from_openmm(aldp.system, aldp.topology, aldp.positions * 10.0, 300.0, ["phi:ALA", "psi:ALA"])
    quantity = unit.Quantity(aldp.positions * 10.0, unit.angstrom)  # a Quantity says its unit: fine
    mol = from_openmm(aldp.system, aldp.topology, quantity, 300.0, ["phi:ALA", "psi:ALA"])
    assert np.allclose(mol.positions, aldp.positions)


def test_plot_axis_stays_inside_the_trained_domain(tmp_path):
    from openmm_cgflow.ensemble import PMFEnsemble, export_pmf
    from openmm_cgflow_plugin import load_pmf
    from openmm_cgflow_plugin.cgspace import CGSpace
    from openmm_cgflow_plugin.plot import _ranges

    path = export_pmf(PMFEnsemble([False], n_models=2, hidden=(8,)), tmp_path / "pmf.pt",
                      CGSpace(["s"], [False], 1202.7, []), ranges=[(-2.5, 1.1)])
    far = np.array([[-2.0], [40.0]])
    assert _ranges(load_pmf(path), far, None) == [(-2.5, 1.1)]


# --------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("damage", ["missing keys", "truncated", "flipped bytes"])
def test_broken_checkpoints_are_reported_without_a_traceback(capsys, tmp_path, damage):
    from openmm_cgflow.run_directory import CHECKPOINT_FORMAT

    run = tmp_path / "x"
    run.mkdir()
    ck = run / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "iteration": 1, "settings": {}}, ck)
    if damage != "missing keys":
        blob = bytearray(ck.read_bytes())
        if damage == "truncated":
            blob = blob[: len(blob) // 2]
        else:
            for k in range(len(blob) // 3, len(blob) // 3 + 40):
                blob[k] ^= 0xFF
        ck.write_bytes(bytes(blob))
    rc, _, err = _cli(capsys, "run", "mueller-brown", "--out", run, "--quiet", "--no-plots")
    assert rc == 2 and "Traceback" not in err, err
    assert "checkpoint" in err, err
    if damage == "missing keys":
        assert "incomplete" in err and "missing" in err and "points" in err and "flow_state" in err, err
    else:
        assert "restore a good copy" in err or "delete it" in err, err  # says what to do
    assert not (run / "pmf.pt").exists()
