"""The system registry: built-in and user systems by name, each with its own defaults.

In the spirit of openmm-ml's ``MLPotential.registerImplFactory``: a system module registers a factory
that builds its :class:`~openmm_cgflow.systems.CGSystem`, together with what is particular to it:

* ``settings``: overrides of :class:`~openmm_cgflow.settings.LearnerSettings` defaults
  (:meth:`LearnerSettings.for_system` starts from them);
* ``flow``: keyword arguments for :func:`~openmm_cgflow.flow.flow_for` (layers, widths, CG standardisation);
* ``reference``: an optional callable returning the system's reference for the forward-KLD metric (a dict
  with ``probabilities``, ``edges``, ``periodic``; see :mod:`openmm_cgflow.metrics`).

The built-in systems (``mueller-brown``, ``alanine-dipeptide``, ``proline-dipeptide``) register themselves
in their own modules, which the package imports; a user registers theirs the same way::

    from openmm_cgflow import register_system, builtin
    register_system("my-peptide", lambda: from_pdb("my.pdb", ["phi:ALA", "psi:ALA"]), settings={"radius": 0.4})
    molecule = builtin("my-peptide")      # also found by LearnerSettings.for_system and `cgflow run my-peptide`

A system built by :func:`builtin` carries its registered name (``CGSystem.builtin``), by which its defaults
are found and by which :mod:`openmm_cgflow.model_io` stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["SystemEntry", "register_system", "builtin", "registered", "entry", "entry_for", "reference"]


@dataclass(frozen=True)
class SystemEntry:
    """One registered system: its factory and its defaults (see the module docstring)."""

    name: str
    factory: Callable
    settings: dict = field(default_factory=dict)
    flow: dict = field(default_factory=dict)
    reference: Optional[Callable[[], dict]] = None


_ENTRIES: dict[str, SystemEntry] = {}


def register_system(name: str, factory: Callable, settings: Optional[dict] = None, flow: Optional[dict] = None,
                    reference: Optional[Callable[[], dict]] = None, replace: bool = False) -> SystemEntry:
    """Register ``factory(**options) -> CGSystem`` under ``name``; returns the entry.

    ``settings``: LearnerSettings overrides; ``flow``: flow_for keyword arguments; ``reference``: callable
    returning the KLD reference (or None). Registering a taken name raises ValueError unless ``replace``.
    """
    name = str(name)
    if not name:
        raise ValueError("a system name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable")
    if reference is not None and not callable(reference):
        raise TypeError(f"reference for {name!r} must be a callable returning the reference (or None)")
    if name in _ENTRIES and not replace:
        raise ValueError(f"a system named {name!r} is already registered (pass replace=True to replace it)")
    item = SystemEntry(name, factory, dict(settings or {}), dict(flow or {}), reference)
    _ENTRIES[name] = item
    return item


def registered() -> list[str]:
    """Names of the registered systems, sorted."""
    return sorted(_ENTRIES)


def entry(name: str) -> SystemEntry:
    """The registered entry of ``name``; ValueError naming the known systems otherwise."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; registered systems are {registered()}") from None


def entry_for(cgsystem) -> Optional[SystemEntry]:
    """The entry a CGSystem was built from (by :func:`builtin`), or None for a system built directly."""
    name = getattr(cgsystem, "builtin", None)
    return _ENTRIES.get(name) if name is not None else None


def builtin(name: str, **options):
    """Build the registered system ``name`` (``options`` go to its factory, e.g. ``temperature=350``)."""
    item = entry(name)
    cgsystem = item.factory(**options)
    cgsystem.builtin = item.name
    cgsystem.builtin_options = dict(options)
    return cgsystem


def reference(name: str) -> dict:
    """The KLD reference of the registered system ``name`` (ValueError if it has none)."""
    item = entry(name)
    if item.reference is None:
        raise ValueError(f"system {name!r} has no registered reference")
    return item.reference()
