"""Backmapping CG frames to Boltzmann-weighted all-atom samples.

Checked against independent references: a short plain-MD run of alanine dipeptide made here with OpenMM
(bond lengths and angles), mdtraj's phi/psi of the written structures, and the exact 2-D Mueller-Brown
density by quadrature. The flows are trained quickly by energy (seconds): the importance weights make
the estimates right where the flow is not.
"""

import math
import os

import mdtraj as md
import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

from openmm_cgflow import mueller_brown as M
from openmm_cgflow.backmap_output import TrajectoryWriter, backmap_file
from openmm_cgflow.backmapping import backmap, iter_backmap
from openmm_cgflow.bridge import EnergyBridge
from openmm_cgflow.cg_input import cg_frames, load_cg, md_topology
from openmm_cgflow.cli import main as cli_main
from openmm_cgflow.flow import flow_for
from openmm_cgflow.importance import sample_proposal, weighted_estimate, weighted_histogram
from openmm_cgflow.model_io import save_model
from openmm_cgflow.training import Trainer

# CG points of the quick alanine-dipeptide flow (phi, psi in radians): beta/C7eq, PII, alpha_R, extended,
# alpha_L and the regions between
ALDP_POINTS = [[-1.4, 1.3], [-1.4, 2.8], [-1.2, -0.6], [-2.6, 2.7], [1.0, -0.8], [-1.7, 0.3], [-0.9, -0.3],
               [-2.0, 1.0]]
# stereocentre of ALA: CA with N, C, CB (atom indices of the packaged PDB)
CA, N, C, CB = 8, 6, 14, 10


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def aldp_bridge(aldp):
    bridge = EnergyBridge(aldp.system, aldp.temperature, n_workers=0)
    yield bridge
    bridge.close()


@pytest.fixture(scope="module")
def aldp_flow(aldp, aldp_bridge):
    """A small flow (4 x [64, 64], float32) trained by energy at 8 CG points, ~15 s (ESS/N ~0.05-0.1)."""
    torch.set_num_threads(1)
    flow = flow_for(aldp, dtype=torch.float32, n_layers=4, hidden=(64, 64), seed=0)
    trainer = Trainer(flow, aldp, aldp_bridge, lr=2e-3, warmup_steps=20, samples_per_point=16, points_per_batch=8,
                      forward_weight=0.5, drop_worst=2, seed=0, progress=False)
    trainer.train_by_energy(ALDP_POINTS, 250)
    flow.eval()
    return flow


