"""Backmapping: coarse-grained frames -> Boltzmann-weighted all-atom samples.

For each CG frame s_f, ``n_per_frame`` fine coordinates fine_fi ~ q(. | s_f) are drawn from the
conditional flow and mapped to Cartesian positions x_fi = x(fine_fi, s_f) (nm), which have exactly the
frame's CG coordinates. Each sample carries the log importance weight

    log w_fi = -u(x_fi) + log_det_fi - log q(fine_fi | s_f)          (u = E / kT; natural log)

normalised within its frame, log w~_fi = log w_fi - logsumexp_i log w_fi. For any observable g,
sum_i w~_fi g(x_fi) estimates the Boltzmann average of g at fixed s = s_f (self-normalised importance
sampling: consistent as n_per_frame grows, exact for a perfect flow at any n_per_frame). Averaged over CG
frames drawn from the CG equilibrium p(s) (CG dynamics on the PMF, or reweighted enhanced sampling), it
estimates the all-atom Boltzmann average <g>: see :func:`weighted_estimate` and :func:`weighted_histogram`.

Accuracy: per frame this is self-normalised importance sampling with n_per_frame samples, biased by
O(1 / n_per_frame) times the spread of the weights. With one sample per frame the weights are all 1 and the
samples follow the flow, not the Boltzmann conditional; the weights correct the flow only with several
samples per frame, and the per-frame ESS (``frame_ess``) says how much. A flow trained by reverse KL tends
to be narrower than the Boltzmann conditional: ``proposal_scale`` > 1 draws half of the samples from the
flow with a widened base (a defensive mixture, exact weights), which removes most of that bias at a small
cost in ESS. Measured on alanine dipeptide with a flow trained for ~15 s (ESS per frame ~5 of 96): weighted
standard deviations of all bonds and angles within 10 % of MD (rms 3-4 %), the flow alone 15-18 % (rms).

Samples with the wrong chirality (e.g. D-alanine, see ``coordinates.InternalCoordinates.chirality_ok``)
get weight zero and are flagged; they are dropped from the output unless ``keep_wrong_chirality``.
Samples with non-finite positions or energies are always dropped (weight zero). Molecules are
superposed onto the reference structure (heavy atoms, Kabsch in float64), translated so that the centroid of
the alignment atoms is at the origin: mdtraj stores float32 positions, and small coordinates keep the CG
dihedrals of the written structures within ~3e-7 rad of the input s. A point particle (Mueller-Brown) keeps
its absolute position.

Streaming: :func:`iter_backmap` works chunk by chunk (about ``batch_size`` samples at a time), and
:func:`backmap_file` appends each chunk to the output file, so memory stays bounded for any number of CG
frames (only the per-sample weights, a few tens of bytes each, are kept until the end).

Units: positions nm, s radians (dihedrals, mdtraj/IUPAC sign) or nm (Mueller-Brown), energies kT.
"""

from __future__ import annotations

import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "BackmapChunk",
    "BackmapResult",
    "BackmapSummary",
    "CGFrames",
    "TrajectoryWriter",
    "WeightedEstimate",
    "backmap",
    "backmap_file",
    "cg_frames",
    "iter_backmap",
    "load_cg",
    "md_topology",
    "superpose",
    "weighted_estimate",
    "weighted_histogram",
]

#: Output formats written by :class:`TrajectoryWriter` (by file extension).
OUTPUT_FORMATS = (".dcd", ".xtc", ".h5", ".pdb")
#: Extensions read as arrays of CG coordinates by :func:`load_cg` (anything else goes to mdtraj).
ARRAY_FORMATS = (".npz", ".npy", ".txt", ".dat", ".csv")


# ------------------------------------------------------------------------------------------ CG input
@dataclass
class CGFrames:
    """CG frames to backmap, flattened to one row per (time, walker).

    s: [F, n_cg] float64 (radians for periodic dims, wrapped to [-pi, pi); nm otherwise).
    frame: [F] time index of each row in the input. walker: [F] walker index (0 for a single trajectory).
    time_ps: [F] simulation time of each row (ps) or None when the input has none.
    """

    s: np.ndarray
    frame: np.ndarray
    walker: np.ndarray
    time_ps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.s)


def md_topology(cgsystem):
    """The system's topology as an ``mdtraj.Topology``."""
    import mdtraj as md

    return md.Topology.from_openmm(cgsystem.topology)


def _wrap_periodic(s: np.ndarray, periodic: Sequence[bool]) -> np.ndarray:
    s = np.array(s, dtype=np.float64, copy=True)
    for k, p in enumerate(periodic):
        if p:
            s[:, k] = np.mod(s[:, k] + math.pi, 2.0 * math.pi) - math.pi
    return s


