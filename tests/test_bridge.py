"""The energy bridge against direct OpenMM Context calls and closed forms."""

import os
import signal
import time

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

from openmm_cgflow import mueller_brown as mb_potential
from openmm_cgflow.bridge import EnergyBridge
from openmm_cgflow.executors import LocalProcessExecutor, NoWorkersError


def _direct(system, xyz):
    """Energies (kJ/mol) and forces straight from one Reference Context."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for conf in xyz:
        context.setPositions(conf)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(energies), np.array(forces)


def _perturbed(aldp, rng, n, sigma=0.01):
    return aldp.positions[None] + sigma * rng.standard_normal((n, aldp.n_atoms, 3))


@pytest.mark.parametrize("n_workers", [0, 2])
def test_bridge_matches_direct_context(aldp, rng, n_workers):
    xyz = _perturbed(aldp, rng, 80)
    e_ref, f_ref = _direct(aldp.system, xyz)
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=n_workers, min_parallel_batch=8) as bridge:
        u, f, finite = bridge.energy_and_forces(xyz)
        assert bridge.n_evaluations == 80
    assert finite.all()
    np.testing.assert_allclose(u * aldp.kT, e_ref, rtol=1e-10)
    np.testing.assert_allclose(f * aldp.kT, f_ref, rtol=1e-10, atol=1e-10 * np.abs(f_ref).max())


def test_cpu_energy_platform_matches_reference(aldp, rng):
    """The learner's energy_platform="CPU" (one thread per worker): energies and forces as on Reference, to
    the CPU platform's mixed precision."""
    from openmm_cgflow.settings import ENERGY_PLATFORMS

    xyz = _perturbed(aldp, rng, 40)
    e_ref, f_ref = _direct(aldp.system, xyz)
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=2, platform="CPU", properties=ENERGY_PLATFORMS["CPU"],
                      min_parallel_batch=8) as bridge:
        u, f, finite = bridge.energy_and_forces(xyz)
    assert finite.all()
    np.testing.assert_allclose(u * aldp.kT, e_ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(f * aldp.kT, f_ref, atol=2e-3 * np.abs(f_ref).max())


def test_autograd_gives_forces_without_second_call(aldp, rng):
    xyz = torch.tensor(_perturbed(aldp, rng, 5), requires_grad=True)
    bridge = EnergyBridge(aldp.system, aldp.temperature, n_workers=0)
    u = bridge.energy(xyz)
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    (u * weights).sum().backward()
    assert bridge.n_evaluations == 5
    _, f_ref = _direct(aldp.system, xyz.detach().numpy())
    expected = -f_ref / aldp.kT * weights.numpy()[:, None, None]
    np.testing.assert_allclose(xyz.grad.numpy(), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_non_finite_samples_are_flagged_not_fatal(aldp, rng):
    xyz = _perturbed(aldp, rng, 4)
    xyz[1, 3, 0] = np.nan
    xyz[2, 5] = xyz[2, 6]  # two atoms on top of each other: infinite Coulomb energy
    bridge = EnergyBridge(aldp.system, aldp.temperature, n_workers=0)
    u, f, finite = bridge.energy_and_forces(xyz)
    assert finite.tolist() == [True, False, False, True]
    assert np.isposinf(u[1]) and np.isposinf(u[2])
    assert not np.isnan(u).any()
    assert np.all(f[1] == 0)
    e_ref, _ = _direct(aldp.system, xyz[[0, 3]])
    np.testing.assert_allclose(u[[0, 3]] * aldp.kT, e_ref, rtol=1e-10)
    x = torch.tensor(xyz, requires_grad=True)
    energy = bridge.energy(x)
    energy[finite].sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()


def test_wrong_shape_is_refused(aldp):
    bridge = EnergyBridge(aldp.system, aldp.temperature, n_workers=0)
    with pytest.raises(ValueError, match="expected \\[batch, 22, 3\\]"):
        bridge.energy_and_forces(np.zeros((2, 21, 3)))


def test_mueller_brown_energy_equals_closed_form(mb, rng):
    xy = rng.uniform([-1.5, -0.5], [1.2, 2.0], size=(50, 2))
    xyz = np.concatenate([xy, rng.normal(size=(50, 1))], axis=1)[:, None, :]
    bridge = EnergyBridge(mb.system, mb.temperature, n_workers=0)
    u, f, _ = bridge.energy_and_forces(xyz)
    closed = mb_potential.potential(xy[:, 0], xy[:, 1])
    np.testing.assert_allclose(u * mb.kT, closed, rtol=1e-10)
    assert abs(mb.kT - 10.0) < 1e-3  # beta = 0.1
    xt = torch.tensor(xy, requires_grad=True)
    mb_potential.potential(xt[:, 0], xt[:, 1]).sum().backward()
    np.testing.assert_allclose(-f[:, 0, :2] * mb.kT, xt.grad.numpy(), rtol=1e-9)
    assert np.all(f[:, 0, 2] == 0)


def _wait_dead(pid, timeout=10.0):
    """Until the process is a zombie or gone (it is not our child: the executor reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] in "ZX":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)


def test_local_worker_killed_chunk_is_retried_and_counted_once(aldp, rng):
    xyz = _perturbed(aldp, rng, 200)
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=0) as local:
        reference = local.energy_and_forces(xyz)
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=2, min_parallel_batch=8) as bridge:
        assert isinstance(bridge.executor, LocalProcessExecutor)
        victim = bridge.executor.pids[0]
        os.kill(victim, signal.SIGKILL)
        _wait_dead(victim)
        u, f, finite = bridge.energy_and_forces(xyz)
        assert bridge.n_evaluations == 200
        assert bridge.executor.n_retries == 1 and bridge.n_workers == 1
        assert victim not in bridge.executor.pids
        np.testing.assert_array_equal(u, reference[0])
        np.testing.assert_array_equal(f, reference[1])
        with pytest.raises(NoWorkersError):  # the last worker gone: a clear error, nothing counted
            os.kill(bridge.executor.pids[0], signal.SIGKILL)
            bridge.energy_and_forces(xyz)
        assert bridge.n_evaluations == 200


def test_local_hung_worker_times_out_and_chunk_goes_elsewhere(aldp, rng):
    xyz = _perturbed(aldp, rng, 200)
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=0) as local:
        reference = local.energy_and_forces(xyz)
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=2, min_parallel_batch=8, chunk_timeout=1.0) as bridge:
        hung = bridge.executor.pids[0]
        os.kill(hung, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            u, f, _ = bridge.energy_and_forces(xyz)
            assert time.monotonic() - t0 < 10
        finally:
            try:
                os.kill(hung, signal.SIGCONT)
            except ProcessLookupError:  # the executor killed it (the expected case)
                pass
        assert bridge.executor.n_retries == 1 and hung not in bridge.executor.pids
        assert bridge.n_evaluations == 200
        np.testing.assert_array_equal(u, reference[0])
        np.testing.assert_array_equal(f, reference[1])
