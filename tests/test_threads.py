"""The package's thread choice (openmm_cgflow.threads) and CPU accounting (openmm_cgflow.cpu_time)."""

import os
import time

import pytest
import torch

from openmm_cgflow.cpu_time import CPUMeter, cpu_seconds
from openmm_cgflow.threads import ThreadTuner, run_threads, torch_threads, tuner_for, usable_cores


def test_tuner_picks_the_fastest_count_and_restores_threads():
    """A step that is slow with 1 thread and fast with 2 (simulated by sleeping per thread count): the tuner
    probes both in a fixed order, then holds 2; torch's thread count is restored after every step."""
    before = torch.get_num_threads()
    tuner = ThreadTuner([1, 2], probe_steps=2, hold_steps=5)
    used = []
    for _ in range(2 * 3 + 5):
        with tuner.step(work=10) as n:
            used.append(n)
            assert torch.get_num_threads() == n
            time.sleep(0.02 if n == 1 else 0.005)
        assert torch.get_num_threads() == before
    assert used[:6] == [1, 1, 1, 2, 2, 2]  # one untimed warm-up step per count, then probe_steps timed ones
    assert used[6:] == [2] * 5
    assert tuner.best == 2 and tuner.choices == {2: 1}
    with tuner.step() as n:  # then it probes again
        assert n == 1


def test_tuner_prefers_one_thread_when_two_are_slower():
    tuner = ThreadTuner([1, 2], probe_steps=1, hold_steps=3)
    for _ in range(4 + 3):
        with tuner.step(work=1) as n:
            time.sleep(0.004 if n == 1 else 0.02)
    assert tuner.best == 1


def test_user_choices_switch_the_tuner_off(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run_threads(3) == 3 and tuner_for(3) is None
    tuner = tuner_for(None)
    if usable_cores() > 1:
        assert tuner.candidates == list(range(1, usable_cores() + 1))
    else:
        assert tuner is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert tuner_for(None) is None and run_threads(None) is None
    with pytest.raises(ValueError, match="torch_threads"):
        run_threads(0)
    with pytest.raises(ValueError, match="thread candidates"):
        ThreadTuner([0, 1])


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_cpu_meter_counts_a_busy_child_process():
    """A child process spinning while this one sleeps: counted with its pid, about nothing without it."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<2.0: pass"])
    try:
        time.sleep(0.3)  # past the child's start-up
        with CPUMeter([child.pid]) as with_child, CPUMeter() as alone:
            time.sleep(0.8)
    finally:
        child.wait()
    assert with_child.complete
    assert alone.load < 0.2, alone.load  # this process only sleeps
    assert with_child.load > alone.load + 0.3, (with_child.load, alone.load)  # >= 0.3 of a core (shared machine)
    assert with_child.load < 1.3
    total, complete = cpu_seconds([2**22 + 12345])  # no such process
    assert not complete and total >= 0