def _cg_of_positions(cgsystem, xyz_nm: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """CG coordinates [B, n_cg] of positions [B, n_atoms, 3] nm, in chunks."""
    out = [cgsystem.cg_of(xyz_nm[i : i + chunk]) for i in range(0, len(xyz_nm), chunk)]
    return np.concatenate(out) if out else np.zeros((0, cgsystem.n_cg))


def cg_frames(cg, cgsystem, time_ps=None) -> CGFrames:
    """CG frames from an array of s ([F, n_cg], [F, walkers, n_cg], or [F] when n_cg = 1), an
    ``mdtraj.Trajectory`` of the whole molecule (its s is computed), a :class:`CGFrames`, or a file path
    (see :func:`load_cg`). Raises ValueError for wrong shapes or non-finite values."""
    if isinstance(cg, CGFrames):
        return cg
    if isinstance(cg, (str, os.PathLike)):
        return load_cg(cg, cgsystem)
    try:
        import mdtraj as md

        if isinstance(cg, md.Trajectory):
            if cg.n_atoms != cgsystem.n_atoms:
                raise ValueError(f"the trajectory has {cg.n_atoms} atoms, the model's system {cgsystem.n_atoms}")
            s = _cg_of_positions(cgsystem, cg.xyz.astype(np.float64))
            t = None if cg.time is None else np.asarray(cg.time, dtype=np.float64)
            return CGFrames(_wrap_periodic(s, cgsystem.cg_periodic), np.arange(len(s)), np.zeros(len(s), np.int64), t)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cg, torch.Tensor):
        cg = cg.detach().cpu().numpy()
    s = np.asarray(cg, dtype=np.float64)
    d = cgsystem.n_cg
    if s.ndim == 1:
        s = s.reshape(-1, 1) if d == 1 else s.reshape(1, -1)
    if s.ndim == 2:
        n_t, n_w = s.shape[0], 1
    elif s.ndim == 3:
        n_t, n_w = s.shape[0], s.shape[1]
    else:
        raise ValueError(f"CG coordinates must have shape [frames, {d}] or [frames, walkers, {d}], got {s.shape}")
    if s.shape[-1] != d:
        raise ValueError(
            f"CG coordinates have {s.shape[-1]} components per frame but the model has {d} "
            f"({', '.join(cgsystem.cg_names)}); expected shape [frames, {d}] or [frames, walkers, {d}]"
        )
    s = s.reshape(-1, d)
    bad = ~np.isfinite(s).all(axis=1)
    if bad.any():
        raise ValueError(f"CG coordinates contain NaN or inf in {int(bad.sum())} frame(s), e.g. row {int(np.argmax(bad))}")
    frame = np.repeat(np.arange(n_t), n_w)
    walker = np.tile(np.arange(n_w), n_t)
    t = None
    if time_ps is not None:
        time_ps = np.asarray(time_ps, dtype=np.float64).reshape(-1)
        if len(time_ps) != n_t:
            raise ValueError(f"time_ps has {len(time_ps)} entries for {n_t} frames")
        t = time_ps[frame]
    return CGFrames(_wrap_periodic(s, cgsystem.cg_periodic), frame, walker, t)


def load_cg(path, cgsystem, chunk: int = 10000) -> CGFrames:
    """CG frames from a file.

    * ``.npz``: key ``s`` ([frames, walkers, d] from the plugin's CG reporter, or [frames, d]); ``time_ps``
      [frames] is used when present.
    * ``.npy``, ``.txt``/``.dat``/``.csv`` (whitespace or comma separated): an array of s [frames, d].
    * anything else: an all-atom trajectory read by mdtraj (DCD, XTC, HDF5, PDB, ...), chunk by chunk; the
      model's topology is used for formats without one. Its CG coordinates are computed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CG file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "s" not in data:
                raise ValueError(f"{path} has no array 's' of CG coordinates (keys: {sorted(data.keys())})")
            s = data["s"]
            t = data["time_ps"] if "time_ps" in data else None
        if t is not None and (s.ndim < 2 or len(np.asarray(t).reshape(-1)) != s.shape[0]):
            t = None
        return cg_frames(s, cgsystem, time_ps=t)
    if ext == ".npy":
        return cg_frames(np.load(path, allow_pickle=False), cgsystem)
    if ext in (".txt", ".dat", ".csv"):
        try:
            s = np.loadtxt(path, delimiter="," if ext == ".csv" else None, ndmin=2)
        except ValueError as exc:
            raise ValueError(f"could not read CG coordinates from {path}: {exc}") from exc
        if cgsystem.n_cg == 1 and s.shape[1] != 1 and s.shape[0] == 1:
            s = s.T
        return cg_frames(s, cgsystem)
    import mdtraj as md

    top = md_topology(cgsystem)
    needs_top = ext not in (".pdb", ".h5", ".pdb.gz", ".cif", ".mol2", ".gro")
    s_parts, t_parts = [], []
    try:
        it = md.iterload(path, top=top, chunk=chunk) if needs_top else md.iterload(path, chunk=chunk)
        for traj in it:
            if traj.n_atoms != cgsystem.n_atoms:
                raise ValueError(f"{path} has {traj.n_atoms} atoms; the model's system has {cgsystem.n_atoms}")
            s_parts.append(_cg_of_positions(cgsystem, traj.xyz.astype(np.float64)))
            t_parts.append(np.asarray(traj.time, dtype=np.float64))
    except (OSError, IOError, TypeError, KeyError) as exc:
        raise ValueError(f"could not read {path} as a CG array (.npz/.npy/.txt) or an all-atom trajectory: {exc}") from exc
    s = np.concatenate(s_parts) if s_parts else np.zeros((0, cgsystem.n_cg))
    t = np.concatenate(t_parts) if t_parts else None
    return CGFrames(_wrap_periodic(s, cgsystem.cg_periodic), np.arange(len(s)), np.zeros(len(s), np.int64), t)


# ------------------------------------------------------------------------------------------ geometry
def superpose(x: np.ndarray, reference: np.ndarray, atoms=None) -> np.ndarray:
    """Rigid-body superposition (Kabsch, float64) of every structure x [B, n, 3] onto reference [n, 3]
    using the atoms ``atoms`` (indices; None = all). Returns the moved structures [B, n, 3]; internal
    coordinates (bonds, angles, dihedrals) are unchanged up to float64 round-off."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    idx = np.arange(x.shape[1]) if atoms is None else np.asarray(atoms, dtype=np.int64)
    a = x[:, idx]
    xc = a.mean(axis=1, keepdims=True)
    rc = ref[idx].mean(axis=0)
    h = np.einsum("bni,nj->bij", a - xc, ref[idx] - rc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(u @ vt))
    d = np.where(d == 0, 1.0, d)
    u[:, :, 2] *= d[:, None]
    rot = u @ vt
    return np.einsum("bni,bij->bnj", x - xc, rot) + rc


def _alignment_atoms(cgsystem, align):
    """Atom indices for superposition, or None for no superposition."""
    if align is None or align is False or cgsystem.n_atoms < 3:
        return None
    if align is True or align == "heavy":
        heavy = [
            a.index for a in cgsystem.topology.atoms()
            if a.element is None or getattr(a.element, "symbol", "H") not in ("H", "D")
        ]
        return np.asarray(heavy if len(heavy) >= 3 else range(cgsystem.n_atoms), dtype=np.int64)
    if align == "all":
        return np.arange(cgsystem.n_atoms)
    idx = np.asarray(align, dtype=np.int64).reshape(-1)
    if len(idx) < 3 or idx.min() < 0 or idx.max() >= cgsystem.n_atoms:
        raise ValueError(f"align must be True, 'heavy', 'all', None or >= 3 atom indices in 0..{cgsystem.n_atoms - 1}")
    return idx


