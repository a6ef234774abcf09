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

from . import __version__, registry, systems
from .backmap_output import backmap_file
from .executors import BridgeError
from .learner import PMFLearner
from .settings import LearnerSettings, did_you_mean

__all__ = ["main", "load_config", "build_learner", "resolve_reference", "USER_ERRORS"]

#: Errors that are the input's (or the machine's) fault: printed as one line without a traceback, exit code 2.
#: ValueError covers bad settings, config files, references, CG frames and unreadable or foreign run files;
#: OSError missing files and unwritable directories; BridgeError failed energy workers (the checkpoint is intact).
USER_ERRORS = (ValueError, OSError, FloatingPointError, BridgeError)


def _read_toml(path: str) -> dict:
    import tomllib

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc


#: Keys of a config file's [system] table: with ``builtin`` / with ``pdb`` and ``cg``.
BUILTIN_KEYS = ("builtin", "temperature")
MOLECULE_KEYS = ("pdb", "cg", "forcefield", "temperature", "system_xml", "name")


def _check_system_keys(target: str, sys_cfg: dict) -> None:
    """Unknown or misplaced keys of [system] are refused (a misspelled ``temprature`` would silently run at
    300 K), with a "did you mean" hint."""
    known = set(BUILTIN_KEYS) | set(MOLECULE_KEYS)
    for key in sys_cfg:
        if key not in known:
            raise ValueError(f"{target}: unknown key {key!r} in [system]{did_you_mean(key, known)}; "
                             f"known keys: {sorted(known)}")
    if "builtin" in sys_cfg:
        extra = sorted(set(sys_cfg) - set(BUILTIN_KEYS))
        if extra:
            raise ValueError(f"{target}: [system] key(s) {extra} have no effect with builtin = "
                             f"{sys_cfg['builtin']!r} (only {list(BUILTIN_KEYS)}); remove them or describe the "
                             "molecule with pdb and cg instead")


