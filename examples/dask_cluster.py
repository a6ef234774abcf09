"""Alanine-dipeptide energies through a Dask cluster (here a LocalCluster of 2 worker processes).

On a real cluster, start a scheduler and workers (``dask scheduler``; ``dask worker tcp://host:8786
--nthreads 1`` once per core, or dask-jobqueue's ``SLURMCluster``) and pass the address instead:
``EnergyBridge(system, temperature, scheduler="tcp://host:8786")`` or ``cgflow run ... --scheduler
tcp://host:8786``. Needs ``pip install 'openmm-cgflow[dask]'``. Runs in ~10 s.
"""

import numpy as np
from distributed import LocalCluster

from openmm_cgflow import EnergyBridge, builtin


def main():
    molecule = builtin("alanine-dipeptide")  # OpenMM System (kJ/mol, nm), temperature (K), positions (nm)
    rng = np.random.default_rng(0)
    xyz = molecule.positions[None] + 0.005 * rng.standard_normal((512, molecule.n_atoms, 3))  # nm
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with EnergyBridge(molecule.system, molecule.temperature, scheduler=cluster.scheduler_address) as bridge:
            u, forces, finite = bridge.energy_and_forces(xyz)  # kT, kT/nm, bool
            print(f"{bridge.n_workers} Dask workers, {bridge.n_evaluations} evaluations")
    with EnergyBridge(molecule.system, molecule.temperature, n_workers=0) as local:
        u_local, _, _ = local.energy_and_forces(xyz)
    print("energies (kT):", np.round(u[:4], 3), "...")
    print(f"max |u_dask - u_local| = {np.abs(u - u_local).max():.2e} kT; all finite: {bool(finite.all())}")


if __name__ == "__main__":  # Dask starts its worker processes by importing this file: keep the guard
    main()
