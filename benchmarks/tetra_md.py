"""Plain-MD reference for the alanine tetrapeptide's six backbone dihedrals (issue #14): long, resumable, compact.

Runs ``--walkers`` independent MD walkers (one process each, one thread, the Reference platform, LangevinMiddle
1/ps, 2 fs, hydrogen mass 3 amu, 300 K; the registered ``alanine-tetrapeptide``: amber99sbildn + amber99_obc) for
``--hours`` of wall time, or until each has ``--max-ns``. Every ``--chunk-ps`` each walker appends a chunk
``walkerK/chunk_NNNNNN.npz`` (six dihedrals every ``--frame-ps``, int16-quantised: angle / pi * 32767, ~1e-4 rad
resolution, 12 bytes per frame) and saves its OpenMM checkpoint ``walkerK/state.chk``; both are written atomically,
so a killed run resumes from its last chunk with ``--resume`` (the default when the directory exists).

``--report`` (no MD) loads all chunks and writes ``reference.npz``: per residue (phi_i, psi_i) the smoothed
100 x 100 bin probabilities of all frames (openmm_cgflow.metrics, the metric's own estimate), the frame count,
the simulated ns, and the reference's own error, the forward KLD between the first and second halves of every
walker's frames (per residue), with a table on stdout.

  python benchmarks/tetra_md.py --out runs/tetra_md --hours 2          # in the background; run again to resume
  python benchmarks/tetra_md.py --out runs/tetra_md --report
  python benchmarks/tetra_md.py --out runs/tetra_md --pack benchmarks/data/tetrapeptide_md.npz   # one compact file
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SCALE = 32767.0 / np.pi
NAME = "alanine-tetrapeptide"


def _quantise(angles: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(angles) * SCALE).astype(np.int16)


def _dequantise(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float64) / SCALE


def _walker(index: int, args) -> None:
    import openmm
    import openmm.app as app
    import openmm.unit as unit
    from openmm_cgflow_plugin.cgspace import wrap_angle
    from openmm_cgflow_plugin.files import atomic_write

    import aldp_common as C

    system, topology, positions, cg_atoms = C.build_registered(NAME, hydrogen_mass=3.0)
    quads = np.asarray(cg_atoms)
    integrator = openmm.LangevinMiddleIntegrator(300.0 * unit.kelvin, 1.0 / unit.picosecond, 0.002 * unit.picoseconds)
    integrator.setRandomNumberSeed(1000 + index)
    platform, props = C.make_platform("Reference")
    sim = app.Simulation(topology, system, integrator, platform, props)
    wdir = os.path.join(args.out, f"walker{index}")
    os.makedirs(wdir, exist_ok=True)
    chk = os.path.join(wdir, "state.chk")
    n_chunks = len(glob.glob(os.path.join(wdir, "chunk_*.npz")))
    if os.path.exists(chk) and n_chunks:
        with open(chk, "rb") as fh:
            sim.loadCheckpoint(fh)
    else:
        sim.context.setPositions(positions)
        openmm.LocalEnergyMinimizer.minimize(sim.context, maxIterations=200)
        sim.context.setVelocitiesToTemperature(300.0 * unit.kelvin, 1000 + index)
        n_chunks = 0
    steps_per_frame = int(round(args.frame_ps / 0.002))
    frames_per_chunk = int(round(args.chunk_ps / args.frame_ps))
    t_end = time.time() + 3600.0 * args.hours
    while time.time() < t_end and n_chunks * args.chunk_ps / 1000.0 < args.max_ns:
        out = np.empty((frames_per_chunk, len(quads)), dtype=np.int16)
        for f in range(frames_per_chunk):
            sim.step(steps_per_frame)
            x = sim.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            out[f] = _quantise(wrap_angle(_dihedrals(np.asarray(x), quads)))
        with atomic_write(os.path.join(wdir, f"chunk_{n_chunks:06d}.npz")) as fh:
            np.savez_compressed(fh, dihedrals=out, frame_ps=args.frame_ps)
        with atomic_write(chk) as fh:
            sim.saveCheckpoint(fh)
        n_chunks += 1


def _dihedrals(x: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """Dihedrals (rad, IUPAC/mdtraj sign) of atom quadruples [k, 4] in one structure x [n, 3]."""
    b1, b2, b3 = (x[quads[:, 1]] - x[quads[:, 0]], x[quads[:, 2]] - x[quads[:, 1]], x[quads[:, 3]] - x[quads[:, 2]])
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    m1 = np.cross(n1, b2 / np.linalg.norm(b2, axis=1, keepdims=True))
    return -np.arctan2(np.sum(m1 * n2, axis=1), np.sum(n1 * n2, axis=1))  # the sign mdtraj and the CG specs use


def load_frames(out: str) -> list[np.ndarray]:
    """Per walker, its frames [F, 6] (rad) in order, from a run directory or a file written by ``--pack``."""
    if out.endswith(".npz"):
        with np.load(out) as z:
            return [_dequantise(z[k]) for k in sorted((k for k in z.files if k.startswith("walker")),
                                                       key=lambda k: int(k[6:]))]
    walkers = []
    for wdir in sorted(glob.glob(os.path.join(out, "walker*")), key=lambda d: int(os.path.basename(d)[6:])):
        chunks = sorted(glob.glob(os.path.join(wdir, "chunk_*.npz")))
        if chunks:
            walkers.append(np.concatenate([_dequantise(np.load(c)["dihedrals"]) for c in chunks]))
    return walkers


def residue_probabilities(frames: np.ndarray) -> list[np.ndarray]:
    """Per residue (phi_r, psi_r) the metric's smoothed 100 x 100 bin probabilities of frames [F, 6] (rad)."""
    from openmm_cgflow import metrics

    rng = [(-np.pi, np.pi)] * 2
    return [metrics.histogram_probabilities(frames[:, [2 * r, 2 * r + 1]], 100, rng, True) for r in range(3)]


