"""TorchScript energy modules the plugin's forces run: a PMF on CG walkers, and a PMF bias through dihedrals.

They are backend-neutral: :mod:`openmm_cgflow_plugin.backends` runs them in a TorchForce (openmm-torch)
or an ``openmm.PythonForce``, with the same arguments. Energies are returned in kJ/mol (OpenMM's unit)
in the dtype of ``positions`` (float64 on the Reference and CPU platforms and in the PythonForce backend,
float32 on CUDA/OpenCL in single or mixed precision); forces come from autograd. The PMF module inside
computes in the same dtype.

* :class:`CGWalkerEnergy` / :class:`CGWalkerEnergyPBC`: ``positions`` [W * P, 3] hold W independent walkers
  of P = ceil(d / 3) particles each (:func:`walker_particles`); walker w's CG coordinates s (1 rad is read as
  1 nm) are the first d entries of its particles' x, y, z in order (``positions.reshape(W, 3 P)[:, :d]``), the
  3 P - d unused slots feel no force. For d <= 3 that is one particle per walker, s = ``positions[:, :d]``.
  Periodic coordinates are wrapped into [-pi, pi) before the PMF sees them. E = kT * sum_w A(s_w).
* :class:`DihedralBias` / :class:`DihedralBiasPBC`: ``positions`` [n_atoms, 3] nm of an all-atom System;
  s = the dihedrals of ``cg_atoms`` (IUPAC/mdtraj sign, radians); E = factor * kT * A(s), with ``factor``
  an OpenMM global parameter (a scalar tensor argument). The PBC variant takes bond vectors by the
  minimum-image convention of the (triclinic, reduced) box.
"""

from typing import List

import math

import torch
from torch import nn

from .cgspace import wrap_angle

__all__ = ["walker_particles", "wrap_columns", "dihedrals", "dihedrals_pbc", "minimum_image", "CGWalkerEnergy",
           "CGWalkerEnergyPBC", "DihedralBias", "DihedralBiasPBC"]


def walker_particles(n_cg: int) -> int:
    """Particles per CG walker for d = ``n_cg`` CG coordinates: ceil(d / 3) (three coordinates per particle)."""
    n_cg = int(n_cg)
    if n_cg < 1:
        raise ValueError(f"a CG walker needs at least one CG coordinate, got {n_cg}")
    return (n_cg + 2) // 3


def wrap_columns(s: torch.Tensor, periodic_mask: torch.Tensor) -> torch.Tensor:
    """Wrap the columns of s [N, d] (radians) where ``periodic_mask`` [d] is True into [-pi, pi)
    (:func:`~openmm_cgflow_plugin.cgspace.wrap_angle`). Values already in [-pi, pi) pass through bit for bit
    (``wrap_angle`` would round them at the 1e-16 level, which long Langevin runs amplify)."""
    outside = (s < -3.141592653589793) | (s >= 3.141592653589793)
    return torch.where(periodic_mask.unsqueeze(0) & outside, wrap_angle(s), s)


def dihedrals(positions: torch.Tensor, quads: torch.Tensor) -> torch.Tensor:
    """Dihedral angles [d] (radians, mdtraj's formula and sign) of atoms ``quads`` [d, 4] in positions [n, 3]."""
    p0 = positions.index_select(0, quads[:, 0])
    p1 = positions.index_select(0, quads[:, 1])
    p2 = positions.index_select(0, quads[:, 2])
    p3 = positions.index_select(0, quads[:, 3])
    return _dihedral_from_bonds(p1 - p0, p2 - p1, p3 - p2)