# ------------------------------------------------------------------------------------------ sampling
@dataclass
class BackmapChunk:
    """Backmapped samples of a run of consecutive CG frames (what :func:`iter_backmap` yields).

    xyz: [n, n_atoms, 3] float32 nm (superposed onto the reference for molecules).
    log_weights: [n] log importance weights normalised within each frame (logsumexp over a frame's kept
        samples = 0; -inf for wrong-chirality samples kept with ``keep_wrong_chirality``).
    log_weights_raw: [n] unnormalised -u + log_det - log q (kT units; natural log).
    index: [n] row of the sample's CG frame in the input (0..F-1).
    s: [n, n_cg] CG coordinates of the sample (equal to its frame's).
    wrong_chirality: [n] bool.
    frame_ess: [frames in chunk] Kish ESS of each frame's weights (0 if no usable sample).
    first_index: input row of the first frame of the chunk.
    n_drawn, n_wrong_chirality, n_nonfinite: samples drawn / flagged / non-finite (dropped) in the chunk.
    """

    xyz: np.ndarray
    log_weights: np.ndarray
    log_weights_raw: np.ndarray
    index: np.ndarray
    s: np.ndarray
    wrong_chirality: np.ndarray
    frame_ess: np.ndarray
    first_index: int
    n_drawn: int
    n_wrong_chirality: int
    n_nonfinite: int


def _sample_proposal(flow, s: torch.Tensor, generator, proposal_scale: float = 1.0, proposal_mix: float = 0.5):
    """(fine, log q) from the importance proposal at CG points s [B, n_cg].

    ``proposal_scale`` = 1: the flow itself. Otherwise a defensive mixture: a fraction ``proposal_mix`` of the
    samples comes from the flow with its Gaussian base dims widened by ``proposal_scale`` (circular base dims
    stay uniform), the rest from the flow, and log q is the mixture density. Both components share the
    flow's transform, so fine = T(z) has q_mix(fine) = [(1 - a) N(z; 0, 1) + a N(z; 0, tau^2)] / |det dT/dz|:
    no extra flow pass. A wider component bounds the weights where the flow is narrower than the Boltzmann
    conditional (reverse-KL training tends to make it so), which removes the self-normalisation bias of a
    few samples per frame at some cost in ESS."""
    if proposal_scale == 1.0 or proposal_mix <= 0.0:
        return flow.sample(s, generator=generator)
    tau, a = float(proposal_scale), min(float(proposal_mix), 1.0)
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"proposal_scale must be a positive number, got {proposal_scale}")
    z = flow.sample_base(s.shape[0], generator)
    nc = ~flow.circular
    pick = torch.rand(s.shape[0], 1, generator=generator, dtype=z.dtype, device=z.device) < a
    z = torch.where(nc & pick, z * tau, z)
    fine, logdet = flow.forward_transform(z, s)
    n_nc = int(nc.sum())
    r2 = (z[:, nc] ** 2).sum(dim=1)
    log_narrow = -0.5 * r2
    log_wide = -0.5 * r2 / tau**2 - n_nc * math.log(tau)
    if a >= 1.0:
        log_mix = log_wide
    else:
        log_mix = torch.logaddexp(log_narrow + math.log1p(-a), log_wide + math.log(a))
    const = -0.5 * math.log(2.0 * math.pi) * n_nc - (flow.n_fine - n_nc) * math.log(2.0 * math.pi)
    return fine, log_mix + const - logdet


@torch.no_grad()
def _draw(flow, coords, energy, s64: torch.Tensor, generator, proposal_scale: float = 1.0,
          proposal_mix: float = 0.5):
    """One flow sample per row of s64 [B, n_cg] -> (x [B, n, 3] f64, log_w [B], nonfinite [B], wrong [B])."""
    fine, log_q = _sample_proposal(flow, s64.to(flow.dtype), generator, proposal_scale, proposal_mix)
    x, log_det = coords.to_cartesian(fine.to(torch.float64), s64)
    finite_x = torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
    x_safe = torch.where(finite_x[:, None, None], x, torch.zeros_like(x))
    u = energy.energy(x_safe).to(torch.float64)
    log_w = -u + log_det - log_q.to(torch.float64)
    nonfinite = ~(finite_x & torch.isfinite(log_w))
    wrong = ~nonfinite & ~coords.chirality_ok(x_safe).to(log_w.device)
    return x_safe, log_w, nonfinite, wrong


