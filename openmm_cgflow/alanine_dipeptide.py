"""Alanine dipeptide and proline dipeptide: the built-in molecules, registered by name.

All are built through the same generic :func:`~openmm_cgflow.systems.from_pdb` path a user's molecule
takes (amber96 + OBC implicit solvent, NoCutoff, no constraints), with CG coordinates (phi, psi) in radians
(IUPAC/mdtraj sign). Alanine dipeptide's reference for the forward-KLD metric is the packaged
well-tempered-metadynamics PMF, ``openmm_cgflow/data/aldp_reference_pmf.npz``: 100 x 100 bins on
[-pi, pi)^2, indexed ``[i_phi, j_psi]`` (written by ``benchmarks/reference_metad.py``).

``alanine-dipeptide-customgb`` is the same molecule and the same model with a costlier implicit solvent: the
OBC term of amber96_obc.xml (a ``GBSAOBCForce``, which is OBC II: alpha, beta, gamma = 1, 0.8, 4.85, offset
0.009 nm, ACE surface term 2.25936 kJ/mol/nm^2, probe 0.14 nm) rewritten as a ``CustomGBForce``
(``openmm.app.internal.customgbforces.GBSAOBC2Force``, Amber igb=5) with the same per-atom charges, radii and
scale factors. Energies agree with the default to ~1e-5 kJ/mol (2e-8 relative; forces to ~1e-4 kJ/mol/nm)
on the Reference platform, so the packaged reference applies unchanged. Each energy+force evaluation costs
more: ~26-38x the default's on the Reference platform (custom expressions interpreted per atom pair), ~4-7x
with each on its fastest platform (CPU for this one, Reference for the default; ``benchmarks/baselines.py
--speed``). ``implicit/obc2.xml`` would not be the same model: it assigns mbondi2 radii by element instead of
amber96_obc.xml's per-type radii.
Temperatures in K.
"""

from __future__ import annotations

import openmm
import openmm.unit as unit
from openmm.app.internal.customgbforces import GBSAOBC2Force

from .metrics import load_reference_npz
from .registry import register_system
from .systems import CGSystem, data_path, from_openmm, from_pdb

#: File name of the packaged alanine-dipeptide reference (free energy + probabilities per bin).
REFERENCE_FILE = "aldp_reference_pmf.npz"


def alanine_dipeptide(temperature=300.0) -> CGSystem:
    """ACE-ALA-NME in OBC implicit solvent (amber96.xml + amber96_obc.xml), CG coordinates (phi, psi) in radians."""
    return from_pdb(data_path("alanine-dipeptide.pdb"), ["phi:ALA", "psi:ALA"], temperature, name="alanine-dipeptide")


def obc_as_custom_gb(system: openmm.System) -> openmm.System:
    """Replace the one ``GBSAOBCForce`` of ``system`` (in place) by the same OBC II model as a ``CustomGBForce``.

    Charges (e), radii (nm) and scale factors are copied per particle, and the dielectrics too; the
    ACE surface term is kept (GBSAOBCForce's default 2.25936 kJ/mol/nm^2 is GBSAOBC2Force's 'ACE'). Only
    NoCutoff systems. Returns ``system``. ValueError if there is not exactly one GBSAOBCForce, or it has a
    cutoff or a non-default surface-area energy.
    """
    found = [(i, f) for i, f in enumerate(system.getForces()) if isinstance(f, openmm.GBSAOBCForce)]
    if len(found) != 1:
        raise ValueError(f"obc_as_custom_gb: the System has {len(found)} GBSAOBCForce(s); exactly one is needed")
    index, obc = found[0]
    if obc.getNonbondedMethod() != openmm.GBSAOBCForce.NoCutoff:
        raise ValueError("obc_as_custom_gb: only a NoCutoff GBSAOBCForce can be converted")
    if abs(obc.getSurfaceAreaEnergy().value_in_unit(unit.kilojoule_per_mole / unit.nanometer ** 2)
           - 2.25936) > 1e-6:
        raise ValueError("obc_as_custom_gb: the GBSAOBCForce has a non-default surface-area energy "
                         f"({obc.getSurfaceAreaEnergy()}); GBSAOBC2Force's ACE term uses 2.25936 kJ/mol/nm^2")
    custom = GBSAOBC2Force(solventDielectric=obc.getSolventDielectric(),
                           soluteDielectric=obc.getSoluteDielectric(), SA="ACE", cutoff=None)
    for i in range(obc.getNumParticles()):
        charge, radius, scale = obc.getParticleParameters(i)
        custom.addParticle([charge.value_in_unit(unit.elementary_charge),
                            radius.value_in_unit(unit.nanometer), scale])
    custom.finalize()
    custom.setForceGroup(obc.getForceGroup())
    system.removeForce(index)
    system.addForce(custom)
    return system