def _dihedral_from_bonds(b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    c1 = torch.cross(b2, b3, dim=1)
    c2 = torch.cross(b1, b2, dim=1)
    y = (b1 * c1).sum(dim=1) * torch.sqrt((b2 * b2).sum(dim=1))
    x = (c1 * c2).sum(dim=1)
    return torch.atan2(y, x)


def minimum_image(d: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Minimum-image displacement vectors d [k, 3] for OpenMM's reduced triclinic box [3, 3] (rows a, b, c)."""
    d = d - torch.round(d[:, 2:3] / box[2, 2]) * box[2].unsqueeze(0)
    d = d - torch.round(d[:, 1:2] / box[1, 1]) * box[1].unsqueeze(0)
    d = d - torch.round(d[:, 0:1] / box[0, 0]) * box[0].unsqueeze(0)
    return d


def dihedrals_pbc(positions: torch.Tensor, quads: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """As :func:`dihedrals`, bond vectors taken by the minimum-image convention in ``box`` [3, 3]."""
    p0 = positions.index_select(0, quads[:, 0])
    p1 = positions.index_select(0, quads[:, 1])
    p2 = positions.index_select(0, quads[:, 2])
    p3 = positions.index_select(0, quads[:, 3])
    return _dihedral_from_bonds(minimum_image(p1 - p0, box), minimum_image(p2 - p1, box), minimum_image(p3 - p2, box))


class CGWalkerEnergy(nn.Module):
    """E [kJ/mol] = kT * sum over walkers of the PMF mean at s_w (periodic dims wrapped).

    ``positions`` [W * P, 3], P = ``particles`` = ceil(d / 3); s_w = ``positions.reshape(W, 3 P)[w, :d]``."""

    n_cg: int
    particles: int
    kT: float

    def __init__(self, pmf: nn.Module, n_cg: int, periodic: List[bool], kT: float):
        super().__init__()
        self.pmf = pmf
        self.n_cg = int(n_cg)
        self.particles = walker_particles(self.n_cg)
        self.kT = float(kT)
        if len(periodic) != self.n_cg:
            raise ValueError(f"periodic has {len(periodic)} entries for {self.n_cg} CG coordinates")
        self.register_buffer("periodic_mask", torch.tensor([bool(p) for p in periodic], dtype=torch.bool))

    def cg(self, positions: torch.Tensor) -> torch.Tensor:
        """CG coordinates [W, d] of the walkers (positions [W * P, 3]), periodic ones wrapped into [-pi, pi)."""
        return wrap_columns(positions.reshape(-1, 3 * self.particles)[:, : self.n_cg], self.periodic_mask)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.kT * self.pmf(self.cg(positions)).sum()


class CGWalkerEnergyPBC(CGWalkerEnergy):
    """:class:`CGWalkerEnergy` for a System with a periodic box (TorchForce passes the box vectors).

    The box is 2 pi on each side; wrapping uses the PMF's period 2 pi, so the box argument is not needed."""

    def forward(self, positions: torch.Tensor, boxvectors: torch.Tensor) -> torch.Tensor:
        return self.kT * self.pmf(self.cg(positions)).sum()


class DihedralBias(nn.Module):
    """E [kJ/mol] = factor * kT * min(A(s(x)), cap_kT), s = dihedrals of ``cg_atoms`` (global parameter
    ``factor``; ``cap_kT`` infinite by default: no cap)."""

    kT: float
    cap_kT: float

    def __init__(self, pmf: nn.Module, cg_atoms: List[List[int]], kT: float, cap_kT: float = math.inf):
        super().__init__()
        self.pmf = pmf
        self.kT = float(kT)
        self.cap_kT = float(cap_kT)
        self.register_buffer("quads", torch.tensor(cg_atoms, dtype=torch.long).reshape(-1, 4))

    @torch.jit.export
    def cg(self, positions: torch.Tensor) -> torch.Tensor:
        """CG dihedrals [1, d] (radians) of positions [n_atoms, 3] nm."""
        return dihedrals(positions, self.quads).unsqueeze(0)

    def forward(self, positions: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        a = torch.clamp(self.pmf(self.cg(positions)).sum(), max=self.cap_kT)
        return factor.to(a.dtype) * self.kT * a


class DihedralBiasPBC(DihedralBias):
    """:class:`DihedralBias` for periodic Systems: bond vectors by the minimum-image convention."""

    @torch.jit.export
    def cg(self, positions: torch.Tensor, boxvectors: torch.Tensor) -> torch.Tensor:
        """CG dihedrals [1, d] (radians) of positions [n_atoms, 3] nm in the periodic box [3, 3] nm."""
        return dihedrals_pbc(positions, self.quads, boxvectors.to(positions.dtype)).unsqueeze(0)

    def forward(self, positions: torch.Tensor, boxvectors: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        a = torch.clamp(self.pmf(self.cg(positions, boxvectors)).sum(), max=self.cap_kT)
        return factor.to(a.dtype) * self.kT * a
