"""Command line: ``cgflow run`` (active learning of a PMF) and ``cgflow backmap`` (CG -> all-atom).

    cgflow run mueller-brown --out runs/mb
    cgflow run alanine-dipeptide --out runs/ala2 --threshold 0.2 --seed 1
    cgflow run my_molecule.toml --out runs/mine        # config file, see README
    cgflow backmap runs/ala2 walkers.npz -o ala2.dcd --per-frame 4

The target is a registered system's name (the built-in ones, or one a script registered with
:func:`openmm_cgflow.registry.register_system` before calling :func:`main`) or a config file.
A config file (TOML) has a ``[system]`` table (``builtin = "alanine-dipeptide"``, or ``pdb``, ``cg``,
optional ``forcefield`` list, ``temperature`` in K, or ``system_xml`` with ``pdb`` for the topology and
positions) and an optional ``[settings]`` table whose keys are those of
:class:`openmm_cgflow.settings.LearnerSettings`, plus optional top-level ``reference`` (a registered
system's name, an .npz, or "none"; default: the system's registered reference, if it has one). Everything is
checked before any work starts; running the same command again resumes the run.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import registry, systems
from .backmap_output import backmap_file
from .executors import BridgeError
from .learner import PMFLearner
from .settings import LearnerSettings

__all__ = ["main", "load_config", "build_learner"]


def _read_toml(path: str) -> dict:
    import tomllib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc


def load_config(target: str) -> tuple[object, dict, object]:
    """(cgsystem, settings overrides, reference) from a registered system's name or a TOML config file."""
    if target in registry.registered():
        return registry.builtin(target), {}, _default_reference(target)
    if not target.endswith(".toml"):
        raise ValueError(f"unknown system {target!r}: give one of {registry.registered()} or a .toml config file")
    cfg = _read_toml(target)
    base = os.path.dirname(os.path.abspath(target))
    unknown = set(cfg) - {"system", "settings", "reference"}
    if unknown:
        raise ValueError(f"{target}: unknown top-level key(s) {sorted(unknown)} (expected system, settings, reference)")
    sys_cfg = cfg.get("system")
    if not isinstance(sys_cfg, dict):
        raise ValueError(f"{target}: a [system] table is required")
    reference = cfg.get("reference")
    if "builtin" in sys_cfg:
        cgsystem = registry.builtin(sys_cfg["builtin"])
        if reference is None:
            reference = _default_reference(sys_cfg["builtin"])
    else:
        if "pdb" not in sys_cfg or "cg" not in sys_cfg:
            raise ValueError(f"{target}: [system] needs `builtin`, or `pdb` and `cg`")
        pdb_path = os.path.join(base, sys_cfg["pdb"])
        cg = [tuple(c) if isinstance(c, list) else c for c in sys_cfg["cg"]]
        temperature = float(sys_cfg.get("temperature", 300.0))
        if "system_xml" in sys_cfg:
            import openmm

            xml_path = os.path.join(base, sys_cfg["system_xml"])
            if not os.path.isfile(xml_path):
                raise FileNotFoundError(f"System XML file not found: {xml_path}")
            with open(xml_path) as fh:
                try:
                    system = openmm.XmlSerializer.deserialize(fh.read())
                except Exception as exc:
                    raise ValueError(f"could not read System XML {xml_path}: {exc}") from exc
            pdb = systems.load_pdb(pdb_path)
            cgsystem = systems.from_openmm(system, pdb.topology, pdb.positions, temperature, cg,
                                           name=sys_cfg.get("name", os.path.splitext(os.path.basename(pdb_path))[0]))
        else:
            ff = sys_cfg.get("forcefield", ["amber96.xml", "amber96_obc.xml"])
            cgsystem = systems.from_pdb(pdb_path, cg, temperature, forcefield=ff, name=sys_cfg.get("name"))
    if isinstance(reference, str) and reference.endswith(".npz"):
        reference = os.path.join(base, reference)
        if not os.path.isfile(reference):
            raise FileNotFoundError(f"reference file not found: {reference}")
    settings = cfg.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError(f"{target}: [settings] must be a table")
    return cgsystem, settings, reference


def _default_reference(name: str):
    """The registered system's name if it has a registered reference (the learner resolves it), else None."""
    return name if registry.entry(name).reference is not None else None


def build_learner(target: str, out: str, overrides: dict, reference="auto", progress=True, plots=True):
    """The :class:`~openmm_cgflow.learner.PMFLearner` for a CLI target; all input is checked here."""
    cgsystem, settings, default_ref = load_config(target)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    st = LearnerSettings.for_system(cgsystem, **settings)
    if reference == "auto":
        reference = default_ref
    elif reference in ("none", None):
        reference = None
    elif reference.endswith(".npz") and not os.path.isfile(reference):
        raise FileNotFoundError(f"reference file not found: {reference}")
    return PMFLearner(cgsystem, out, st, reference=reference, progress=progress, plots=plots)