def alanine_dipeptide_customgb(temperature=300.0) -> CGSystem:
    """Alanine dipeptide, the same model as ``alanine-dipeptide`` with its OBC solvent as a CustomGBForce (costlier)."""
    base = alanine_dipeptide(temperature)
    system = obc_as_custom_gb(base.system)
    return from_openmm(system, base.topology, base.positions, temperature, ["phi:ALA", "psi:ALA"],
                       name="alanine-dipeptide-customgb")


def proline_dipeptide(temperature=300.0) -> CGSystem:
    """ACE-PRO-NME in OBC implicit solvent: a ring molecule, CG coordinates (phi, psi) in radians."""
    return from_pdb(data_path("proline-dipeptide.pdb"), ["phi:PRO", "psi:PRO"], temperature, name="proline-dipeptide")


def reference() -> dict:
    """The packaged alanine-dipeptide reference (a dict, see :mod:`openmm_cgflow.metrics`), 300 K."""
    ref = load_reference_npz(data_path(REFERENCE_FILE))
    ref["name"] = "alanine-dipeptide"
    return ref


#: Active-learning settings of alanine dipeptide (LearnerSettings overrides): besides the walkers' rule, the run
#: stops once the PMF changed by less than 0.1 kT (exp(-A)-weighted RMS) since the previous iteration. In the
#: runs of issue #13 the change fell below 0.1 kT after 3-4 iterations while the walkers still found spreads
#: above 0.2 kT at the high-free-energy frontier for 8 more, with the KLD flat or drifting (benchmarks/RESULTS.md).
#: A second such iteration in a row (the earlier rule) cost 2.9e5 evaluations (5.7e5 with a retrain) and did
#: not improve the loop's PMF (KLD 0.0148 -> 0.0193, 0.0109 -> 0.0094, 0.0117 -> 0.0124 in seeds 1-3): the
#: polish below is what improves the PMF where it is populated.
#: The run ends with a polish ("polish_epochs"): 25 more epochs of the flow at the labelled points within 6 kT of
#: the PMF's minimum (at most 400), which are then labelled again with 384 samples, and a refit. The final flow's
#: true ESS/N at the basins was only 0.002-0.04, and these labels, where the KLD weighs, were off by up to
#: +0.27 kT; offline, 15 epochs took the three seed runs' KLD from 0.0068-0.0116 to 0.0031-0.0041 for ~2.5e5
#: evaluations. Stopping one iteration sooner leaves the flow less trained at the basins: seed 2 then reached
#: ESS/N 0.11 and KLD 0.0050 with 15 epochs; 10 epochs more gave 0.0031-0.0033 (benchmarks/RESULTS.md). The
#: squared loss then fits better than the exp-linear one, and twice the loop's fit steps lower the final fit's
#: KLD by ~15 % (fits of one label set: 0.0035-0.0047 against 0.0041-0.0055).
SETTINGS = dict(change_tolerance_kT=0.1, change_patience=1, polish_epochs=25, final_fit_steps=6000)

register_system("alanine-dipeptide", alanine_dipeptide, settings=SETTINGS, reference=reference)
#: The costlier variant's energies run on OpenMM's CPU platform (one thread per worker), ~6x faster than
#: Reference for its CustomGBForce (benchmarks/baselines.py --speed).
register_system("alanine-dipeptide-customgb", alanine_dipeptide_customgb, settings=dict(SETTINGS, energy_platform="CPU"),
                reference=reference)
register_system("proline-dipeptide", proline_dipeptide)
