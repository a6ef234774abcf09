"""Plot the alanine-dipeptide reference free energy and (if present) the plain-MD KLD curve.

  python benchmarks/plot_reference.py   # -> benchmarks/data/aldp_reference.png (+ aldp_md_kld.png)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = os.path.join(HERE, "data", "aldp_reference.npz")
    with np.load(ref) as z:
        F = np.array(z["free_energy_kT"])
        e = np.array(z["phi_edges"])
        m = json.loads(str(z["metadata_json"]))
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.pcolormesh(e, e, np.minimum(F, 15).T, cmap="viridis", shading="flat")
    ax.contour(0.5 * (e[1:] + e[:-1]), 0.5 * (e[1:] + e[:-1]), F.T, levels=np.arange(1, 15, 2), colors="w",
               linewidths=0.5)
    fig.colorbar(im, ax=ax, label="F / kT (clipped at 15)")
    ax.set_xlabel("phi / rad")
    ax.set_ylabel("psi / rad")
    ax.set_title(f"WT-metaD reference, {m['ns_total']:.0f} ns, self-KLD {m['figures']['self_consistency_kld']:.4f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "data", "aldp_reference.png"), dpi=110)
    md = os.path.join(HERE, "data", "aldp_md.npz")
    if os.path.exists(md):
        with np.load(md) as z:
            ev, k = np.array(z["curve_energy_evaluations"]), np.array(z["curve_kld"])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.loglog(ev, k, "o-", ms=3)
        ax.set_xlabel("energy evaluations (MD steps)")
        ax.set_ylabel("forward KLD to reference")
        ax.grid(True, which="both", lw=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "data", "aldp_md_kld.png"), dpi=110)
    print("plots written", file=sys.stderr)


if __name__ == "__main__":
    main()
