"""The force-backend seam: every OpenMM force the plugin builds is made here.

A *backend* turns a TorchScript energy module (:mod:`openmm_cgflow_plugin.modules`) into an
``openmm.Force``. The module's ``forward`` receives ``positions`` [n, 3] (nm), then the box vectors
[3, 3] (nm) if the force uses periodic boundary conditions, then one scalar tensor per global parameter
(in the order given), and returns the energy in kJ/mol; forces are minus its gradient (autograd).

Two backends are registered, in the spirit of openmm-ml's ``MLPotential.registerImplFactory``:

* ``"torch"``: openmm-torch's ``TorchForce`` (the module runs inside OpenMM's C++ layer, any platform);
* ``"python"``: ``openmm.PythonForce`` (OpenMM >= 8.5): the same module run by torch in Python through
  :class:`TorchModuleComputation` (float64, energy + forces by autograd). It needs no openmm-torch and,
  unlike a TorchForce with the openmm-torch CPU wheel, a System carrying it survives
  ``XmlSerializer.serialize`` -> ``deserialize`` (the computation pickles its module as bytes).

``backend=None`` everywhere means :func:`default_backend_name`: "torch" when openmm-torch imports, else
"python" (with a warning). Other backends can be added with :func:`register_backend`.

:func:`plugin_forces` finds the plugin's forces of every backend in a System (a force is the plugin's
when its energy module carries the PMF as attribute ``pmf``); :func:`force_module` and
:func:`force_parameters` read them back (used by :func:`~openmm_cgflow_plugin.swap.swap_pmf`).
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import openmm
import openmm.unit as unit
import torch

__all__ = ["ForceBackend", "TorchBackend", "PythonBackend", "TorchModuleComputation", "register_backend",
           "get_backend", "backend_names", "default_backend_name", "make_force", "plugin_forces", "force_backend",
           "force_module", "force_parameters", "FORCE_NAME"]

#: Name given to every force the plugin builds (informative only; forces are recognised by their module).
FORCE_NAME = "openmm_cgflow_plugin"


class ForceBackend:
    """How a TorchScript energy module becomes an ``openmm.Force`` (subclass and :func:`register_backend`).

    Attributes: ``name`` (the key users pass as ``backend=``).
    """

    name = ""

    def available(self) -> bool:
        """Whether this backend can build forces in this installation."""
        raise NotImplementedError

    def unavailable_reason(self) -> str:
        return f"the {self.name!r} force backend is not available"

    def create_force(self, module: torch.jit.ScriptModule, uses_pbc: bool,
                     global_parameters: Dict[str, float]) -> openmm.Force:
        """A new force running ``module`` (see the module docstring for its call convention)."""
        raise NotImplementedError

    def is_own(self, force: openmm.Force) -> bool:
        """Whether ``force`` is a force of this backend that runs a plugin energy module."""
        raise NotImplementedError

    def module(self, force: openmm.Force) -> torch.jit.ScriptModule:
        """The energy module inside a force of this backend (``is_own(force)`` must be True)."""
        raise NotImplementedError

    def parameters(self, force: openmm.Force) -> List[Tuple[str, float]]:
        """The force's global parameters as (name, default value), in the module's argument order."""
        raise NotImplementedError


class TorchBackend(ForceBackend):
    """openmm-torch's ``TorchForce``."""

    name = "torch"

    @functools.lru_cache(maxsize=None)
    def available(self) -> bool:
        try:
            import openmmtorch  # noqa: F401
        except ImportError:
            return False
        return True

    def unavailable_reason(self) -> str:
        return ("openmm-torch is required for the 'torch' force backend (pip install acellera-openmmtorch-cpu, or "
                "conda install -c conda-forge openmm-torch); use backend='python' (openmm.PythonForce, OpenMM >= 8.5) "
                "or pmf_cmap_force() for a two-dihedral PMF")

    def create_force(self, module, uses_pbc, global_parameters):
        from openmmtorch import TorchForce

        force = TorchForce(module)
        force.setUsesPeriodicBoundaryConditions(bool(uses_pbc))
        for name, value in global_parameters.items():
            force.addGlobalParameter(name, float(value))
        return force

    def is_own(self, force) -> bool:
        if not self.available():
            return False
        from openmmtorch import TorchForce

        return bool(TorchForce.isinstance(force)) and hasattr(TorchForce.cast(force).getModule(), "pmf")

    def module(self, force):
        from openmmtorch import TorchForce

        return TorchForce.cast(force).getModule()

    def parameters(self, force):
        from openmmtorch import TorchForce

        f = TorchForce.cast(force)
        return [(f.getGlobalParameterName(i), float(f.getGlobalParameterDefaultValue(i)))
                for i in range(f.getNumGlobalParameters())]


