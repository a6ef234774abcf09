"""The Mueller-Brown potential: a 2-D toy with an exactly computable PMF.

Energies in kJ/mol with x, y in nm (one particle; z carries no energy). At T = 1202.7 K, kT = 10 kJ/mol,
i.e. beta = 0.1 per energy unit as in the literature. The CG coordinate is s = x - y and the fine
coordinate s_perp = x + y.
"""

from __future__ import annotations

import numpy as np
import openmm

#: Temperature (K) at which kT = 10 kJ/mol (beta = 0.1 mol/kJ).
TEMPERATURE = 1202.7

A = (-200.0, -100.0, -170.0, 15.0)
a = (-1.0, -1.0, -6.5, 0.7)
b = (0.0, 0.0, 11.0, 0.6)
c = (-10.0, -10.0, -6.5, 0.7)
X0 = (1.0, 0.0, -0.5, -1.0)
Y0 = (0.0, 0.5, 1.5, 1.0)

#: Upper-left minimum (nm), the starting basin of the active-learning demo.
UPPER_LEFT_MINIMUM = (-0.558, 1.442)


def potential(x, y):
    """Mueller-Brown energy in kJ/mol at (x, y) in nm; works on floats, numpy arrays and torch tensors."""
    total = 0.0
    for k in range(4):
        dx, dy = x - X0[k], y - Y0[k]
        arg = a[k] * dx * dx + b[k] * dx * dy + c[k] * dy * dy
        total = total + A[k] * (arg.exp() if hasattr(arg, "exp") else np.exp(arg))
    return total


def energy_expression() -> str:
    """The potential as an OpenMM custom-force expression in the particle's x and y."""
    terms = [
        f"({A[k]})*exp(({a[k]})*(x-({X0[k]}))^2+({b[k]})*(x-({X0[k]}))*(y-({Y0[k]}))+({c[k]})*(y-({Y0[k]}))^2)"
        for k in range(4)
    ]
    return "+".join(terms)


def create_system(mass: float = 1.0) -> openmm.System:
    """One-particle OpenMM System with the Mueller-Brown potential as a CustomExternalForce (kJ/mol, nm)."""
    system = openmm.System()
    system.addParticle(mass)
    force = openmm.CustomExternalForce(energy_expression())
    force.addParticle(0, [])
    system.addForce(force)
    return system