@pytest.fixture(scope="module")
def md_frames(aldp):
    """Plain Langevin MD of alanine dipeptide (300 K, 1 fs, no constraints, Reference platform): 200 ps after
    2 ps of equilibration from the minimised PDB structure, a frame every 23 fs -> [8700, 22, 3] nm (~8 s).

    Friction 50 / ps: the configurational distribution does not depend on it, and strong coupling to the
    bath decorrelates the energy of each bond vibration within ~20 fs (at 1 / ps the N-H bond length
    standard deviations of 60 ps differed by 20 % between the two chemically equal N-H bonds)."""
    integ = openmm.LangevinMiddleIntegrator(aldp.temperature * unit.kelvin, 50.0 / unit.picosecond,
                                            1.0 * unit.femtosecond)
    integ.setRandomNumberSeed(11)
    ctx = openmm.Context(aldp.system, integ, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(aldp.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx)
    ctx.setVelocitiesToTemperature(aldp.temperature * unit.kelvin, 12)
    integ.step(2000)
    out = np.empty((8700, aldp.n_atoms, 3))
    for i in range(len(out)):
        integ.step(23)
        out[i] = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return out


@pytest.fixture(scope="module")
def md_backmapped(aldp, aldp_flow, aldp_bridge, md_frames):
    """Every 29th MD frame (300 frames; s computed from the all-atom trajectory) backmapped, 96 samples each,
    from a defensive proposal (half of the samples from the flow with its Gaussian base widened 1.3x)."""
    traj = md.Trajectory(md_frames[::29], md_topology(aldp), time=np.arange(300) * 0.667)
    return traj, backmap(traj, aldp_flow, aldp, n_per_frame=96, bridge=aldp_bridge, seed=1, proposal_scale=1.3)


def _wrapped(a):
    return np.abs(np.angle(np.exp(1j * np.asarray(a, dtype=np.float64))))


def _phi_psi(traj):
    return np.concatenate([md.compute_phi(traj)[1], md.compute_psi(traj)[1]], axis=1)


def _bonds_and_angles(top):
    bonds = np.array([(a.index, b.index) for a, b in top.bonds])
    nb = [set() for _ in range(top.n_atoms)]
    for i, j in bonds:
        nb[i].add(j)
        nb[j].add(i)
    angles = np.array([(i, j, k) for j in range(top.n_atoms) for i in sorted(nb[j]) for k in sorted(nb[j]) if i < k])
    return bonds, angles


def _signed_volume(xyz):
    """Triple product (N - CA) . ((C - CA) x (CB - CA)) per frame: the handedness of ALA's CA."""
    x = np.asarray(xyz, dtype=np.float64)
    u, v, w = x[:, N] - x[:, CA], x[:, C] - x[:, CA], x[:, CB] - x[:, CA]
    return np.einsum("ij,ij->i", u, np.cross(v, w))


# ------------------------------------------------------------------------------------------ alanine dipeptide
def test_backmapped_frames_have_the_input_cg_coordinates(aldp, md_backmapped):
    traj_in, res = md_backmapped
    s_in = aldp.cg_of(traj_in.xyz.astype(np.float64))
    out = res.trajectory
    # the whole molecule, with its topology
    assert out.n_atoms == aldp.n_atoms == 22 and out.topology.n_residues == 3
    assert out.n_frames == len(res.log_weights) == len(res.index) >= 0.99 * 300 * 96
    # every sample has its frame's (phi, psi), as mdtraj computes them from the float32 structure
    assert _wrapped(res.s - s_in[res.index]).max() < 1e-12
    assert _wrapped(_phi_psi(out) - res.s).max() < 1e-6
    # samples of one frame are consecutive, frames in input order; times are the input's
    assert np.all(np.diff(res.index) >= 0) and res.index.max() == 299
    assert np.allclose(out.time, traj_in.time[res.index], atol=1e-4)
    # superposed onto the reference structure: mdtraj's own superposition on the heavy atoms moves nothing
    heavy = [a.index for a in out.topology.atoms if a.element.symbol != "H"]
    ref = md.Trajectory(aldp.positions[None], out.topology)
    moved = md.Trajectory(out.xyz[:50].copy(), out.topology).superpose(ref, atom_indices=heavy)
    moved_c = moved.xyz - moved.xyz[:, heavy].mean(axis=1, keepdims=True)
    assert np.abs(out.xyz[:, heavy].mean(axis=1)).max() < 1e-5
    assert np.abs(moved_c - out.xyz[:50]).max() < 1e-4
    # weights: normalised within each frame, per-frame ESS between 1 and n
    lse = np.array([np.logaddexp.reduce(res.log_weights[res.index == f]) for f in range(0, 300, 25)])
    assert np.abs(lse).max() < 1e-9
    assert np.all((res.frame_ess >= 1 - 1e-9) & (res.frame_ess <= 96 + 1e-9))


@pytest.mark.parametrize("ext", [".dcd", ".h5", ".pdb", ".xtc"])
def test_files_keep_the_cg_coordinates_and_the_weights(aldp, aldp_flow, aldp_bridge, md_frames, tmp_path, ext):
    if ext == ".h5":
        pytest.importorskip("tables")
    # a reporter-style array: s [frames, walkers, d] float32 with times
    s_walkers = aldp.cg_of(md_frames[:20:2]).reshape(5, 2, 2).astype(np.float32)
    path = tmp_path / f"bm{ext}"
    summary = backmap_file((aldp_flow, aldp), s_walkers, path, n_per_frame=3, progress=False, bridge=aldp_bridge)
    back = md.load(str(path), top=md_topology(aldp)) if ext in (".dcd", ".xtc") else md.load(str(path))
    w = np.load(str(path) + ".weights.npz")
    assert back.n_frames == summary.n_written == len(w["log_weights"]) == 30 - summary.n_wrong_chirality
    assert back.n_atoms == 22
    # DCD and HDF5 keep float32: dihedrals to ~1e-7 rad; PDB keeps 0.001 A and XTC 0.001 nm (lossy)
    tol = {".dcd": 1e-6, ".h5": 1e-6, ".pdb": 5e-3, ".xtc": 5e-2}[ext]
    assert _wrapped(_phi_psi(back) - w["s"]).max() < tol
    assert _wrapped(w["s"] - s_walkers.reshape(-1, 2)[w["index"]]).max() < 1e-12
    if ext in (".h5", ".xtc"):  # formats with times: the CG frame's time (5 frames of 2 walkers, time_ps = frame)
        assert np.allclose(back.time, w["index"] // 2)
    assert np.array_equal(w["frame"], w["index"] // 2) and np.array_equal(w["walker"], w["index"] % 2)
    assert w["frame_ess"].shape == (10,) and int(w["n_drawn"]) == 30
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    if ext in (".dcd", ".xtc"):
        assert md.load(str(tmp_path / "bm.top.pdb")).n_atoms == 22


def test_weighted_bond_and_angle_statistics_match_md(aldp, md_frames, md_backmapped):
    """Weighted means and standard deviations of every bond length (21) and bond angle (36) agree with plain MD
    within 10 %; the proposal alone is off by ~15 % (rms) in the standard deviations: the weights do the work."""
    _, res = md_backmapped
    top = res.trajectory.topology
    bonds, angles = _bonds_and_angles(top)
    assert len(bonds) == 21 and len(angles) == 36
    ref_traj = md.Trajectory(md_frames, top)
    for name, compute, idx in (("bond", md.compute_distances, bonds), ("angle", md.compute_angles, angles)):
        ref = compute(ref_traj, idx).astype(np.float64)
        got = compute(res.trajectory, idx).astype(np.float64)
        est = res.estimate(got)
        alone = weighted_estimate(got, np.zeros(len(got)), frame=res.index)
        assert est.ess > 800, est.ess
        rel_mean = np.abs(est.mean / ref.mean(0) - 1)
        rel_std = est.std / ref.std(0) - 1
        assert rel_mean.max() < 0.1, (name, rel_mean.max())
        assert np.abs(rel_std).max() < 0.1, (name, np.round(rel_std, 3))
        rms, rms_alone = np.sqrt(np.mean(rel_std**2)), np.sqrt(np.mean((alone.std / ref.std(0) - 1) ** 2))
        assert rms < 0.05 and rms_alone > 2 * rms, (name, rms, rms_alone)


def test_trained_flow_gives_l_alanine_and_wrong_chirality_is_flagged(aldp, aldp_flow, aldp_bridge, md_frames):
    # >= 99 % of the raw samples of the trained flow are L (before any flag); the kept ones all are
    traj = md.Trajectory(md_frames[::87], md_topology(aldp))
    res = backmap(traj, aldp_flow, aldp, n_per_frame=40, bridge=aldp_bridge, seed=4, keep_wrong_chirality=True)
    assert res.n_drawn == 100 * 40 == res.trajectory.n_frames + res.n_nonfinite
    assert res.fraction_wrong_chirality <= 0.01
    ref_sign = np.sign(_signed_volume(aldp.positions[None]))[0]
    signs = np.sign(_signed_volume(res.trajectory.xyz))
    assert np.array_equal(signs != ref_sign, res.wrong_chirality)
    # a much wider proposal makes D samples: dropped by default, kept with weight zero when asked
    s = np.array([[-1.4, 1.3]] * 50)
    wide = backmap(s, aldp_flow, aldp, n_per_frame=8, bridge=aldp_bridge, proposal_scale=8.0, seed=2)
    kept = backmap(s, aldp_flow, aldp, n_per_frame=8, bridge=aldp_bridge, proposal_scale=8.0, seed=2,
                     keep_wrong_chirality=True)
    assert wide.n_wrong_chirality == kept.n_wrong_chirality > 0
    assert not wide.wrong_chirality.any()
    assert np.all(np.sign(_signed_volume(wide.trajectory.xyz)) == ref_sign)
    flagged = kept.wrong_chirality
    assert flagged.sum() == kept.n_wrong_chirality
    assert np.all(np.sign(_signed_volume(kept.trajectory.xyz[flagged])) == -ref_sign)
    assert np.all(np.isneginf(kept.log_weights[flagged])) and np.all(kept.weights[flagged] == 0)
    assert np.all(np.isfinite(kept.log_weights[~flagged]))
    assert kept.trajectory.n_frames == wide.trajectory.n_frames + kept.n_wrong_chirality


@pytest.mark.slow
def test_weighted_statistics_match_md_closely_with_a_longer_trained_flow(aldp, aldp_bridge, md_frames):
    """The same comparison with a flow trained 4x longer (~1 min) and 400 frames x 128 samples: every standard
    deviation within 7 % of MD, every mean within 1 %."""
    flow = flow_for(aldp, dtype=torch.float32, n_layers=4, hidden=(64, 64), seed=0)
    trainer = Trainer(flow, aldp, aldp_bridge, lr=2e-3, warmup_steps=20, samples_per_point=16, points_per_batch=8,
                      forward_weight=0.5, drop_worst=2, seed=0, progress=False)
    trainer.train_by_energy(ALDP_POINTS, 1000)
    top = md_topology(aldp)
    res = backmap(md.Trajectory(md_frames[::21][:400], top), flow, aldp, n_per_frame=128, bridge=aldp_bridge,
                    seed=1, proposal_scale=1.3)
    bonds, angles = _bonds_and_angles(top)
    ref_traj = md.Trajectory(md_frames, top)
    for compute, idx in ((md.compute_distances, bonds), (md.compute_angles, angles)):
        ref = compute(ref_traj, idx).astype(np.float64)
        est = res.estimate(compute(res.trajectory, idx).astype(np.float64))
        assert np.abs(est.mean / ref.mean(0) - 1).max() < 0.01
        assert np.abs(est.std / ref.std(0) - 1).max() < 0.07, np.round(est.std / ref.std(0) - 1, 3)


def test_defensive_proposal_density_is_the_mixture(aldp, aldp_flow, mb, mb_flow):
    """log q of the defensive proposal equals log[(1 - a) q_flow + a q_wide] computed through the inverse flow."""
    gen = torch.Generator().manual_seed(0)
    for flow, s, tol in ((mb_flow, torch.linspace(-2.4, 1.0, 64, dtype=torch.float64)[:, None], 1e-9),
                         (aldp_flow, torch.tensor(ALDP_POINTS * 8, dtype=torch.float32), 2e-2)):
        tau, a = 1.5, 0.3
        with torch.no_grad():
            fine, log_q = sample_proposal(flow, s, gen, tau, a)
            z, log_det_inv = flow.inverse_transform(fine, s)
        nc = ~flow.circular
        n_nc, n_c = int(nc.sum()), int(flow.circular.sum())
        r2 = (z[:, nc].double() ** 2).sum(1)
        log_narrow = -0.5 * r2 - 0.5 * n_nc * math.log(2 * math.pi)
        log_wide = -0.5 * r2 / tau**2 - n_nc * math.log(tau) - 0.5 * n_nc * math.log(2 * math.pi)
        expected = torch.logaddexp(log_narrow + math.log(1 - a), log_wide + math.log(a)) - n_c * math.log(
            2 * math.pi) + log_det_inv.double()
        assert torch.allclose(log_q.double(), expected, atol=tol, rtol=0), (log_q.double() - expected).abs().max()
    # proposal_scale 1: the flow's own samples and densities
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s = torch.zeros(16, 1, dtype=torch.float64)
    with torch.no_grad():
        a1, b1 = sample_proposal(mb_flow, s, g1, 1.0)
        a2, b2 = mb_flow.sample(s, generator=g2)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


# ------------------------------------------------------------------------------------------ Mueller-Brown
MB_KT = 10.0  # kJ/mol (beta = 0.1)
MB_X, MB_Y, MB_BINS = (-1.8, 1.2), (-0.6, 2.2), 20
S_RANGE = (-2.5, 1.1)


def _mb_exact():
    """Exact 2-D bin probabilities [20, 20] of exp(-U / kT) on s = x - y in [-2.5, 1.1] (20 x 20 sub-bins of
    quadrature per bin), and the exact marginal CDF of s on a fine grid (for drawing s ~ p(s))."""
    sub = 20
    xe = np.linspace(*MB_X, MB_BINS * sub + 1)
    ye = np.linspace(*MB_Y, MB_BINS * sub + 1)
    X, Y = np.meshgrid((xe[1:] + xe[:-1]) / 2, (ye[1:] + ye[:-1]) / 2, indexing="ij")
    u = M.potential(X, Y) / MB_KT
    p = np.exp(-(u - u.min())) * ((X - Y >= S_RANGE[0]) & (X - Y <= S_RANGE[1]))
    P = p.reshape(MB_BINS, sub, MB_BINS, sub).sum(axis=(1, 3))
    # mass of the s-window outside the (x, y) box is negligible: check it below against the 1-D marginal
    s_grid = np.linspace(*S_RANGE, 3601)
    f = np.linspace(-4.0, 6.0, 5001)
    SS, FF = np.meshgrid(s_grid, f, indexing="ij")
    uu = M.potential((SS + FF) / 2, (FF - SS) / 2) / MB_KT
    ps = np.exp(-(uu - uu.min())).sum(axis=1)
    cdf = np.concatenate([[0.0], np.cumsum((ps[1:] + ps[:-1]) / 2)])
    box_mass = P.sum() * (xe[1] - xe[0]) * (ye[1] - ye[0]) * np.exp(uu.min() - u.min())
    total_mass = cdf[-1] * (s_grid[1] - s_grid[0]) * (f[1] - f[0]) / 2
    return P / P.sum(), s_grid, cdf / cdf[-1], box_mass / total_mass


@pytest.fixture(scope="module")
def mb_flow(mb):
    """Mueller-Brown's default flow trained by energy at 32 points of [-2.5, 1.1] (480 steps, ~6 s)."""
    torch.set_num_threads(1)
    flow = flow_for(mb)
    with EnergyBridge(mb.system, mb.temperature, n_workers=0) as bridge:
        trainer = Trainer(flow, mb, bridge, lr=3e-3, warmup_steps=20, samples_per_point=8, points_per_batch=8,
                          forward_weight=0.5, seed=0, progress=False)
        trainer.train_by_energy(np.linspace(*S_RANGE, 32)[:, None], 120, lr_final=1e-4)
    flow.eval()
    return flow


def test_mueller_brown_backmapping_reproduces_the_exact_2d_density(mb, mb_flow):
    P, s_grid, cdf, box_fraction = _mb_exact()
    assert box_fraction > 0.999  # the histogram box holds the whole density of the s-window
    rng = np.random.default_rng(0)
    s = np.interp(rng.uniform(size=12000), cdf, s_grid)  # exact marginal p(s) by inverse CDF
    with EnergyBridge(mb.system, mb.temperature, n_workers=0) as bridge:
        res = backmap(s, mb_flow, mb, n_per_frame=16, bridge=bridge, seed=3, batch_size=16384)
    xy = res.trajectory.xyz[:, 0, :2].astype(np.float64)
    # every sample has its s
    assert np.abs((xy[:, 0] - xy[:, 1]) - res.s[:, 0]).max() < 1e-6
    edges = [np.linspace(*MB_X, MB_BINS + 1), np.linspace(*MB_Y, MB_BINS + 1)]
    fw = np.exp(res.log_weights) / len(s)  # frames of p(s), weights normalised per frame
    H = np.histogram2d(xy[:, 0], xy[:, 1], bins=edges, weights=fw)[0]
    Hq = np.histogram2d(xy[:, 0], xy[:, 1], bins=edges)[0] / len(xy)  # the flow alone, unweighted
    m = P > 0

    def kld(h):
        return float(np.sum(P[m] * np.log(P[m] / np.maximum(h[m], 1e-12))))

    assert kld(H) <= 0.01, (kld(H), kld(Hq))
    assert kld(Hq) > 2 * kld(H)  # the weights matter
    # weighted marginal of x agrees too (bin probabilities)
    hist, se, _ = res.histogram(xy[:, 0], bins=edges[0], density=False)
    assert np.abs(hist - P.sum(axis=1)).max() < 0.03 and np.all(se >= 0) and se.max() < 0.01


def test_streaming_bounds_memory_for_100k_frames(mb, mb_flow, tmp_path, monkeypatch):
    """backmap_file writes chunk by chunk: 100,000 CG frames never hold more than batch_size samples at a
    time, and the process's peak memory grows by far less than one unchunked pass would need."""
    status = "/proc/self/status"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set size (VmHWM) of this process
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to measure the peak memory")

    def rss_kb(key):
        with open(status) as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key))

    sizes = []
    write = TrajectoryWriter.write

    def spy(self, xyz, time_ps=None):
        sizes.append(len(xyz))
        return write(self, xyz, time_ps)

    monkeypatch.setattr(TrajectoryWriter, "write", spy)
    s = np.random.default_rng(1).uniform(-2.5, 1.1, size=(100_000, 1))
    with EnergyBridge(mb.system, mb.temperature, n_workers=0) as bridge:
        backmap_file((mb_flow, mb), s[:2000], tmp_path / "warm.dcd", progress=False, bridge=bridge, batch_size=4096)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = rss_kb("VmRSS:")
        sizes.clear()
        summary = backmap_file((mb_flow, mb), s, tmp_path / "mb.dcd", progress=False, bridge=bridge,
                                 batch_size=4096)
        peak = rss_kb("VmHWM:")
    assert summary.n_written == 100_000 and sum(sizes) == 100_000
    assert max(sizes) <= 4096 and len(sizes) >= 100_000 // 4096
    assert md.load(str(tmp_path / "mb.dcd"), top=md_topology(mb)).n_frames == 100_000
    # measured: ~20 MB with batch_size 4096; ~150 MB when the 100,000 frames go through in one chunk
    assert (peak - base) / 1024 < 60, (peak - base) / 1024


# ------------------------------------------------------------------------------------------ estimates
def test_weighted_estimate_standard_error_and_ess_are_calibrated():
    """Self-normalised importance sampling of N(0, 1) from q = N(0.3, 1.5^2): the reported standard errors
    match the spread of the estimates over repetitions; ESS is Kish's."""
    rng = np.random.default_rng(0)
    means, ses, stds, std_ses = [], [], [], []
    for _ in range(300):
        x = rng.normal(0.3, 1.5, size=400)
        lw = -0.5 * x**2 + 0.5 * ((x - 0.3) / 1.5) ** 2
        e = weighted_estimate(x, lw)
        means.append(e.mean), ses.append(e.stderr), stds.append(e.std), std_ses.append(e.std_stderr)
        w = np.exp(lw - lw.max())
        assert math.isclose(e.ess, w.sum() ** 2 / (w**2).sum(), rel_tol=1e-9)
    assert abs(np.mean(means)) < 0.03 and abs(np.mean(stds) - 1) < 0.03
    assert 0.85 < np.std(means) / np.mean(ses) < 1.15
    assert 0.8 < np.std(stds) / np.mean(std_ses) < 1.25
    # per-frame weights: equal weights, one sample per frame -> mean and s / sqrt(N)
    g = rng.normal(size=(1000, 2))
    e = weighted_estimate(g, np.zeros(1000), frame=np.arange(1000))
    assert np.allclose(e.mean, g.mean(0)) and np.allclose(e.stderr, g.std(0, ddof=1) / math.sqrt(1000))
    assert e.ess == pytest.approx(1000) and e.n_frames == 1000
    # frames of several samples count once each, whatever their number of samples
    frame = np.repeat([0, 1], [1, 9])
    e = weighted_estimate(np.r_[1.0, np.zeros(9)], np.zeros(10), frame=frame)
    assert e.mean == pytest.approx(0.5)
    # log frame weights reweight frames (e.g. a biased CG simulation)
    e = weighted_estimate(np.r_[1.0, np.zeros(9)], np.zeros(10), frame=frame, log_frame_weights=np.log([3.0, 1.0]))
    assert e.mean == pytest.approx(0.75)
    # correlated frames: blocks longer than the correlation time give the right error, single frames do not
    ar = np.zeros(20000)
    noise = rng.normal(size=20000)
    for i in range(1, len(ar)):
        ar[i] = 0.9 * ar[i - 1] + noise[i]
    naive = weighted_estimate(ar, np.zeros(len(ar)), frame=np.arange(len(ar)))
    blocked = weighted_estimate(ar, np.zeros(len(ar)), frame=np.arange(len(ar)), block_size=200)
    exact_se = math.sqrt(np.var(ar) * (1 + 0.9) / (1 - 0.9) / len(ar))  # AR(1): integrated autocorrelation
    assert naive.stderr < 0.4 * exact_se and 0.75 < blocked.stderr / exact_se < 1.25


def test_weighted_histogram_errors_are_calibrated():
    """Bin probabilities of N(0, 1) reweighted from q = N(0, 1.3^2), 4 samples per frame: their standard errors
    match the spread over repetitions, and density=True divides by the bin widths."""
    rng = np.random.default_rng(1)
    edges = np.linspace(-3, 3, 13)
    hists, ses = [], []
    for _ in range(300):
        x = rng.normal(0.0, 1.3, size=800)
        lw = -0.5 * x**2 + 0.5 * (x / 1.3) ** 2
        h, se, e = weighted_histogram(x, lw, frame=np.repeat(np.arange(200), 4), bins=edges, density=False)
        hists.append(h), ses.append(se)
    hists, ses = np.array(hists), np.array(ses)
    ratio = hists.std(axis=0) / ses.mean(axis=0)
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio
    exact = np.diff([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in edges])
    # 4 samples per frame, normalised per frame: a small self-normalisation bias (O(1/4) of the weight variance)
    assert np.abs(hists.mean(axis=0) - exact).max() < 0.015
    d, dse, _ = weighted_histogram(x, lw, bins=edges, density=True)
    h, hse, _ = weighted_histogram(x, lw, bins=edges, density=False)
    assert np.allclose(d, h / 0.5) and np.allclose(dse, hse / 0.5)


# ------------------------------------------------------------------------------------------ CLI and inputs
def test_cli_backmaps_a_reporter_file_from_a_run_directory(aldp, aldp_flow, md_frames, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_model(run / "flow.pt", aldp_flow, aldp)
    s = aldp.cg_of(md_frames[:40:4]).reshape(5, 2, 2).astype(np.float32)
    np.savez(tmp_path / "walkers.npz", s=s, spread=np.zeros((5, 2), np.float32), time_ps=np.arange(5) * 2.0,
             cg_names=np.array(["phi", "psi"]))
    out = tmp_path / "out.dcd"
    rc = cli_main(["backmap", str(run), str(tmp_path / "walkers.npz"), "-o", str(out), "-n", "4", "--workers", "0",
                   "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "backmapped 10 CG frames x 4 samples" in printed and str(out) in printed
    w = np.load(str(out) + ".weights.npz")
    traj = md.load(str(out), top=str(tmp_path / "out.top.pdb"))
    assert traj.n_frames == len(w["log_weights"]) > 0
    assert _wrapped(_phi_psi(traj) - w["s"]).max() < 1e-6
    assert np.array_equal(w["time_ps"], (w["index"] // 2) * 2.0)
    # an all-atom trajectory as CG input (its s is computed), and the errors the CLI reports
    md.Trajectory(md_frames[:6], md_topology(aldp)).save_dcd(str(tmp_path / "aa.dcd"))
    assert cli_main(["backmap", str(run / "flow.pt"), str(tmp_path / "aa.dcd"), "-o", str(tmp_path / "aa_bm.dcd"),
                     "--workers", "0", "--quiet"]) == 0
    w = np.load(str(tmp_path / "aa_bm.dcd.weights.npz"))
    assert np.abs(w["s"] - aldp.cg_of(md.load(str(tmp_path / "aa.dcd"), top=md_topology(aldp)).xyz)[w["index"]]).max() < 1e-9
    capsys.readouterr()
    np.save(tmp_path / "bad.npy", np.zeros((4, 3)))
    assert cli_main(["backmap", str(run), str(tmp_path / "bad.npy"), "-o", str(out), "--quiet"]) == 2
    assert "2 (phi, psi)" in capsys.readouterr().err
    assert cli_main(["backmap", str(run), str(tmp_path / "walkers.npz"), "-o", str(tmp_path / "x.mol2"),
                     "--quiet"]) == 2
    assert "output format" in capsys.readouterr().err


def test_bad_inputs_are_refused_with_clear_errors(aldp, mb, aldp_flow, mb_flow, tmp_path):
    with pytest.raises(ValueError, match="components per frame"):
        cg_frames(np.zeros((3, 3)), aldp)
    with pytest.raises(ValueError, match="NaN"):
        cg_frames(np.array([[0.0, np.nan]]), aldp)
    with pytest.raises(ValueError, match="does not belong"):
        backmap(np.zeros((2, 1)), aldp_flow, mb, bridge=object())
    with pytest.raises(ValueError, match="empty"):
        backmap(np.zeros((0, 2)), aldp_flow, aldp, bridge=object())
    with pytest.raises(ValueError, match="n_per_frame"):
        backmap(np.zeros((1, 2)), aldp_flow, aldp, n_per_frame=0, bridge=object())
    with pytest.raises(TypeError, match="CGSystem"):
        backmap(np.zeros((1, 2)), aldp_flow)
    np.savez(tmp_path / "no_s.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no array 's'"):
        load_cg(tmp_path / "no_s.npz", aldp)
    with pytest.raises(FileNotFoundError):
        load_cg(tmp_path / "missing.npz", aldp)
    # text arrays; periodic coordinates are wrapped to [-pi, pi)
    np.savetxt(tmp_path / "s.txt", [[4.0, -1.0], [0.5, 0.5]])
    f = load_cg(tmp_path / "s.txt", aldp)
    assert np.allclose(f.s, [[4.0 - 2 * math.pi, -1.0], [0.5, 0.5]])
    # Mueller-Brown: a flat array is one frame per entry
    assert cg_frames(np.array([0.1, 0.2, 0.3]), mb).s.shape == (3, 1)


def test_more_samples_per_frame_than_batch_size_and_chunks_of_whole_frames(mb, mb_flow):
    with EnergyBridge(mb.system, mb.temperature, n_workers=0) as bridge:
        chunks = list(iter_backmap(np.array([-2.0, -0.5, 0.6]), mb_flow, mb, n_per_frame=10, bridge=bridge,
                                   batch_size=4))
        assert [len(c.index) for c in chunks] == [10, 10, 10] and [c.first_index for c in chunks] == [0, 1, 2]
        for c in chunks:
            assert np.logaddexp.reduce(c.log_weights) == pytest.approx(0.0, abs=1e-12)
        chunks = list(iter_backmap(np.linspace(-2, 0.5, 7), mb_flow, mb, n_per_frame=3, bridge=bridge,
                                   batch_size=7))
        assert [len(c.index) for c in chunks] == [6, 6, 6, 3]  # whole frames, at most batch_size samples


def test_package_exports_the_backmap_function():
    import openmm_cgflow

    from openmm_cgflow import backmap, weighted_estimate  # noqa: F401

    assert callable(backmap) and callable(openmm_cgflow.backmap)
    assert hasattr(openmm_cgflow, "backmap_file")