class TorchModuleComputation:
    """The computation of a ``PythonForce``: energy (kJ/mol) and forces (kJ/mol/nm) of a TorchScript module.

    Called by OpenMM with a ``State`` (positions nm, box vectors nm when ``uses_pbc``, global parameters);
    runs ``module(positions, [box], *parameters)`` in float64 and returns (energy, -d energy / d positions
    [n, 3] as NumPy). Picklable: the module is stored as the bytes of ``torch.jit.save``.
    """

    def __init__(self, module: torch.jit.ScriptModule, uses_pbc: bool, parameters: List[str]):
        self.module = module
        self.uses_pbc = bool(uses_pbc)
        self.parameters = [str(p) for p in parameters]

    def __call__(self, state):
        pos = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
        x = torch.from_numpy(np.ascontiguousarray(pos)).requires_grad_(True)
        args = [x]
        if self.uses_pbc:
            box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
            args.append(torch.from_numpy(np.ascontiguousarray(box, dtype=np.float64)))
        if self.parameters:
            values = state.getParameters()
            args.extend(torch.tensor(float(values[p]), dtype=torch.float64) for p in self.parameters)
        energy = self.module(*args)
        (grad,) = torch.autograd.grad(energy, x, allow_unused=True)
        forces = np.zeros_like(pos) if grad is None else -grad.numpy()
        return float(energy.detach()), forces

    def __getstate__(self):
        buffer = io.BytesIO()
        torch.jit.save(self.module, buffer)
        return {"version": 1, "module": buffer.getvalue(), "uses_pbc": self.uses_pbc, "parameters": self.parameters}

    def __setstate__(self, state):
        self.module = torch.jit.load(io.BytesIO(state["module"]), map_location="cpu")
        self.module.eval()
        self.uses_pbc = bool(state["uses_pbc"])
        self.parameters = list(state["parameters"])


# The class path as it appears (hex-encoded, in the pickled computation) in a PythonForce's XML.
_COMPUTATION_MARKS = (TorchModuleComputation.__module__.encode().hex(), TorchModuleComputation.__name__.encode().hex())
_FUNCTION_RE = re.compile(r'function="([0-9a-fA-F]*)"')


class PythonBackend(ForceBackend):
    """``openmm.PythonForce`` (OpenMM >= 8.5) running the module through :class:`TorchModuleComputation`."""

    name = "python"

    def available(self) -> bool:
        return hasattr(openmm, "PythonForce")

    def unavailable_reason(self) -> str:
        return (f"the 'python' force backend needs openmm.PythonForce (OpenMM >= 8.5); this is OpenMM "
                f"{openmm.__version__}: upgrade OpenMM or install openmm-torch (backend='torch')")

    def create_force(self, module, uses_pbc, global_parameters):
        computation = TorchModuleComputation(module, uses_pbc, list(global_parameters))
        force = openmm.PythonForce(computation, {k: float(v) for k, v in global_parameters.items()})
        force.setUsesPeriodicBoundaryConditions(bool(uses_pbc))
        return force

    @staticmethod
    def _hex(force) -> str:
        match = _FUNCTION_RE.search(openmm.XmlSerializer.serialize(force))
        return match.group(1) if match else ""

    def is_own(self, force) -> bool:
        if not (self.available() and isinstance(force, openmm.PythonForce)):
            return False
        text = self._hex(force)
        return all(mark in text for mark in _COMPUTATION_MARKS)

    def computation(self, force) -> TorchModuleComputation:
        """The (unpickled copy of the) :class:`TorchModuleComputation` of a plugin PythonForce."""
        computation = pickle.loads(bytes.fromhex(self._hex(force)))
        if not isinstance(computation, TorchModuleComputation):
            raise ValueError("this PythonForce does not run an openmm_cgflow_plugin module")
        return computation

    def module(self, force):
        return self.computation(force).module

    def parameters(self, force):
        defaults = dict(force.getGlobalParameters())
        return [(p, float(defaults[p])) for p in self.computation(force).parameters]