def _frame_logsumexp(lw: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis with -inf for all -inf rows. lw [F, n] -> [F]."""
    m = np.max(lw, axis=1)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(lw - m_safe[:, None]).sum(axis=1)) + m_safe


def iter_backmap(
    cg,
    flow,
    cgsystem=None,
    n_per_frame: int = 1,
    bridge=None,
    keep_wrong_chirality: bool = False,
    align=True,
    batch_size: int = 4096,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    n_workers: int | None = None,
    progress: bool = False,
    proposal_scale: float = 1.0,
    proposal_mix: float = 0.5,
) -> Iterator[BackmapChunk]:
    """Backmap CG frames chunk by chunk (about ``batch_size`` samples per chunk, whole frames).

    Args: as :func:`backmap`. Yields :class:`BackmapChunk` objects in input order. Creates (and closes) an
    :class:`~openmm_cgflow.bridge.EnergyBridge` with ``n_workers`` workers when ``bridge`` is None.
    """
    from tqdm.auto import tqdm

    flow, cgsystem, _ = _resolve_model(flow, cgsystem)
    frames = cg_frames(cg, cgsystem)
    n = int(n_per_frame)
    if n < 1:
        raise ValueError(f"n_per_frame must be >= 1, got {n_per_frame}")
    if len(frames) == 0:
        raise ValueError("no CG frames to backmap (the input is empty)")
    coords = cgsystem.coordinates
    if flow.n_fine != coords.n_fine or flow.n_cg != cgsystem.n_cg:
        raise ValueError(
            f"the flow (n_fine={flow.n_fine}, n_cg={flow.n_cg}) does not belong to system {cgsystem.name!r} "
            f"(n_fine={coords.n_fine}, n_cg={cgsystem.n_cg})"
        )
    atoms = _alignment_atoms(cgsystem, align)
    ref = np.asarray(cgsystem.positions, dtype=np.float64)
    if atoms is not None:
        # centred reference: small coordinates keep float32 output exact to ~3e-7 rad in the CG dihedrals
        # (the uncentred alanine-dipeptide PDB frame gave errors up to 1.2e-6 rad)
        ref = ref - ref[atoms].mean(axis=0)
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(int(seed) if seed is not None else torch.seed())
    own_bridge = bridge is None
    if own_bridge:
        from .bridge import EnergyBridge

        bridge = EnergyBridge(cgsystem.system, cgsystem.temperature, n_workers=n_workers)
    was_training = flow.training
    flow.eval()
    batch_size = max(1, int(batch_size))
    per_chunk = max(1, batch_size // n)
    bar = tqdm(total=len(frames), unit="frame", desc="backmap", disable=not progress, leave=False)
    try:
        for f0 in range(0, len(frames), per_chunk):
            f1 = min(len(frames), f0 + per_chunk)
            nf = f1 - f0
            s64 = torch.as_tensor(frames.s[f0:f1]).repeat_interleave(n, dim=0)
            # flow passes of at most batch_size samples (n_per_frame > batch_size: one frame in pieces)
            parts = [_draw(flow, coords, bridge, s64[i : i + batch_size], generator, proposal_scale, proposal_mix)
                     for i in range(0, len(s64), batch_size)]
            x, lw, nonfinite, wrong = (torch.cat([p[k] for p in parts]).cpu().numpy() for k in range(4))
            del parts, s64
            usable = ~nonfinite & ~wrong
            lw_use = np.where(usable, lw, -np.inf).reshape(nf, n)
            lse = _frame_logsumexp(lw_use)
            has = np.isfinite(lse)
            lse0 = np.where(has, lse, 0.0)[:, None]
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                lw_norm = (lw_use - lse0).reshape(-1)
                ess = np.where(has, 1.0 / np.exp(2.0 * (lw_use - lse0)).sum(axis=1), 0.0)
            keep = ~nonfinite & (usable | keep_wrong_chirality)
            xk = x[keep]
            if atoms is not None and len(xk):
                xk = superpose(xk, ref, atoms)
            index = np.repeat(np.arange(f0, f1), n)
            yield BackmapChunk(
                xyz=xk.astype(np.float32),
                log_weights=np.where(usable, lw_norm, -np.inf)[keep],
                log_weights_raw=np.where(nonfinite, -np.inf, lw)[keep],
                index=index[keep],
                s=frames.s[index[keep]],
                wrong_chirality=wrong[keep],
                frame_ess=ess,
                first_index=f0,
                n_drawn=nf * n,
                n_wrong_chirality=int(wrong.sum()),
                n_nonfinite=int(nonfinite.sum()),
            )
            bar.update(nf)
    finally:
        bar.close()
        if was_training:
            flow.train()
        if own_bridge:
            bridge.close()


@dataclass
class BackmapResult:
    """All-atom samples of backmapped CG frames (see :func:`backmap`).

    trajectory: ``mdtraj.Trajectory`` of the kept samples (nm), frames grouped by input CG frame in order;
        ``trajectory.time`` is the CG frame's time (ps) when the input has one, else its time index (the
        first axis of the input array).
    log_weights: [N] log importance weights normalised within each CG frame (-inf: wrong chirality, kept).
    log_weights_raw: [N] unnormalised log p~ - log q (kT units).
    index: [N] input row of each sample's CG frame; frame, walker: [N] its time index and walker.
    s: [N, n_cg] CG coordinates of each sample. wrong_chirality: [N] bool.
    frame_ess: [F] Kish effective sample size of each CG frame's weights (0: no usable sample).
    n_frames: F; n_drawn: F * n_per_frame; n_wrong_chirality / n_nonfinite: flagged / dropped samples among
    those drawn (before dropping).
    """

    trajectory: object
    log_weights: np.ndarray
    log_weights_raw: np.ndarray
    index: np.ndarray
    frame: np.ndarray
    walker: np.ndarray
    s: np.ndarray
    wrong_chirality: np.ndarray
    frame_ess: np.ndarray
    n_frames: int
    n_per_frame: int
    n_drawn: int
    n_wrong_chirality: int
    n_nonfinite: int

    @property
    def weights(self) -> np.ndarray:
        """Importance weights [N], each CG frame's summing to 1 (0 for wrong-chirality samples)."""
        return np.exp(self.log_weights)

    @property
    def fraction_wrong_chirality(self) -> float:
        """Fraction of the drawn samples with the wrong chirality (before dropping)."""
        return self.n_wrong_chirality / max(self.n_drawn, 1)

    def estimate(self, values, log_frame_weights=None, block_size: int = 1) -> "WeightedEstimate":
        """:func:`weighted_estimate` of per-sample ``values`` [N] or [N, K] with these weights and frames."""
        return weighted_estimate(values, self.log_weights, self.index, log_frame_weights, block_size)

    def histogram(self, values, bins=50, range=None, log_frame_weights=None, block_size: int = 1, density=True):
        """:func:`weighted_histogram` of per-sample ``values`` [N] with these weights and frames."""
        return weighted_histogram(values, self.log_weights, self.index, bins, range, log_frame_weights,
                                  block_size, density)


