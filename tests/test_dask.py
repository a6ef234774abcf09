"""The energy bridge on a real Dask cluster (``distributed.LocalCluster``, 2 worker processes).

Parity with the local bridge, a worker killed mid-batch, a hung worker (chunk timeout), a cluster with no
worker, and the example script. One cluster for the module; about half a minute on 2 cores.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")

from openmm_cgflow.bridge import EnergyBridge  # noqa: E402
from openmm_cgflow.executors import NoWorkersError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def _worker_pids(client) -> dict:
    return client.run(os.getpid)


def _perturbed(aldp, rng, n, sigma=0.01):
    return aldp.positions[None] + sigma * rng.standard_normal((n, aldp.n_atoms, 3))


def _assert_same(result, reference):
    u, f, finite = result
    u_ref, f_ref, finite_ref = reference
    assert finite.tolist() == finite_ref.tolist()
    np.testing.assert_allclose(u, u_ref, rtol=1e-10)
    np.testing.assert_allclose(f, f_ref, rtol=1e-10, atol=1e-10 * np.abs(f_ref).max())


def test_dask_energies_and_forces_equal_local_bridge(aldp, rng, client):
    xyz = _perturbed(aldp, rng, 300)
    xyz[7, 3, 0] = np.nan  # a non-finite sample is flagged, as locally
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=2, min_parallel_batch=8) as local:
        reference = local.energy_and_forces(xyz)
    with EnergyBridge(aldp.system, aldp.temperature, scheduler=client, min_parallel_batch=8) as bridge:
        assert bridge.n_workers == 2
        result = bridge.energy_and_forces(xyz)
        assert bridge.n_evaluations == 300
        _assert_same(result, reference)
        assert not result[2][7] and np.isposinf(result[0][7])
        # autograd through the cluster: gradient -F/kT from the same call, no second evaluation
        x = torch.tensor(xyz[:100], requires_grad=True)
        bridge.energy(x).sum().backward()
        assert bridge.n_evaluations == 400
        np.testing.assert_allclose(x.grad.numpy(), -reference[1][:100], rtol=1e-10,
                                   atol=1e-10 * np.abs(reference[1]).max())
    assert client.status == "running"  # a given Client is the caller's: the bridge leaves it open


def test_one_context_per_system_per_worker(aldp, mb, rng, client):
    """Two systems through one shared executor: each worker keeps one process with one Context per System."""
    from openmm_cgflow.dask_executor import DaskExecutor

    with DaskExecutor(client) as executor, \
            EnergyBridge(aldp.system, aldp.temperature, executor=executor, min_parallel_batch=8) as a, \
            EnergyBridge(mb.system, mb.temperature, executor=executor, min_parallel_batch=8) as b:
        for _ in range(2):
            a.energy_and_forces(_perturbed(aldp, rng, 64))
            b.energy_and_forces(np.concatenate([rng.uniform(-1, 1, (64, 1, 2)), np.zeros((64, 1, 1))], axis=2))

        def contexts(keys, dask_worker):  # this executor's actors: systems in their process, its pid
            return [(sorted(a._keys), a._pool.pids) for k, a in dask_worker.state.actors.items()
                    if k in keys and a._pool is not None]

        keys = [actor.key for actor in executor._actors.values()]
        names = {a.executor._plugins[a.system_key], b.executor._plugins[b.system_key]}
        assert len(names) == 2
        per_worker = client.run(contexts, keys)
        assert sorted(len(actors) for actors in per_worker.values()) == [1, 1]  # one actor per worker
        for [(systems, pids)] in per_worker.values():
            assert set(systems) == names and len(pids) == 1  # each saw both: one process, one Context per System
    assert client.status == "running"
    deadline = time.monotonic() + 20  # closed: the actors (and their OpenMM processes) go away
    while any(client.run(contexts, keys).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(client.run(contexts, keys).values())


def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_worker_killed_mid_batch_gives_same_result_counted_once(aldp, rng, client):
    unique = _perturbed(aldp, rng, 100)
    xyz = np.tile(unique, (240, 1, 1))  # 24000 configurations: each worker is busy for ~1 s or more
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=0) as local:
        u, f, finite = local.energy_and_forces(unique)
    reference = (np.tile(u, 240), np.tile(f, (240, 1, 1)), np.tile(finite, 240))
    pids = _worker_pids(client)
    victim = sorted(pids)[0]
    with EnergyBridge(aldp.system, aldp.temperature, scheduler=client) as bridge:
        t0 = time.monotonic()
        bridge.energy_and_forces(xyz[:2000])  # Contexts built; times one chunk of 500 per worker
        per_config = (time.monotonic() - t0) / 1000
        n0 = bridge.n_evaluations
        thread, box = _run_in_thread(lambda: bridge.energy_and_forces(xyz))
        time.sleep(min(0.3, 0.1 * per_config * xyz.shape[0] / 2))  # well inside the batch
        assert thread.is_alive()
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(120)
        assert not thread.is_alive(), "the batch did not finish after a worker was killed"
        assert "error" not in box, box.get("error")
        _assert_same(box["result"], reference)
        assert bridge.n_evaluations - n0 == xyz.shape[0]  # counted once
        assert bridge.executor.n_retries >= 1  # the killed worker's chunks were sent to the other worker
    assert pids[victim] not in _worker_pids(client).values()
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_hung_worker_chunk_times_out_and_is_retried_elsewhere(aldp, rng, client):
    client.wait_for_workers(2, timeout=60)
    xyz = _perturbed(aldp, rng, 256)
    with EnergyBridge(aldp.system, aldp.temperature, n_workers=0) as local:
        reference = local.energy_and_forces(xyz)
    pids = _worker_pids(client)
    stopped = sorted(pids)[0]
    with EnergyBridge(aldp.system, aldp.temperature, scheduler=client, chunk_timeout=2.0) as bridge:
        bridge.executor.chunks_per_worker = 1  # two chunks, one per worker
        bridge.energy_and_forces(xyz)  # both workers take part (their Contexts are built)
        assert bridge.n_workers == 2
        os.kill(pids[stopped], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            result = bridge.energy_and_forces(xyz)
            elapsed = time.monotonic() - t0
        finally:
            os.kill(pids[stopped], signal.SIGCONT)
        _assert_same(result, reference)
        assert bridge.n_evaluations == 512
        assert elapsed < 30
        # the chunk that went to the stopped worker was sent again to the other one, which had finished
        # its own chunk in time
        assert bridge.executor.n_retries == 1


def test_cluster_without_workers_raises_clear_error_in_bounded_time(aldp, rng):
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        with EnergyBridge(aldp.system, aldp.temperature, scheduler=cluster.scheduler_address, worker_wait=2.0) as bridge:
            assert bridge.n_workers == 0
            t0 = time.monotonic()
            with pytest.raises(NoWorkersError, match="no Dask worker"):
                bridge.energy_and_forces(_perturbed(aldp, rng, 128))
            assert time.monotonic() - t0 < 15
            assert bridge.n_evaluations == 0


def test_unreachable_scheduler_is_a_clear_error(aldp):
    from openmm_cgflow.executors import BridgeError

    with pytest.raises(BridgeError, match="cannot reach the Dask scheduler"):
        EnergyBridge(aldp.system, aldp.temperature, scheduler="tcp://127.0.0.1:9", worker_wait=1.0)


def test_example_dask_cluster_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "dask_cluster.py")], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "energies (kT)" in proc.stdout


def test_cgflow_run_mueller_brown_on_a_local_cluster(client, tmp_path):
    """The CLI with --scheduler: energies on the cluster's workers, the run stops by itself, KLD <= 1e-3."""
    import json

    from openmm_cgflow.cli import main

    out = tmp_path / "mb"
    rc = main(["run", "mueller-brown", "--out", str(out), "--scheduler", client.scheduler.address,
               "--quiet", "--no-plots"])
    assert rc == 0
    recs = [json.loads(line) for line in (out / "iterations.jsonl").read_text().splitlines()]
    assert recs[-1]["converged"], recs[-1]
    assert recs[-1]["kld"] <= 1e-3, [r["kld"] for r in recs]


def test_cluster_without_workers_stops_the_run_with_an_intact_checkpoint(tmp_path, mb):
    """No worker left: a clear error naming the intact checkpoint; the run resumes from it locally."""
    from openmm_cgflow import LearnerSettings, PMFLearner
    from openmm_cgflow.executors import BridgeError

    out = tmp_path / "run"
    settings = LearnerSettings.for_system(mb, max_iterations=1)
    PMFLearner(mb, out, settings, progress=False, plots=False).run()
    saved = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "pmf.pt", "flow.pt", "iterations.jsonl")}
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster:
        remote = LearnerSettings.for_system(mb, max_iterations=2, scheduler=cluster.scheduler_address, worker_wait=2.0)
        learner = PMFLearner(mb, out, remote, progress=False, plots=False)
        with pytest.raises(BridgeError, match=r"no Dask worker.*checkpoint of iteration 0 .* is intact"):
            learner.run()
    for name, content in saved.items():
        assert (out / name).read_bytes() == content, name
    resumed = PMFLearner(mb, out, LearnerSettings.for_system(mb, max_iterations=2), progress=False, plots=False)
    assert resumed.iteration == 1
    resumed.run()
    assert resumed.iteration == 2 and len(resumed.history) == 2
