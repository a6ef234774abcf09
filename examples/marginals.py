"""Per-residue free-energy maps of a PMF over more than two CG coordinates.

A learned PMF over six backbone dihedrals (``cgflow run alanine-tetrapeptide`` writes one) is not drawn as one
map: its 2-D marginals are, one Ramachandran panel per residue. This script:

1. loads ``PMF`` (a pmf.pt; ``--demo`` writes a small analytic six-dimensional one first, so the script runs
   without a learned PMF),
2. computes each residue's (phi, psi) marginal free energy from the PMF itself (quadrature, Monte Carlo or
   importance sampling over the other coordinates, ``openmm_cgflow_plugin.marginals``),
3. runs CG walkers on the PMF in OpenMM (several particles per walker for d > 3) and histograms their frames,
4. prints, per residue, the forward KLD between the walkers' marginal and the PMF's (the walkers sample the
   PMF, so it shrinks as they run longer), and writes ``marginals.png`` (mean and spread per residue).

  python examples/marginals.py --demo --out runs/marginals            # analytic 6-D PMF (--quick: seconds)
  python examples/marginals.py runs/tetra/pmf.pt --method importance --out runs/marginals  # a learned one
Units: radians, kT, ps.
"""

from __future__ import annotations

import argparse
import os
from typing import Tuple

import numpy as np
import torch

from openmm_cgflow_plugin import CGDynamics, CGSpace, load_pmf, plot_marginals, save_pmf
from openmm_cgflow_plugin.dynamics import DEFAULT_TIMESTEP_PS
from openmm_cgflow_plugin.marginals import marginal_free_energy, marginal_kld, residue_pairs


class CoupledRamachandran(torch.nn.Module):
    """An analytic PMF (kT) on the d-torus: per residue a two-basin (phi, psi) map, neighbours coupled through
    cos(psi_i - phi_{i+1}); spread 0.1-0.2 kT, largest at phi_2 = pi. Follows the pmf.pt model contract (``mean_and_spread``)."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mean_and_spread(s)[0]

    @torch.jit.export
    def mean_and_spread(self, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        phi, psi = s[:, 0::2], s[:, 1::2]
        a = (1.5 * torch.cos(phi - 1.9) + 0.8 * torch.cos(psi - 2.4) + 0.6 * torch.cos(2.0 * psi)).sum(1)
        a = a + 0.5 * torch.cos(psi[:, :-1] - phi[:, 1:]).sum(1)
        return a, 0.1 + 0.05 * (1.0 - torch.cos(phi[:, 0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pmf", nargs="?", help="pmf.pt of a PMF over d >= 3 CG coordinates")
    ap.add_argument("--demo", action="store_true", help="write and use an analytic six-dimensional PMF")
    ap.add_argument("--out", default="runs/marginals")
    ap.add_argument("--walkers", type=int, default=500)
    ap.add_argument("--ps", type=float, default=60.0, help="CG-walker time (ps) after 5 ps of equilibration")
    ap.add_argument("--bins", type=int, default=36, help="bins per dihedral of the marginals")
    ap.add_argument("--quick", action="store_true", help="200 walkers x 20 ps (a few seconds)")
    ap.add_argument("--method", default="auto", choices=["auto", "quadrature", "mc", "importance"],
                    help="how the other coordinates are integrated out; importance: the choice for a learned "
                         "PMF whose mass sits in a small part of CG space (d >= 4)")
    args = ap.parse_args()
    if args.quick:
        args.walkers, args.ps = 200, 20.0
    os.makedirs(args.out, exist_ok=True)
    if args.demo:
        names = [f"{a}:ALA{r}" for r in (2, 3, 4) for a in ("phi", "psi")]
        path = save_pmf(CoupledRamachandran(), os.path.join(args.out, "demo_pmf.pt"),
                        CGSpace(names, [True] * 6, 300.0))
    elif args.pmf:
        path = args.pmf
    else:
        ap.error("give a pmf.pt or --demo")
    pmf = load_pmf(path)
    print(f"{path}: {pmf.n_cg} CG coordinates {pmf.cg_names}")

    rng = np.random.default_rng(0)
    dyn = CGDynamics(path, rng.uniform(-np.pi, np.pi, (args.walkers, pmf.n_cg)), seed=1)
    dt = DEFAULT_TIMESTEP_PS
    dyn.run(int(5.0 / dt))                                    # equilibrate
    frames, _ = dyn.run(int(args.ps / dt), report_interval=int(0.5 / dt))
    print(f"CG walkers: {args.walkers} x {args.ps:g} ps -> {frames.shape[0] * frames.shape[1]:,} frames")

    for i, j in residue_pairs(pmf.n_cg):
        exact = marginal_free_energy(pmf, (i, j), bins=args.bins, method=args.method)
        kld = marginal_kld(frames, (i, j), exact.probabilities, periodic=pmf.periodic)
        print(f"{pmf.cg_names[i]:>10s} / {pmf.cg_names[j]:<10s}  marginal by {exact.method}: KLD(PMF || walkers) "
              f"{kld:.4f}")
    png = plot_marginals(path, os.path.join(args.out, "marginals.png"), n_grid=args.bins, method=args.method)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