def _typed(target: str, sys_cfg: dict, key: str, kinds, what: str):
    value = sys_cfg[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ValueError(f"{target}: [system] {key} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def _forcefield_files(target: str, base: str, ff, notices: list) -> list:
    """Force-field names: a file next to the config (or an absolute path) is used as such, with a notice (OpenMM
    executes its <InitializationScript>); other names are OpenMM's own files (found by app.ForceField)."""
    if isinstance(ff, str):
        ff = [ff]
    if not isinstance(ff, list) or not ff or not all(isinstance(f, str) for f in ff):
        raise ValueError(f"{target}: [system] forcefield must be a list of force-field XML file names, got {ff!r}")
    import openmm.app as app

    data = os.path.join(os.path.dirname(app.__file__), "data")
    out = []
    for name in ff:
        local = os.path.join(base, os.path.expanduser(name))
        if os.path.isfile(local):
            out.append(local)
            notices.append(f"{local} is a user force-field file: OpenMM executes any <InitializationScript> in it "
                           "(use only files you trust; see README, Security)")
        elif os.path.isfile(os.path.join(data, name)):
            out.append(name)
        else:
            out.append(name)
            notices.append(f"force field {name!r} is not one of OpenMM's own files; OpenMM executes any "
                           "<InitializationScript> in it (use only files you trust; see README, Security)")
    return out


def load_config(target: str, notices: list | None = None) -> tuple[object, dict, object]:
    """(cgsystem, settings overrides, reference) from a registered system's name or a TOML config file.

    Every key is checked (unknown ones refused with a "did you mean" hint). ``notices``: a list to which
    one-line notices are appended (inputs that OpenMM executes as code: a ``system_xml``, user force-field
    files); the CLI prints them.
    """
    notices = [] if notices is None else notices
    if target in registry.registered():
        return registry.builtin(target), {}, _default_reference(target)
    if not target.endswith(".toml"):
        raise ValueError(f"unknown system {target!r}{did_you_mean(target, registry.registered())}: give one of "
                         f"{registry.registered()} or a .toml config file")
    cfg = _read_toml(target)
    base = os.path.dirname(os.path.abspath(target))
    unknown = set(cfg) - {"system", "settings", "reference"}
    if unknown:
        key = sorted(unknown)[0]
        raise ValueError(f"{target}: unknown top-level key(s) {sorted(unknown)}"
                         f"{did_you_mean(key, ['system', 'settings', 'reference'])} (expected system, settings, "
                         "reference)")
    sys_cfg = cfg.get("system")
    if not isinstance(sys_cfg, dict):
        raise ValueError(f"{target}: a [system] table is required")
    _check_system_keys(target, sys_cfg)
    reference = cfg.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise ValueError(f"{target}: reference must be a string (a system name, an .npz file or \"none\"), "
                         f"got {reference!r}")
    temperature = None
    if "temperature" in sys_cfg:
        temperature = float(_typed(target, sys_cfg, "temperature", (int, float), "a number of kelvin"))
    if "builtin" in sys_cfg:
        name = _typed(target, sys_cfg, "builtin", str, "a registered system's name")
        if name not in registry.registered():
            raise ValueError(f"{target}: unknown builtin system {name!r}{did_you_mean(name, registry.registered())}; "
                             f"registered: {registry.registered()}")
        options = {}
        if temperature is not None:
            import inspect

            if "temperature" not in inspect.signature(registry.entry(name).factory).parameters:
                raise ValueError(f"{target}: the built-in system {name!r} has a fixed temperature; remove "
                                 "temperature from [system]")
            options["temperature"] = temperature
        cgsystem = registry.builtin(name, **options)
        if reference is None:
            reference = _default_reference(name)
    else:
        if "pdb" not in sys_cfg or "cg" not in sys_cfg:
            raise ValueError(f"{target}: [system] needs `builtin`, or `pdb` and `cg`")
        pdb_path = os.path.join(base, _typed(target, sys_cfg, "pdb", str, "a PDB file name"))
        cg_cfg = _typed(target, sys_cfg, "cg", list, 'a list of CG dihedrals ("phi:RES" or four atom indices)')
        cg = [tuple(c) if isinstance(c, list) else c for c in cg_cfg]
        name = _typed(target, sys_cfg, "name", str, "a string") if "name" in sys_cfg else None
        temperature = 300.0 if temperature is None else temperature
        if "system_xml" in sys_cfg:
            import openmm

            if "forcefield" in sys_cfg:
                raise ValueError(f"{target}: [system] has both system_xml and forcefield; give one of them")
            xml_path = os.path.join(base, _typed(target, sys_cfg, "system_xml", str, "a System XML file name"))
            if not os.path.isfile(xml_path):
                raise FileNotFoundError(f"System XML file not found: {xml_path}")
            notices.append(f"{xml_path} is an OpenMM System XML: deserialising it unpickles the function of any "
                           "PythonForce in it, which runs code (use only files you trust; see README, Security)")
            with open(xml_path) as fh:
                try:
                    system = openmm.XmlSerializer.deserialize(fh.read())
                except Exception as exc:
                    raise ValueError(f"could not read System XML {xml_path}: {exc}") from exc
            pdb = systems.load_pdb(pdb_path)
            cgsystem = systems.from_openmm(system, pdb.topology, pdb.positions, temperature, cg,
                                           name=name or os.path.splitext(os.path.basename(pdb_path))[0])
        else:
            ff = _forcefield_files(target, base, sys_cfg.get("forcefield", ["amber96.xml", "amber96_obc.xml"]), notices)
            cgsystem = systems.from_pdb(pdb_path, cg, temperature, forcefield=ff, name=name)
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


def resolve_reference(reference, default):
    """The run's reference from a ``--reference`` value ("auto": ``default``; "none"/None: no reference; a system
    name or an .npz). :class:`~openmm_cgflow.learner.PMFLearner` loads it and checks it against the system's CG
    coordinates before any work."""
    if reference == "auto":
        reference = default
    elif reference in ("none", None):
        return None
    if isinstance(reference, str) and reference.endswith(".npz") and not os.path.isfile(reference):
        raise FileNotFoundError(f"reference file not found: {reference}")
    return reference


def build_learner(target: str, out: str, overrides: dict, reference="auto", progress=True, plots=True,
                  overwrite: bool = False, notices: list | None = None):
    """The :class:`~openmm_cgflow.learner.PMFLearner` for a CLI target; all input is checked before any work
    (the config here; settings, reference and output directory by PMFLearner). ``overwrite`` lets the run
    replace the results of another run in ``out`` (see PMFLearner). ``notices`` collects one-line notices about
    inputs that run code."""
    cgsystem, settings, default_ref = load_config(target, notices)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    st = LearnerSettings.for_system(cgsystem, **settings)
    reference = resolve_reference(reference, default_ref)
    return PMFLearner(cgsystem, out, st, reference=reference, progress=progress, plots=plots, overwrite=overwrite)


def _cmd_run(args) -> int:
    overrides = {"threshold_kT": args.threshold, "seed": args.seed, "max_iterations": args.max_iterations,
                 "max_evaluations": args.max_evaluations, "n_workers": args.workers,
                 "scheduler": args.scheduler, "chunk_timeout": args.chunk_timeout, "device": args.device,
                 "energy_platform": args.energy_platform}
    notices = []
    try:
        learner = build_learner(args.target, args.out, overrides, reference=args.reference, progress=not args.quiet,
                                plots=not args.no_plots, overwrite=args.overwrite, notices=notices)
    finally:
        for line in notices:
            print(f"cgflow run: notice: {line}", file=sys.stderr)
    if learner.iteration and args.quiet:
        print(f"resuming {learner.out_dir} after iteration {learner.iteration - 1} "
              f"({learner.evaluations:,} energy evaluations so far)")
    learner.run()
    last = learner.history[-1] if learner.history else {}
    print(f"{learner.cgsystem.name}: {learner.iteration} iterations, {learner.evaluations:,} energy evaluations, "
          f"{len(learner.label_s)} labelled CG points, wall {learner.wall_s:.0f} s"
          + (f", forward KLD to reference {last['kld']:.2e}" if last.get("kld") is not None else ""))
    print(f"stop: {learner.stop_reason}")
    print(f"PMF ensemble: {learner.pmf_path}\nflow + system: {learner.flow_path}")
    return 0


def _cmd_backmap(args) -> int:
    if args.per_frame < 1:
        raise ValueError(f"--per-frame must be >= 1, got {args.per_frame}")
    try:
        summary = backmap_file(args.run, args.cg_file, args.output, n_per_frame=args.per_frame,
                               keep_wrong_chirality=args.keep_d, seed=args.seed, progress=not args.quiet,
                               n_workers=args.workers, batch_size=args.batch_size,
                               allow_outside_domain=args.allow_outside_domain, device=args.device)
    except ImportError as exc:  # e.g. PyTables for .h5 output
        raise ValueError(str(exc)) from exc
    print(summary)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cgflow", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"cgflow (openmm-cgflow) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="learn a PMF by active learning into a run directory (resumes if present)")
    run.add_argument("target", help="registered system (built in: mueller-brown, alanine-dipeptide, "
                                    "alanine-dipeptide-customgb, proline-dipeptide, alanine-tetrapeptide, analytic-4d) "
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
    run.add_argument("--energy-platform", choices=["Reference", "CPU"],
                     help="OpenMM platform of the energy workers (default: the system's, Reference for the built-ins "
                          "except alanine-dipeptide-customgb)")
    run.add_argument("--device", help="where the flow trains and samples: cpu (default) or cuda[:N]; energies stay on "
                                      "the CPU workers")
    run.add_argument("--reference", default="auto",
                     help="reference for the KLD log: auto (the system's registered one), none, a system name or an .npz")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the results of another run found in --out (default: refuse such a directory)")
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
    bm.add_argument("--device", help="where the flow samples: cpu (default) or cuda[:N]")
    bm.add_argument("--allow-outside-domain", action="store_true",
                    help="backmap frames outside the domain the flow was trained on (refused by default)")
    bm.add_argument("--quiet", action="store_true", help="no progress bar")
    bm.set_defaults(func=_cmd_backmap)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"cgflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cgflow {args.command}: interrupted" + ("; run the same command again to resume"
                                                      if args.command == "run" else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
