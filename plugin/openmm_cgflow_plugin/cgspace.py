"""The CG space of a PMF: names, periodicity, atom quadruples and temperature, with the one angle wrap.

In the spirit of OpenMM's ``BiasVariable``: a small value object that says what the CG coordinates are.
It is the metadata half of the ``pmf.pt`` contract (see :mod:`openmm_cgflow_plugin.pmf_file`), and the
sampler builds it from its system so that both sides agree on names, order, units and wrapping.

This module also holds the package's single definitions of the molar gas constant (OpenMM's value,
kJ/(mol K)) and of angle wrapping into [-pi, pi); the sampler imports them from here.

Units: dihedral CG coordinates in radians (IUPAC/mdtraj sign), other CG coordinates in nm,
temperature in K, kT in kJ/mol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np
import openmm.unit as unit

__all__ = ["CGSpace", "MOLAR_GAS_CONSTANT", "kT_kJmol", "wrap_angle", "PI", "TWO_PI"]

#: Molar gas constant R in kJ/(mol K), OpenMM's value.
MOLAR_GAS_CONSTANT = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
PI = math.pi
TWO_PI = 2.0 * math.pi


def kT_kJmol(temperature) -> float:
    """Thermal energy kT in kJ/mol at ``temperature`` (K, a number or an OpenMM Quantity)."""
    if unit.is_quantity(temperature):
        temperature = temperature.value_in_unit(unit.kelvin)
    return MOLAR_GAS_CONSTANT * float(temperature)


def wrap_angle(a):
    """Angles ``a`` (radians; NumPy array, torch tensor or float) wrapped into [-pi, pi).

    One formula for NumPy, torch (also inside TorchScript) and Python numbers: ``(a + pi) mod 2 pi - pi``
    with a floor-style modulo (``%`` is floor-style for all three)."""
    return (a + 3.141592653589793) % 6.283185307179586 - 3.141592653589793


@dataclass(frozen=True)
class CGSpace:
    """What the CG coordinates of a PMF are.

    Attributes:
        names: one name per CG coordinate, e.g. ``["phi", "psi"]``.
        periodic: per coordinate, True for a dihedral (radians, period 2 pi).
        temperature: K at which the PMF (in kT) was computed.
        atoms: 0-based atom quadruple of each dihedral CG coordinate; empty when the coordinates are
            not dihedrals of atoms (e.g. Mueller-Brown's s = x - y, nm).
    """

    names: List[str]
    periodic: List[bool]
    temperature: float
    atoms: List[List[int]] = field(default_factory=list)

    def __post_init__(self):
        object.__setattr__(self, "names", [str(n) for n in self.names])
        object.__setattr__(self, "periodic", [bool(p) for p in self.periodic])
        object.__setattr__(self, "atoms", [[int(i) for i in q] for q in (self.atoms or [])])
        object.__setattr__(self, "temperature", float(self.temperature))
        if not self.names:
            raise ValueError("a CG space needs at least one coordinate")
        if len(self.periodic) != len(self.names):
            raise ValueError(f"CG space: {len(self.names)} names {self.names} but {len(self.periodic)} "
                             f"periodic flags {self.periodic}")
        if self.atoms and (len(self.atoms) != len(self.names) or any(len(q) != 4 for q in self.atoms)):
            raise ValueError(f"CG space: atoms {self.atoms} must be one quadruple per CG coordinate ({self.names})")
        if self.atoms and not all(self.periodic):
            raise ValueError("CG space: atom quadruples given but not every CG coordinate is periodic (a dihedral)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"CG space: temperature must be a positive number of kelvin, got {self.temperature!r}")

    @property
    def d(self) -> int:
        """Number of CG coordinates."""
        return len(self.names)

    @property
    def kT(self) -> float:
        """kT in kJ/mol at :attr:`temperature`."""
        return kT_kJmol(self.temperature)

    @property
    def all_periodic(self) -> bool:
        return all(self.periodic)

    def wrap(self, s) -> np.ndarray:
        """Copy of CG coordinates ``s`` [..., d] (float64) with periodic columns wrapped into [-pi, pi)."""
        return wrap_periodic(s, self.periodic)

    def as_dict(self) -> dict:
        return {"names": list(self.names), "periodic": list(self.periodic), "temperature": self.temperature,
                "atoms": [list(q) for q in self.atoms]}


def wrap_periodic(s, periodic: Sequence[bool]) -> np.ndarray:
    """Copy of CG coordinates ``s`` [..., d] (float64) with the columns where ``periodic`` is True wrapped
    into [-pi, pi)."""
    s = np.array(s, dtype=np.float64, copy=True)
    per = np.asarray(periodic, dtype=bool)
    if per.any():
        s[..., per] = wrap_angle(s[..., per])
    return s