def backmap(
    cg,
    flow,
    cgsystem=None,
    n_per_frame: int = 1,
    bridge=None,
    keep_wrong_chirality: bool = False,
    align=True,
    batch_size: int = 4096,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    n_workers: int | None = None,
    progress: bool = False,
    proposal_scale: float = 1.0,
    proposal_mix: float = 0.5,
) -> BackmapResult:
    """Backmap CG frames to all-atom samples with importance weights (in memory; see :func:`backmap_file`
    to stream a long trajectory to disk).

    Args:
        cg: CG coordinates: an array of s ([F, n_cg], [F, walkers, n_cg] as the plugin's reporter writes,
            or [F] when n_cg = 1; radians / nm), an ``mdtraj.Trajectory`` of the whole molecule, or a path
            (see :func:`load_cg`).
        flow: trained :class:`~openmm_cgflow.flow.ConditionalFlow` q(fine | s); or, with ``cgsystem`` None,
            a run directory / ``flow.pt`` (:func:`openmm_cgflow.model_io.load_model`) or a (flow, cgsystem) pair.
        cgsystem: the :class:`~openmm_cgflow.systems.CGSystem` the flow belongs to (None: from ``flow``).
        n_per_frame: flow samples per CG frame.
        bridge: energy object with ``energy(x [B, n, 3] nm) -> u [B] kT`` (an EnergyBridge); None creates an
            EnergyBridge with ``n_workers`` worker processes (None: one per core; 0: in-process).
        keep_wrong_chirality: keep flagged wrong-chirality samples (weight zero) instead of dropping them.
        align: superpose molecules onto the reference structure (centred on the alignment atoms' centroid):
            True/'heavy' (heavy atoms), 'all', atom indices, or None/False (seed frame of the internal
            coordinates).
        batch_size: samples per chunk and per flow pass (bounds the working memory; the result itself
            is held in memory: use :func:`backmap_file` for long trajectories).
        seed / generator: randomness of the flow samples (same seed, same samples).
        n_workers: energy worker processes when ``bridge`` is None.
        progress: tqdm progress bar over CG frames.
        proposal_scale, proposal_mix: importance proposal. 1 (default): the flow itself. tau > 1: a defensive
            mixture, a fraction ``proposal_mix`` of the samples from the flow with its Gaussian base widened by
            tau, the rest from the flow (heavier tails, bounded weights; see :func:`_sample_proposal`). The
            weights are exact either way.
    Returns a :class:`BackmapResult`.
    """
    import mdtraj as md

    flow, cgsystem, _ = _resolve_model(flow, cgsystem)
    frames = cg_frames(cg, cgsystem)
    parts = list(iter_backmap(frames, flow, cgsystem, n_per_frame, bridge, keep_wrong_chirality, align,
                              batch_size, seed, generator, n_workers, progress, proposal_scale, proposal_mix))
    top = md_topology(cgsystem)

    def cat(name, empty):
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays) if arrays else empty

    xyz = cat("xyz", np.zeros((0, cgsystem.n_atoms, 3), np.float32))
    index = cat("index", np.zeros(0, np.int64))
    time_ps = frames.time_ps[index] if frames.time_ps is not None else frames.frame[index].astype(np.float64)
    traj = md.Trajectory(xyz, top, time=time_ps)
    return BackmapResult(
        trajectory=traj,
        log_weights=cat("log_weights", np.zeros(0)),
        log_weights_raw=cat("log_weights_raw", np.zeros(0)),
        index=index,
        frame=frames.frame[index],
        walker=frames.walker[index],
        s=cat("s", np.zeros((0, cgsystem.n_cg))),
        wrong_chirality=cat("wrong_chirality", np.zeros(0, bool)),
        frame_ess=cat("frame_ess", np.zeros(0)),
        n_frames=len(frames),
        n_per_frame=int(n_per_frame),
        n_drawn=sum(p.n_drawn for p in parts),
        n_wrong_chirality=sum(p.n_wrong_chirality for p in parts),
        n_nonfinite=sum(p.n_nonfinite for p in parts),
    )