def halves_kld(walkers: list[np.ndarray]) -> list[float]:
    """The reference's own error per residue: forward KLD from the first to the second half of every walker."""
    from openmm_cgflow import metrics

    first = residue_probabilities(np.concatenate([w[: len(w) // 2] for w in walkers]))
    second = residue_probabilities(np.concatenate([w[len(w) // 2:] for w in walkers]))
    return [metrics.forward_kld(a, b) for a, b in zip(first, second)]


def report(out: str, frame_ps: float) -> None:
    walkers = load_frames(out)
    if not walkers:
        raise SystemExit(f"no frames under {out}")
    allf = np.concatenate(walkers)
    probs, halves = residue_probabilities(allf), halves_kld(walkers)
    ns = len(allf) * frame_ps / 1000.0
    np.savez_compressed(os.path.join(out, "reference.npz"), probabilities=np.stack(probs), halves_kld=np.array(halves),
                        n_frames=len(allf), ns=ns, frame_ps=frame_ps)
    print(f"{len(walkers)} walkers, {len(allf):,} frames, {ns:.1f} ns ({ns * 5e5:.3g} energy evaluations)")
    for r, k in enumerate(halves):
        print(f"residue ALA{r + 2}: forward KLD first half -> second half {k:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--max-ns", type=float, default=1e9)
    ap.add_argument("--walkers", type=int, default=2)
    ap.add_argument("--first-walker", type=int, default=0,
                    help="index of the first walker (its directory walkerK and seed 1000 + K): walkers run elsewhere "
                         "with other indices merge by copying their directories")
    ap.add_argument("--frame-ps", type=float, default=1.0)
    ap.add_argument("--chunk-ps", type=float, default=500.0)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--pack", default=None, help="write all walkers' frames (int16, as stored) into one .npz and stop")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.pack:
        dirs = sorted(glob.glob(os.path.join(args.out, "walker*")), key=lambda d: int(os.path.basename(d)[6:]))
        packed = {os.path.basename(d): np.concatenate([np.load(c)["dihedrals"] for c in
                                                       sorted(glob.glob(os.path.join(d, "chunk_*.npz")))])
                  for d in dirs if glob.glob(os.path.join(d, "chunk_*.npz"))}
        np.savez_compressed(args.pack, frame_ps=args.frame_ps, **packed)
        print(f"{args.pack}: {len(packed)} walkers, {sum(len(v) for v in packed.values()):,} frames")
        return
    if args.report:
        report(args.out, args.frame_ps)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_walker, args=(i, args))
             for i in range(args.first_walker, args.first_walker + args.walkers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    report(args.out, args.frame_ps)


if __name__ == "__main__":
    main()
