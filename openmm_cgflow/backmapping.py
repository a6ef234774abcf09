"""Backmapping: coarse-grained frames -> Boltzmann-weighted all-atom samples.

For each CG frame s_f, ``n_per_frame`` fine coordinates fine_fi ~ q(. | s_f) are drawn from the
conditional flow and mapped to Cartesian positions x_fi = x(fine_fi, s_f) (nm), which have exactly the
frame's CG coordinates. Each sample carries the log importance weight of :mod:`openmm_cgflow.importance`

    log w_fi = -u(x_fi) + log_det_fi - log q(fine_fi | s_f)          (u = E / kT; natural log)

normalised within its frame, log w~_fi = log w_fi - logsumexp_i log w_fi. For any observable g,
sum_i w~_fi g(x_fi) estimates the Boltzmann average of g at fixed s = s_f (self-normalised importance
sampling: consistent as n_per_frame grows, exact for a perfect flow at any n_per_frame). Averaged over CG
frames drawn from the CG equilibrium p(s) (CG dynamics on the PMF, or reweighted enhanced sampling), it
estimates the all-atom Boltzmann average <g>: see :func:`openmm_cgflow.importance.weighted_estimate` and
:func:`openmm_cgflow.importance.weighted_histogram`.

Accuracy: per frame this is self-normalised importance sampling with n_per_frame samples, biased by
O(1 / n_per_frame) times the spread of the weights. With one sample per frame the weights are all 1 and the
samples follow the flow, not the Boltzmann conditional; the weights correct the flow only with several
samples per frame, and the per-frame ESS (``frame_ess``) says how much. A flow trained by reverse KL tends
to be narrower than the Boltzmann conditional: ``proposal_scale`` > 1 draws half of the samples from the
flow with a widened base (a defensive mixture, exact weights; :func:`openmm_cgflow.importance.sample_proposal`),
which removes most of that bias at a small cost in ESS. Measured on alanine dipeptide with a flow trained
for ~15 s (ESS per frame ~5 of 96): weighted standard deviations of all bonds and angles within 10 % of MD
(rms 3-4 %), the flow alone 15-18 % (rms).

Samples with the wrong chirality (e.g. D-alanine, see ``coordinates.InternalCoordinates.chirality_ok``)
get weight zero and are flagged; they are dropped from the output unless ``keep_wrong_chirality``.
Samples with non-finite positions or energies are always dropped (weight zero). Molecules are
superposed onto the reference structure (:mod:`openmm_cgflow.alignment`). A point particle
(Mueller-Brown) keeps its absolute position.

Settings live in one :class:`BackmapOptions`; :func:`backmap`, :func:`iter_backmap` and
:func:`openmm_cgflow.backmap_output.backmap_file` take it (or its fields as keyword arguments) and resolve
the model and the CG frames once. Streaming: :func:`iter_backmap` works chunk by chunk (about
``batch_size`` samples at a time), so memory stays bounded for any number of CG frames.

Units: positions nm, s radians (dihedrals, mdtraj/IUPAC sign) or nm (Mueller-Brown), energies kT.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from openmm_cgflow_plugin.statistics import kish_ess

from .alignment import alignment_atoms, centred_reference, superpose
from .cg_input import CGFrames, OutsideDomainError, cg_frames, check_cg_values, md_topology
from .flow import resolve_device
from .importance import draw, log_normalise, weighted_estimate, weighted_histogram
from .threads import thread_steps, tuner_for

__all__ = ["BackmapChunk", "BackmapInputs", "BackmapOptions", "BackmapResult", "backmap", "iter_backmap",
           "iter_chunks", "resolve_inputs", "training_domain"]


@dataclass(frozen=True)
class BackmapOptions:
    """Settings of a backmapping run.

    n_per_frame: flow samples per CG frame (>= 1).
    batch_size: samples per chunk and per flow pass (bounds the working memory).
    seed: seed of the flow samples (same seed, same samples; None: a random seed).
    keep_wrong_chirality: keep flagged wrong-chirality samples (weight zero) instead of dropping them.
    proposal_scale, proposal_mix: importance proposal. 1 (default): the flow itself. tau > 1: a defensive
        mixture, a fraction ``proposal_mix`` of the samples from the flow with its Gaussian base widened by
        tau, the rest from the flow (see :func:`openmm_cgflow.importance.sample_proposal`). The weights are
        exact either way.
    n_workers: energy worker processes when no energy bridge is given (None: one per core; 0: in-process).
    align: superpose molecules onto the reference structure (centred on the alignment atoms' centroid):
        True/'heavy' (heavy atoms), 'all', atom indices, or None/False (seed frame of the internal
        coordinates); see :func:`openmm_cgflow.alignment.alignment_atoms`.
    progress: tqdm progress bar over CG frames.
    device: where the flow samples ("cpu", "cuda"; None: where the flow is). The flow is moved there for the
        run and back afterwards; energies stay on the CPU workers.
    allow_outside_domain: backmap frames whose non-periodic CG coordinates lie outside the domain the flow was
        trained on (the run's ``pmf.pt`` ``cg_ranges``, or the registered system's ``domain`` setting); by
        default such frames are refused (:class:`~openmm_cgflow.cg_input.OutsideDomainError`): the flow has never
        seen them and their samples and weights are meaningless (Mueller-Brown s = 50 nm gives x = 27.5 nm).
    """

    n_per_frame: int = 1
    batch_size: int = 4096
    seed: int | None = 0
    keep_wrong_chirality: bool = False
    proposal_scale: float = 1.0
    proposal_mix: float = 0.5
    n_workers: int | None = None
    align: object = True
    progress: bool = False
    allow_outside_domain: bool = False
    device: str | None = None

    def __post_init__(self):
        if int(self.n_per_frame) < 1:
            raise ValueError(f"n_per_frame must be >= 1, got {self.n_per_frame}")

    @classmethod
    def build(cls, options: "BackmapOptions | None" = None, **settings) -> "BackmapOptions":
        """``options`` (default: the defaults) with the fields named in ``settings`` replaced."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a BackmapOptions, got {type(options).__name__} "
                            "(pass settings by name, e.g. n_per_frame=8)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown backmapping setting(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(options if options is not None else cls(), **settings)


@dataclass
class BackmapInputs:
    """The resolved inputs of a backmapping run: the flow, its CGSystem, the CG frames, and the model path
    (None when the flow was passed as an object)."""

    flow: object
    cgsystem: object
    frames: CGFrames
    model_path: str | None = None


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


def training_domain(cgsystem, model_path: str | None = None):
    """(lo, hi) per non-periodic CG coordinate that the flow of ``cgsystem`` was trained on, or None if unknown:
    the ``cg_ranges`` of the ``pmf.pt`` beside ``model_path`` (a run directory or its flow.pt), else the
    ``domain`` setting of the system's registry entry."""
    free = [k for k, per in enumerate(cgsystem.cg_periodic) if not per]
    if not free:
        return None
    if model_path is not None:
        folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
        pmf_path = os.path.join(folder, "pmf.pt")
        if os.path.isfile(pmf_path):
            from openmm_cgflow_plugin import load_pmf

            try:
                ranges = load_pmf(pmf_path).cg_ranges
            except (ValueError, RuntimeError, OSError):
                ranges = None
            if ranges is not None and len(ranges) == cgsystem.n_cg:
                return [tuple(ranges[k]) for k in free]
    from .registry import entry_for

    item = entry_for(cgsystem)
    domain = item.settings.get("domain") if item is not None else None
    return [tuple(r) for r in domain] if domain is not None else None


def resolve_inputs(cg, model, cgsystem=None, allow_outside_domain: bool = False) -> BackmapInputs:
    """Resolve a model (a flow with ``cgsystem``, a run directory / ``flow.pt`` path, or a (flow, cgsystem)
    pair) and CG frames (see :func:`openmm_cgflow.cg_input.cg_frames`) once, and check that they fit: the CG
    dimension, periodic values in radians, and non-periodic values inside the domain the flow was trained on
    (:func:`training_domain`; refused unless ``allow_outside_domain``)."""
    if isinstance(model, BackmapInputs):
        return model
    flow, cgsystem, path = _resolve_model(model, cgsystem)
    frames = cg_frames(cg, cgsystem)
    if len(frames) == 0:
        raise ValueError("no CG frames to backmap (the input is empty)")
    if not allow_outside_domain:
        domain = training_domain(cgsystem, path)
        if domain is not None:
            try:
                check_cg_values(frames.s, cgsystem.cg_periodic, domain=domain, names=cgsystem.cg_names,
                                what="CG frames to backmap")
            except OutsideDomainError as exc:
                raise OutsideDomainError(f"{exc}, on which the flow was trained: its samples there are meaningless. "
                                         "Pass frames inside the domain, or allow_outside_domain=True "
                                         "(cgflow backmap --allow-outside-domain) if you mean it") from None
    coords = cgsystem.coordinates
    if flow.n_fine != coords.n_fine or flow.n_cg != cgsystem.n_cg:
        raise ValueError(
            f"the flow (n_fine={flow.n_fine}, n_cg={flow.n_cg}) does not belong to system {cgsystem.name!r} "
            f"(n_fine={coords.n_fine}, n_cg={cgsystem.n_cg})"
        )
    return BackmapInputs(flow, cgsystem, frames, path)


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


def _draw(flow, coords, energy, s64: torch.Tensor, generator, opts: BackmapOptions):
    """One proposal sample per row of s64 [B, n_cg] -> (x [B, n, 3] f64, log_w [B] raw, nonfinite, wrong)."""
    with torch.no_grad():
        smp = draw(flow, coords, energy, s64, generator, opts.proposal_scale, opts.proposal_mix)
        return smp.x, smp.log_w, smp.nonfinite, smp.wrong_chirality


def iter_chunks(inputs: BackmapInputs, opts: BackmapOptions, bridge=None,
                 generator: torch.Generator | None = None) -> Iterator[BackmapChunk]:
    """:func:`iter_backmap` on inputs already resolved by :func:`resolve_inputs` (what
    :func:`openmm_cgflow.backmap_output.backmap_file` uses, so the model and CG frames are read once)."""
    from tqdm.auto import tqdm

    flow, cgsystem, frames = inputs.flow, inputs.cgsystem, inputs.frames
    n = int(opts.n_per_frame)
    coords = cgsystem.coordinates
    atoms = alignment_atoms(cgsystem, opts.align)
    ref = centred_reference(cgsystem, atoms)
    if generator is None:
        generator = torch.Generator()
        if opts.seed is not None:
            generator.manual_seed(int(opts.seed))
        else:
            generator.seed()  # a non-deterministic seed for this generator only (no global RNG change)
    own_bridge = bridge is None
    if own_bridge:
        from .bridge import EnergyBridge

        bridge = EnergyBridge(cgsystem.system, cgsystem.temperature, n_workers=opts.n_workers)
    was_training = flow.training
    home = next(flow.parameters()).device
    if opts.device is not None:
        flow.to(resolve_device(opts.device))
    flow.eval()
    batch_size = max(1, int(opts.batch_size))
    per_chunk = max(1, batch_size // n)
    tuner = tuner_for(None)  # measured thread count unless OMP_NUM_THREADS is set; restored after each chunk
    bar = tqdm(total=len(frames), unit="frame", desc="backmap", disable=not opts.progress, leave=False)
    try:
        for f0 in range(0, len(frames), per_chunk):
            f1 = min(len(frames), f0 + per_chunk)
            nf = f1 - f0
            s64 = torch.as_tensor(frames.s[f0:f1]).repeat_interleave(n, dim=0)
            # flow passes of at most batch_size samples (n_per_frame > batch_size: one frame in pieces)
            with thread_steps(tuner, work=len(s64)):  # the flow waits for the workers and they for it
                parts = [_draw(flow, coords, bridge, s64[i : i + batch_size], generator, opts)
                         for i in range(0, len(s64), batch_size)]
            x, lw, nonfinite, wrong = (torch.cat([p[k] for p in parts]).cpu().numpy() for k in range(4))
            del parts, s64
            usable = ~nonfinite & ~wrong
            lw_use = np.where(usable, lw, -np.inf).reshape(nf, n)
            lw_norm, _ = log_normalise(lw_use)
            ess = kish_ess(lw_use, axis=1)
            keep = ~nonfinite & (usable | opts.keep_wrong_chirality)
            xk = x[keep]
            if atoms is not None and len(xk):
                xk = superpose(xk, ref, atoms)
            index = np.repeat(np.arange(f0, f1), n)
            yield BackmapChunk(
                xyz=xk.astype(np.float32),
                log_weights=np.where(usable, lw_norm.reshape(-1), -np.inf)[keep],
                log_weights_raw=np.where(nonfinite, -np.inf, lw)[keep],
                index=index[keep],
                s=frames.s[index[keep]],
                wrong_chirality=wrong[keep],
                frame_ess=np.atleast_1d(ess),
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
        flow.to(home)
        if own_bridge:
            bridge.close()


def iter_backmap(cg, flow, cgsystem=None, options: BackmapOptions | None = None, *, bridge=None,
                 generator: torch.Generator | None = None, **settings) -> Iterator[BackmapChunk]:
    """Backmap CG frames chunk by chunk (about ``batch_size`` samples per chunk, whole frames).

    Args: as :func:`backmap`. Yields :class:`BackmapChunk` objects in input order. Creates (and closes) an
    :class:`~openmm_cgflow.bridge.EnergyBridge` with ``n_workers`` workers when ``bridge`` is None.
    """
    opts = BackmapOptions.build(options, **settings)
    inputs = resolve_inputs(cg, flow, cgsystem, opts.allow_outside_domain)
    return iter_chunks(inputs, opts, bridge, generator)


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

    def estimate(self, values, log_frame_weights=None, block_size: int = 1):
        """:func:`~openmm_cgflow.importance.weighted_estimate` of per-sample ``values`` [N] or [N, K] with
        these weights and frames."""
        return weighted_estimate(values, self.log_weights, self.index, log_frame_weights, block_size)

    def histogram(self, values, bins=50, range=None, log_frame_weights=None, block_size: int = 1, density=True):
        """:func:`~openmm_cgflow.importance.weighted_histogram` of per-sample ``values`` [N] with these
        weights and frames."""
        return weighted_histogram(values, self.log_weights, self.index, bins, range, log_frame_weights,
                                  block_size, density)


def backmap(cg, flow, cgsystem=None, options: BackmapOptions | None = None, *, bridge=None,
            generator: torch.Generator | None = None, **settings) -> BackmapResult:
    """Backmap CG frames to all-atom samples with importance weights (in memory; see
    :func:`openmm_cgflow.backmap_output.backmap_file` to stream a long trajectory to disk).

    Args:
        cg: CG coordinates: an array of s ([F, n_cg], [F, walkers, n_cg] as the plugin's reporter writes,
            or [F] when n_cg = 1; radians / nm), an ``mdtraj.Trajectory`` of the whole molecule, or a path
            (see :func:`openmm_cgflow.cg_input.load_cg`).
        flow: trained :class:`~openmm_cgflow.flow.ConditionalFlow` q(fine | s); or, with ``cgsystem`` None,
            a run directory / ``flow.pt`` (:func:`openmm_cgflow.model_io.load_model`) or a (flow, cgsystem) pair.
        cgsystem: the :class:`~openmm_cgflow.systems.CGSystem` the flow belongs to (None: from ``flow``).
        options: a :class:`BackmapOptions`; ``settings`` (its field names: ``n_per_frame``, ``seed``,
            ``batch_size``, ``keep_wrong_chirality``, ``proposal_scale``, ``proposal_mix``, ``n_workers``,
            ``align``, ``progress``) override its fields, e.g. ``backmap(cg, "runs/ala2", n_per_frame=8)``.
        bridge: energy object with ``energy(x [B, n, 3] nm) -> u [B] kT`` (an EnergyBridge); None creates an
            EnergyBridge with ``n_workers`` worker processes.
        generator: randomness of the flow samples (instead of ``seed``).
    Returns a :class:`BackmapResult`.
    """
    import mdtraj as md

    opts = BackmapOptions.build(options, **settings)
    inputs = resolve_inputs(cg, flow, cgsystem, opts.allow_outside_domain)
    cgsystem, frames = inputs.cgsystem, inputs.frames
    parts = list(iter_chunks(inputs, opts, bridge, generator))
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
        n_per_frame=int(opts.n_per_frame),
        n_drawn=sum(p.n_drawn for p in parts),
        n_wrong_chirality=sum(p.n_wrong_chirality for p in parts),
        n_nonfinite=sum(p.n_nonfinite for p in parts),
    )