def _cmd_run(args) -> int:
    overrides = {"threshold_kT": args.threshold, "seed": args.seed, "max_iterations": args.max_iterations,
                 "max_evaluations": args.max_evaluations, "n_workers": args.workers,
                 "scheduler": args.scheduler, "chunk_timeout": args.chunk_timeout}
    learner = build_learner(args.target, args.out, overrides, reference=args.reference, progress=not args.quiet,
                            plots=not args.no_plots)
    if learner.iteration and args.quiet:
        print(f"resuming {learner.out_dir} after iteration {learner.iteration - 1} "
              f"({learner.evaluations:,} energy evaluations so far)")
    learner.run()
    last = learner.history[-1] if learner.history else {}
    print(f"{learner.cgsystem.name}: {learner.iteration} iterations, {learner.evaluations:,} energy evaluations, "
          f"{len(learner.label_s)} labelled CG points, wall {learner.wall_s:.0f} s"
          + (f", forward KLD to reference {last['kld']:.2e}" if "kld" in last else ""))
    print(f"stop: {learner.stop_reason}")
    print(f"PMF ensemble: {learner.pmf_path}\nflow + system: {learner.flow_path}")
    return 0


def _cmd_backmap(args) -> int:
    if args.per_frame < 1:
        raise ValueError(f"--per-frame must be >= 1, got {args.per_frame}")
    try:
        summary = backmap_file(args.run, args.cg_file, args.output, n_per_frame=args.per_frame,
                               keep_wrong_chirality=args.keep_d, seed=args.seed, progress=not args.quiet,
                               n_workers=args.workers, batch_size=args.batch_size)
    except ImportError as exc:  # e.g. PyTables for .h5 output
        raise ValueError(str(exc)) from exc
    print(summary)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cgflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="learn a PMF by active learning into a run directory (resumes if present)")
    run.add_argument("target", help="registered system (built in: mueller-brown, alanine-dipeptide, proline-dipeptide) "
                                    "or a .toml config")
    run.add_argument("--out", required=True, help="run directory (pmf.pt, flow.pt, iterations.jsonl, plots/, checkpoint.pt)")
    run.add_argument("--threshold", type=float, help="ensemble spread (kT) that marks a CG point uncertain (default 0.2)")
    run.add_argument("--seed", type=int, help="random seed (default 0); a seeded run is repeatable")
    run.add_argument("--max-iterations", type=int, help="iteration budget")
    run.add_argument("--max-evaluations", type=int, help="energy-evaluation budget")
    run.add_argument("--workers", type=int, help="OpenMM worker processes for energies (default: one per core)")
    run.add_argument("--scheduler", help="Dask scheduler address (e.g. tcp://host:8786): evaluate energies on its "
                                         "workers instead of local processes (needs openmm-cgflow[dask])")
    run.add_argument("--chunk-timeout", type=float,
                     help="seconds after which a chunk of energies is resubmitted to another worker (default: none)")
    run.add_argument("--reference", default="auto",
                     help="reference for the KLD log: auto (the system's registered one), none, a system name or an .npz")
    run.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    bm = sub.add_parser("backmap", help="CG trajectory -> Boltzmann-weighted all-atom trajectory")
    bm.add_argument("run", help="run directory (or its flow.pt)")
    bm.add_argument("cg_file", help="CG frames: reporter .npz, .npy / .txt array of s, or an all-atom trajectory")
    bm.add_argument("-o", "--output", required=True,
                    help="output trajectory (.dcd, .h5, .pdb, .xtc); weights go to OUTPUT.weights.npz")
    bm.add_argument("-n", "--per-frame", type=int, default=1, help="all-atom samples per CG frame (default 1)")
    bm.add_argument("--keep-d", action="store_true",
                    help="keep samples with the wrong chirality (flagged, weight zero) instead of dropping them")
    bm.add_argument("--seed", type=int, default=0, help="seed of the flow samples (default 0)")
    bm.add_argument("--workers", type=int, help="OpenMM worker processes for energies (default: one per core)")
    bm.add_argument("--batch-size", type=int, default=4096, help="samples per chunk (bounds memory; default 4096)")
    bm.add_argument("--quiet", action="store_true", help="no progress bar")
    bm.set_defaults(func=_cmd_backmap)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError, BridgeError) as exc:
        print(f"cgflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
