"""benchmarks/baselines.py (metadynamics / OPES / MD baselines) and the alanine-dipeptide-customgb variant.

Real OpenMM throughout: a 2-walker metadynamics run of a few hundred steps, the bias-grid -> metric-bin mapping
checked on a Gaussian deposited by OpenMM's Metadynamics at a known asymmetric (phi, psi), the CV sign against
the metric's dihedral convention, and the CustomGBForce variant's energy/force parity with GBSAOBCForce.
"""

import json
import os
import sys

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import aldp_common as C  # noqa: E402
import baselines  # noqa: E402
from reference_metad import bias_probabilities  # noqa: E402

from openmm_cgflow import builtin, metrics, registry  # noqa: E402
from openmm_cgflow.alanine_dipeptide import obc_as_custom_gb  # noqa: E402


def _metad(grid):
    system, top, pos, cg = C.build_registered("alanine-dipeptide", 3.0)
    cvs = []
    for quad in cg:
        f = openmm.CustomTorsionForce("theta")
        f.addTorsion(*quad, [])
        cvs.append(app.BiasVariable(f, -np.pi, np.pi, 0.25, periodic=True, gridWidth=grid))
    meta = app.Metadynamics(system, cvs, C.TEMPERATURE * unit.kelvin, 6.0, 1.0, 500)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos)
    return meta, ctx, pos, cg


@pytest.mark.parametrize("grid", [201, None])
def test_free_energy_grid_maps_to_metric_bins(grid):
    """A hill at (phi, psi) = (1.0, -2.0) (F lowest there): the mapped probability peaks in the bin [i(1.0), j(-2.0)]."""
    meta, ctx, pos, cg = _metad(grid)
    meta._addGaussian([1.0, -2.0], 20.0 * unit.kilojoule_per_mole, ctx)  # OpenMM's own deposition
    F = meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole).T / C.KT  # -> [i_phi, j_psi]
    p = baselines.grid_probabilities(F)
    i, j = np.unravel_index(np.argmax(p), p.shape)
    edges = metrics.torus_bin_edges()
    assert edges[i] <= 1.0 < edges[i + 1] + 1e-9 and edges[j] <= -2.0 < edges[j + 1] + 1e-9, (i, j)
    if grid == 201:  # bin edges and centres are grid points: exactly the reference's Simpson integral
        V = -(5.0 / 6.0) * F
        np.testing.assert_allclose(p, bias_probabilities(V, 6.0), rtol=1e-8, atol=1e-11)
    # the CV (OpenMM theta) has the metric's dihedral sign
    cv = meta._force.getCollectiveVariableValues(ctx)
    np.testing.assert_allclose(cv, C.dihedrals(pos[None], cg)[0], atol=1e-6)


def test_metad_two_walkers_curve(tmp_path):
    """A 2-walker metaD run of 600 steps each: shared bias, evaluations = both walkers' steps, finite KLDs."""
    out = str(tmp_path / "metad")
    baselines.main(["--method", "metad", "--minutes", "5", "--max-steps", "600", "--frame-every", "100",
                    "--checkpoint-s", "0.001", "--pace", "100", "--save-every", "200", "--platform", "Reference",
                    "--out", out])
    with open(os.path.join(out, "curve.json")) as fh:
        curve = json.load(fh)
    assert curve["method"] == "metad" and set(curve["estimators"]) == {"bias", "reweight"}
    steps = [m["steps"] for m in curve["walker_metadata"]]
    assert steps == [600, 600]
    assert curve["energy_evaluations"][-1] == 1200 == curve["energy_evaluations_total"]
    assert np.all(np.diff(curve["energy_evaluations"]) > 0) and np.all(np.diff(curve["wall_s"]) >= 0)
    for e in curve["estimators"].values():
        assert len(e["kld"]) == len(curve["energy_evaluations"]) and np.all(np.isfinite(e["kld"]))
        assert np.all(np.asarray(e["kld"]) > 0) and len(e["kld_cross_reference"]) == len(e["kld"])
    assert curve["kld"] == curve["estimators"]["bias"]["kld"]
    # one shared-bias file per walker process, two distinct ids
    ids = {f.split("_")[1] for f in os.listdir(os.path.join(out, "bias")) if f.startswith("bias_")}
    assert len(ids) == 2
    # frames: every 100 steps, evaluations at each point = the walkers' steps then
    with np.load(os.path.join(out, "walker0.npz")) as z:
        np.testing.assert_array_equal(z["frame_steps"], np.arange(100, 601, 100))


def test_registered_system_matches_benchmark_system():
    """build_registered (hydrogen masses repartitioned here) == aldp_common.build_system (ForceField's HMR)."""
    s1, _, pos, cg = C.build_registered("alanine-dipeptide", 3.0)
    s2, _, _ = C.build_system(3.0)
    m1 = [s1.getParticleMass(i).value_in_unit(unit.amu) for i in range(s1.getNumParticles())]
    m2 = [s2.getParticleMass(i).value_in_unit(unit.amu) for i in range(s2.getNumParticles())]
    np.testing.assert_allclose(m1, m2, rtol=1e-12)
    assert max(m1) > 3.0 - 1e-9 and min(m1) == pytest.approx(3.0)
    assert [tuple(q) for q in cg] == [C.PHI, C.PSI]


def test_customgb_variant_same_model():
    """alanine-dipeptide-customgb: CustomGBForce instead of GBSAOBCForce, same energies and forces, same reference."""
    a, b = builtin("alanine-dipeptide"), builtin("alanine-dipeptide-customgb")
    kinds = lambda s: sorted(type(f).__name__ for f in s.getForces())  # noqa: E731
    assert "GBSAOBCForce" in kinds(a.system) and "CustomGBForce" in kinds(b.system)
    assert "GBSAOBCForce" not in kinds(b.system)
    plat = openmm.Platform.getPlatformByName("Reference")
    ca = openmm.Context(a.system, openmm.VerletIntegrator(1e-3), plat)
    cb = openmm.Context(b.system, openmm.VerletIntegrator(1e-3), plat)
    rng = np.random.default_rng(3)
    for _ in range(3):
        x = a.positions + rng.normal(0.0, 0.01, a.positions.shape)
        ca.setPositions(x)
        cb.setPositions(x)
        sa, sb = (c.getState(getEnergy=True, getForces=True) for c in (ca, cb))
        ea, eb = (s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) for s in (sa, sb))
        assert abs(ea - eb) < 1e-4, (ea, eb)
        fa, fb = (s.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) for s in (sa, sb))
        assert np.abs(fa - fb).max() < 1e-3
    assert "alanine-dipeptide-customgb" in registry.registered()
    np.testing.assert_array_equal(registry.reference("alanine-dipeptide-customgb")["probabilities"],
                                  registry.reference("alanine-dipeptide")["probabilities"])
    with pytest.raises(ValueError, match="GBSAOBCForce"):
        obc_as_custom_gb(openmm.System())


def test_grid_probabilities_unreached_region_gets_the_metric_floor():
    """+inf free energy (a kernel estimate not yet there) -> the histogram floor, not NaN; NaN is refused."""
    F = np.zeros((126, 126))
    F[:, :40] = np.inf
    p = baselines.grid_probabilities(F)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)
    assert p[:, :20].max() < 1e-11 and p[:, 60:].min() > 1e-5
    F[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        baselines.grid_probabilities(F)