# ------------------------------------------------------------------------------------------ output
class TrajectoryWriter:
    """Append frames to a DCD, XTC, HDF5 (.h5, needs PyTables) or multi-model PDB file through mdtraj.

    Written to ``<stem>.partial<ext>`` and renamed to ``path`` by :meth:`close` (a crash never leaves a
    truncated file under the final name). Positions in nm; ``time_ps`` is stored where the format has it
    (HDF5, XTC). Precision: DCD and HDF5 store float32 (CG dihedrals of the written structures within
    ~1e-6 rad of the input s); PDB keeps 0.001 A and XTC 0.001 nm (lossy, ~1e-3 to 1e-2 rad in the
    dihedrals): use DCD or HDF5 where the exact CG coordinates matter.
    """

    def __init__(self, path, topology):
        import mdtraj as md

        self.path = os.fspath(path)
        self.ext = os.path.splitext(self.path)[1].lower()
        if self.ext not in OUTPUT_FORMATS:
            raise ValueError(f"cannot write {self.path!r}: output format must be one of {', '.join(OUTPUT_FORMATS)}")
        if self.ext == ".h5":
            try:
                import tables  # noqa: F401
            except ImportError:
                raise ImportError("writing HDF5 (.h5) trajectories needs PyTables: pip install tables "
                                  "(or write .dcd/.xtc/.pdb)") from None
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"output directory does not exist: {directory}")
        self.topology = topology
        root, _ = os.path.splitext(self.path)
        self._tmp = root + ".partial" + self.ext
        self.n_frames = 0
        fmt = md.formats
        if self.ext == ".dcd":
            self._file = fmt.DCDTrajectoryFile(self._tmp, "w", force_overwrite=True)
        elif self.ext == ".xtc":
            self._file = fmt.XTCTrajectoryFile(self._tmp, "w", force_overwrite=True)
        elif self.ext == ".h5":
            self._file = fmt.HDF5TrajectoryFile(self._tmp, "w", force_overwrite=True)
            self._file.topology = topology
        else:
            self._file = fmt.PDBTrajectoryFile(self._tmp, "w", force_overwrite=True)

    def write(self, xyz_nm: np.ndarray, time_ps: np.ndarray | None = None) -> None:
        """Append frames xyz_nm [B, n_atoms, 3] (nm)."""
        xyz = np.asarray(xyz_nm, dtype=np.float32)
        if len(xyz) == 0:
            return
        t = None if time_ps is None else np.asarray(time_ps, dtype=np.float32)
        if self.ext == ".dcd":
            self._file.write(xyz * 10.0)
        elif self.ext == ".xtc":
            self._file.write(xyz, time=t, step=np.arange(self.n_frames, self.n_frames + len(xyz), dtype=np.int32))
        elif self.ext == ".h5":
            self._file.write(coordinates=xyz, time=t)
        else:
            for k, pos in enumerate(xyz):
                self._file.write(pos * 10.0, self.topology, modelIndex=self.n_frames + k + 1)
        self.n_frames += len(xyz)

    def close(self, commit: bool = True) -> None:
        """Close the file; rename it to its final name (``commit``) or delete it."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if commit:
            os.replace(self._tmp, self.path)
        elif os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(commit=exc_type is None)


def _save_npz_atomic(path: str, **arrays) -> None:
    tmp = path + ".partial.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


@dataclass
class BackmapSummary:
    """What :func:`backmap_file` wrote. Paths, counts, ESS statistics and speed (frames/s of CG input)."""

    out_path: str
    weights_path: str
    topology_path: str | None
    n_frames: int
    n_per_frame: int
    n_drawn: int
    n_written: int
    n_wrong_chirality: int
    n_nonfinite: int
    n_empty_frames: int
    mean_frame_ess: float
    wall_s: float
    extra: dict = field(default_factory=dict)

    @property
    def frames_per_s(self) -> float:
        return self.n_frames / self.wall_s if self.wall_s > 0 else float("nan")

    def __str__(self) -> str:
        lines = [
            f"backmapped {self.n_frames} CG frames x {self.n_per_frame} samples in {self.wall_s:.1f} s "
            f"({self.frames_per_s:.1f} frames/s)",
            f"wrote {self.n_written} all-atom frames to {self.out_path}",
            f"weights (log_weights normalised per CG frame, index, s) in {self.weights_path}",
        ]
        if self.topology_path:
            lines.append(f"topology (first sample) in {self.topology_path}")
        lines.append(
            f"wrong chirality: {self.n_wrong_chirality} of {self.n_drawn} samples "
            f"({100.0 * self.n_wrong_chirality / max(self.n_drawn, 1):.2f} %, "
            f"{'kept with weight 0' if self.extra.get('keep_wrong_chirality') else 'dropped'}); "
            f"non-finite dropped: {self.n_nonfinite}; frames without a usable sample: {self.n_empty_frames}"
        )
        if self.n_per_frame > 1:
            lines.append(f"mean ESS per CG frame: {self.mean_frame_ess:.2f} of {self.n_per_frame}")
        return "\n".join(lines)


def _resolve_model(model, cgsystem=None):
    """(flow, cgsystem, path) from a flow and its CGSystem, a run directory, a model file, or a
    (flow, cgsystem) pair."""
    if cgsystem is not None:
        return model, cgsystem, None
    if isinstance(model, (tuple, list)) and len(model) == 2:
        return model[0], model[1], None
    if isinstance(model, (str, os.PathLike)):
        from .model_io import load_model

        path = os.fspath(model)
        flow, cgsystem = load_model(path)
        return flow, cgsystem, path
    raise TypeError("pass the CGSystem the flow belongs to (cgsystem=...), or give a run directory / flow.pt "
                    "path or a (flow, cgsystem) pair instead of the flow")


def backmap_file(
    run_dir_or_model_path,
    cg_file,
    out_path,
    n_per_frame: int = 1,
    keep_wrong_chirality: bool = False,
    seed: int = 0,
    progress: bool = True,
    bridge=None,
    n_workers: int | None = None,
    batch_size: int = 4096,
    align=True,
    proposal_scale: float = 1.0,
    proposal_mix: float = 0.5,
) -> BackmapSummary:
    """Backmap a CG file to an all-atom trajectory file, streaming chunk by chunk (bounded memory).

    Args:
        run_dir_or_model_path: a run directory (its ``flow.pt``), a model file written by
            :func:`openmm_cgflow.model_io.save_model`, or a ``(flow, cgsystem)`` pair.
        cg_file: CG frames (see :func:`load_cg`): ``.npz`` with ``s`` [frames, walkers, d] from the CG
            reporter, ``.npy``/``.txt`` arrays of s [frames, d], or an all-atom trajectory mdtraj reads
            (the model's topology is used where the format has none). An array is accepted too.
        out_path: ``.dcd``, ``.xtc``, ``.h5`` or ``.pdb`` (by extension). Samples of one CG frame are
            consecutive, frames in input order (rows of [frames, walkers] flattened time-major).
        n_per_frame: flow samples per CG frame.
        keep_wrong_chirality: keep wrong-chirality samples (weight zero, flagged) instead of dropping them.
        seed: seed of the flow samples. progress: tqdm progress bar. bridge / n_workers: energy evaluation
            (default: an EnergyBridge with one worker per core). batch_size: samples per chunk.
        align, proposal_scale, proposal_mix: as in :func:`backmap`.
    Writes ``out_path`` and ``out_path + '.weights.npz'`` with, per written sample, ``log_weights``
    (normalised within its CG frame), ``log_weights_raw``, ``index`` (input row), ``frame`` (time index),
    ``walker``, ``s`` [N, d], ``wrong_chirality``, and per CG frame ``frame_ess``; for DCD and XTC (no
    topology) also ``<out stem>.top.pdb`` with the first sample. Returns a :class:`BackmapSummary`.
    """
    t0 = time.perf_counter()
    flow, cgsystem, model_path = _resolve_model(run_dir_or_model_path)
    frames = cg_frames(cg_file, cgsystem)
    out_path = os.fspath(out_path)
    top = md_topology(cgsystem)
    writer = TrajectoryWriter(out_path, top)
    weights_path = out_path + ".weights.npz"
    topology_path = None
    keys = ("log_weights", "log_weights_raw", "index", "wrong_chirality")
    acc = {k: [] for k in keys}
    frame_ess = np.zeros(len(frames))
    counts = dict(n_drawn=0, n_wrong_chirality=0, n_nonfinite=0)
    first = None
    try:
        for chunk in iter_backmap(frames, flow, cgsystem, n_per_frame, bridge, keep_wrong_chirality, align,
                                  batch_size, seed, None, n_workers, progress, proposal_scale, proposal_mix):
            t = (frames.time_ps if frames.time_ps is not None else frames.frame.astype(np.float64))[chunk.index]
            writer.write(chunk.xyz, t)
            if first is None and len(chunk.xyz):
                first = chunk.xyz[:1].copy()
            for k in keys:
                acc[k].append(getattr(chunk, k))
            frame_ess[chunk.first_index : chunk.first_index + len(chunk.frame_ess)] = chunk.frame_ess
            for k in counts:
                counts[k] += getattr(chunk, k)
    except BaseException:
        writer.close(commit=False)
        raise
    writer.close(commit=True)
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in acc.items()}
    index = out["index"].astype(np.int64)
    arrays = dict(
        log_weights=out["log_weights"].astype(np.float64),
        log_weights_raw=out["log_weights_raw"].astype(np.float64),
        index=index,
        frame=frames.frame[index],
        walker=frames.walker[index],
        s=frames.s[index],
        wrong_chirality=out["wrong_chirality"].astype(bool),
        frame_ess=frame_ess,
        n_per_frame=np.int64(n_per_frame),
        n_frames=np.int64(len(frames)),
        n_drawn=np.int64(counts["n_drawn"]),
        n_wrong_chirality=np.int64(counts["n_wrong_chirality"]),
        n_nonfinite=np.int64(counts["n_nonfinite"]),
        temperature_K=np.float64(cgsystem.temperature),
        cg_names=np.array(list(cgsystem.cg_names)),
        seed=np.int64(seed),
    )
    if frames.time_ps is not None:
        arrays["time_ps"] = frames.time_ps[index]
    _save_npz_atomic(weights_path, **arrays)
    if writer.ext in (".dcd", ".xtc") and first is not None:
        import mdtraj as md

        topology_path = os.path.splitext(out_path)[0] + ".top.pdb"
        md.Trajectory(first, top).save_pdb(topology_path)
    wall = time.perf_counter() - t0
    return BackmapSummary(
        out_path=out_path,
        weights_path=weights_path,
        topology_path=topology_path,
        n_frames=len(frames),
        n_per_frame=int(n_per_frame),
        n_drawn=counts["n_drawn"],
        n_written=writer.n_frames,
        n_wrong_chirality=counts["n_wrong_chirality"],
        n_nonfinite=counts["n_nonfinite"],
        n_empty_frames=int((frame_ess == 0).sum()),
        mean_frame_ess=float(frame_ess.mean()) if len(frame_ess) else float("nan"),
        wall_s=wall,
        extra={"model_path": model_path, "keep_wrong_chirality": bool(keep_wrong_chirality)},
    )


# ------------------------------------------------------------------------------------------ estimates
@dataclass
class WeightedEstimate:
    """A weighted average with its uncertainty (see :func:`weighted_estimate`); arrays of shape [K] for
    K observables, floats for one.

    mean, stderr: the estimate of <g> and its delta-method standard error. std, std_stderr: the weighted
    standard deviation of g and its standard error. ess: Kish effective sample size of the overall
    weights. n_samples, n_frames: samples and CG frames with non-zero weight.
    """

    mean: np.ndarray
    stderr: np.ndarray
    std: np.ndarray
    std_stderr: np.ndarray
    ess: float
    n_samples: int
    n_frames: int


def _global_weights(log_weights, frame=None, log_frame_weights=None):
    """Normalised weights W [N] (sum 1) and group index [N] (0..G-1, in frame order) for the SE.

    With ``frame``: weights are normalised within each frame, then frames get ``log_frame_weights[frame]``
    (default equal); frames without a finite weight drop out. Without: W = softmax(log_weights), each
    sample its own group."""
    lw = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    n = len(lw)
    finite = np.isfinite(lw)
    if not finite.any():
        raise ValueError("no sample has a finite log weight")
    if frame is None:
        w = np.where(finite, np.exp(lw - lw[finite].max()), 0.0)
        return w / w.sum(), np.arange(n), n
    frame = np.asarray(frame).reshape(-1)
    if len(frame) != n:
        raise ValueError(f"frame has {len(frame)} entries for {n} log weights")
    uniq, inv = np.unique(frame, return_inverse=True)
    m = np.full(len(uniq), -np.inf)
    np.maximum.at(m, inv[finite], lw[finite])
    e = np.where(finite, np.exp(lw - np.where(np.isfinite(m), m, 0.0)[inv]), 0.0)
    tot = np.bincount(inv, e, minlength=len(uniq))
    has = tot > 0
    if log_frame_weights is None:
        lfw = np.zeros(len(uniq))
    else:
        lfw_all = np.asarray(log_frame_weights, dtype=np.float64).reshape(-1)
        if uniq.min() < 0 or uniq.max() >= len(lfw_all):
            raise ValueError(f"log_frame_weights has {len(lfw_all)} entries; frames go up to {uniq.max()}")
        lfw = lfw_all[uniq]
    lfw = np.where(has & np.isfinite(lfw), lfw, -np.inf)
    if not np.isfinite(lfw).any():
        raise ValueError("no frame has a usable sample and a finite frame weight")
    fw = np.exp(lfw - lfw[np.isfinite(lfw)].max())
    fw /= fw.sum()
    w = fw[inv] * np.where(has[inv], e / np.where(has, tot, 1.0)[inv], 0.0)
    return w / w.sum(), inv, len(uniq)


def _block_var(h: np.ndarray, group: np.ndarray, n_groups: int, block_size: int) -> np.ndarray:
    """Variance of sum_i h_i from per-sample influences h [N, K], summing first within groups, then
    within blocks of ``block_size`` consecutive groups (correlated frames), with the n/(n-1) correction."""
    block = group // max(int(block_size), 1)
    n_blocks = int(block.max()) + 1
    hb = np.zeros((n_blocks, h.shape[1]))
    np.add.at(hb, block, h)
    used = np.unique(block)
    nb = len(used)
    corr = nb / (nb - 1) if nb > 1 else np.inf
    return (hb**2).sum(axis=0) * corr


def weighted_estimate(values, log_weights, frame=None, log_frame_weights=None, block_size: int = 1) -> WeightedEstimate:
    """Weighted average of an observable over backmapped samples, with its ESS and standard error.

    Args:
        values: g per sample, [N] or [N, K] (K observables at once). For angles near the +-pi seam pass
            a continuous representation (e.g. cos/sin, or the angle wrapped around its mode).
        log_weights: [N] log importance weights (e.g. :attr:`BackmapResult.log_weights`).
        frame: [N] CG frame of each sample (e.g. :attr:`BackmapResult.index`). Weights are normalised within
            each frame and frames weighted equally, the estimator for CG frames drawn from p(s). None:
            weights normalised over all samples (plain self-normalised importance sampling).
        log_frame_weights: optional log weights of the CG frames, indexed by frame id (e.g. bias - c for
            reweighting metadynamics frames); unnormalised.
        block_size: frames per block for the standard error (consecutive frames of a CG trajectory are
            correlated: use blocks longer than the correlation time).
    Returns a :class:`WeightedEstimate`: mean = sum_i W_i g_i with W the overall normalised weights;
    SE^2 = sum over blocks of (sum_{i in block} W_i (g_i - mean))^2 (delta method for a ratio estimator;
    with one sample per frame and equal weights it is the usual s / sqrt(N)); std = sqrt(sum W (g - mean)^2)
    with SE from the influence W_i ((g_i - mean)^2 - std^2) / (2 std); ess = 1 / sum W^2 (Kish; it ignores
    correlation between frames).
    """
    g = np.asarray(values, dtype=np.float64)
    scalar = g.ndim == 1
    g = g.reshape(g.shape[0], -1)
    w, group, n_groups = _global_weights(log_weights, frame, log_frame_weights)
    if len(w) != g.shape[0]:
        raise ValueError(f"values have {g.shape[0]} rows for {len(w)} log weights")
    nz = w > 0
    g = np.where(nz[:, None], g, 0.0)  # zero-weight samples may carry NaN values
    if not np.all(np.isfinite(g[nz])):
        raise ValueError("values must be finite where the weight is non-zero")
    mean = w @ g
    dev = g - mean
    var_mean = _block_var(w[:, None] * dev, group, n_groups, block_size)
    var = w @ dev**2
    std = np.sqrt(var)
    infl = w[:, None] * (dev**2 - var) / np.where(std > 0, 2.0 * std, np.inf)
    var_std = _block_var(infl, group, n_groups, block_size)
    out = (mean, np.sqrt(var_mean), std, np.sqrt(var_std))
    if scalar:
        out = tuple(float(a[0]) for a in out)
    return WeightedEstimate(*out, ess=float(1.0 / np.sum(w**2)), n_samples=int(nz.sum()),
                            n_frames=int(len(np.unique(group[nz]))))


def weighted_histogram(values, log_weights, frame=None, bins=50, range=None, log_frame_weights=None,
                       block_size: int = 1, density: bool = True):
    """Weighted histogram of one observable with a standard error per bin.

    Args as :func:`weighted_estimate` (``values`` [N]); ``bins`` an int or edges, ``range`` (lo, hi).
    Probabilities are fractions of the total weight (mass outside the range is not redistributed).
    Returns (hist [bins], stderr [bins], edges [bins + 1]); with ``density`` both are divided by the bin
    widths (a probability density), otherwise they are bin probabilities.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    w, group, n_groups = _global_weights(log_weights, frame, log_frame_weights)
    if len(v) != len(w):
        raise ValueError(f"values have {len(v)} entries for {len(w)} log weights")
    nz = w > 0
    edges = np.histogram_bin_edges(v[nz & np.isfinite(v)], bins=bins, range=range)
    nbins = len(edges) - 1
    b = np.searchsorted(edges, v, side="right") - 1
    b = np.where(v == edges[-1], nbins - 1, b)
    inside = nz & np.isfinite(v) & (b >= 0) & (b < nbins)
    p = np.bincount(b[inside], w[inside], minlength=nbins)
    # SE per bin: influence W_i (1[b_i = bin] - p_bin), summed per block of frames
    block = group // max(int(block_size), 1)
    n_blocks = int(block.max()) + 1
    s_blk = np.bincount(block, w, minlength=n_blocks)  # total weight per block
    key = block[inside] * nbins + b[inside]
    ukey, kinv = np.unique(key, return_inverse=True)
    a = np.bincount(kinv, w[inside])  # weight per (block, bin) present
    kb, kbin = ukey // nbins, ukey % nbins
    sum_a2 = np.bincount(kbin, a * a, minlength=nbins)
    sum_as = np.bincount(kbin, a * s_blk[kb], minlength=nbins)
    sum_s2 = float((s_blk**2).sum())
    var = np.clip(sum_a2 - 2.0 * p * sum_as + p * p * sum_s2, 0.0, None)
    nb = len(np.unique(block[nz]))
    var = var * (nb / (nb - 1) if nb > 1 else np.inf)
    se = np.sqrt(var)
    if density:
        width = np.diff(edges)
        return p / width, se / width, edges
    return p, se, edges


class _CallableModule(types.ModuleType):
    """``openmm_cgflow.backmap`` is both this module and the function :func:`backmap`: the package exports
    the function under the module's name, and whichever of the two an import order leaves on the package,
    ``from openmm_cgflow import backmap; backmap(cg, flow, cgsystem)`` works."""

    def __call__(self, *args, **kwargs):
        return backmap(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