_BACKENDS: Dict[str, ForceBackend] = {}


def register_backend(backend: ForceBackend) -> None:
    """Make ``backend`` available as ``backend=backend.name`` (replaces one of the same name)."""
    if not isinstance(backend, ForceBackend) or not backend.name:
        raise TypeError("a force backend must be a named ForceBackend instance")
    _BACKENDS[backend.name] = backend


register_backend(TorchBackend())
register_backend(PythonBackend())


def backend_names() -> List[str]:
    """Names of the registered backends (available or not)."""
    return list(_BACKENDS)


def default_backend_name() -> str:
    """"torch" when openmm-torch imports, else "python" (with a warning saying why)."""
    if _BACKENDS["torch"].available():
        return "torch"
    warnings.warn("openmm-torch is not installed: openmm_cgflow_plugin runs the PMF through openmm.PythonForce "
                  "(backend='python'; torch in Python, slower per step). Install openmm-torch for TorchForce.",
                  RuntimeWarning, stacklevel=3)
    return "python"


def get_backend(name: Optional[str] = None) -> ForceBackend:
    """The backend called ``name`` (None: :func:`default_backend_name`); raises if unknown or unavailable."""
    if isinstance(name, ForceBackend):
        backend = name
    else:
        name = default_backend_name() if name is None else str(name)
        if name not in _BACKENDS:
            raise ValueError(f"unknown force backend {name!r}; registered: {', '.join(_BACKENDS)}")
        backend = _BACKENDS[name]
    if not backend.available():
        raise ImportError(backend.unavailable_reason())
    return backend


def make_force(module: torch.nn.Module, uses_pbc: bool = False, global_parameters: Optional[dict] = None,
               force_group: Optional[int] = None, backend: Optional[str] = None) -> openmm.Force:
    """An OpenMM force running ``module`` (scripted here if needed) with the chosen backend.

    ``module.forward`` receives ``positions`` [n, 3] nm, then the box vectors [3, 3] nm if ``uses_pbc``,
    then one scalar tensor per global parameter, in the order of ``global_parameters`` (name -> default),
    and returns the energy in kJ/mol. ``backend``: "torch", "python" or None (the default backend).
    """
    backend = get_backend(backend)
    if not isinstance(module, torch.jit.ScriptModule):
        module = torch.jit.script(module)
    force = backend.create_force(module, bool(uses_pbc), dict(global_parameters or {}))
    force.setName(FORCE_NAME)
    if force_group is not None:
        force.setForceGroup(int(force_group))
    return force


def force_backend(force: openmm.Force) -> Optional[ForceBackend]:
    """The backend whose plugin force ``force`` is (None if it is no plugin force)."""
    for backend in _BACKENDS.values():
        if backend.is_own(force):
            return backend
    return None


def plugin_forces(system: openmm.System) -> List[int]:
    """Indices of the forces in ``system`` that run a PMF (CG walkers or all-atom bias), any backend."""
    return [i for i, force in enumerate(system.getForces()) if force_backend(force) is not None]


def force_module(force: openmm.Force) -> torch.jit.ScriptModule:
    """The energy module of a plugin force (its PMF is ``.pmf``); ValueError if it is no plugin force."""
    backend = force_backend(force)
    if backend is None:
        raise ValueError(f"force {force.getName()!r} is not an openmm_cgflow_plugin force")
    return backend.module(force)


def force_parameters(force: openmm.Force) -> List[Tuple[str, float]]:
    """Global parameters (name, default) of a plugin force, in the module's argument order."""
    backend = force_backend(force)
    if backend is None:
        raise ValueError(f"force {force.getName()!r} is not an openmm_cgflow_plugin force")
    return backend.parameters(force)
