"""How many threads torch uses while a run trains, labels and fits: chosen here, by measurement, so that a
run needs no environment variable to be fast on a quiet machine and does not thrash on a busy one.

While the flow computes, the energy workers (one process per core) wait for it, and while they compute
the flow waits: the two never run at once, so the flow may use every core the process may run on. On
a machine shared with other jobs, however, more threads than free cores thrash (measured in issue #12:
two Mueller-Brown iterations took 220 s with torch's default threads against 84 s with one thread at
load ~4; ``benchmarks/threads.py``), and on a quiet 2-core machine two threads train the flow 1.55x
faster than one (``benchmarks/training_throughput.py``). Neither fixed choice is right everywhere, so
:class:`ThreadTuner` measures: it times a few training steps with each candidate count (1 ..
usable cores), keeps the fastest per unit of work, and measures again every ``hold_steps`` steps, so it
follows a machine whose load changes.

:func:`run_threads` says what the user chose: an explicit ``torch_threads`` setting wins, then an
``OMP_NUM_THREADS`` in the environment (torch has read it already: left alone); None means "tune".
:func:`torch_threads` applies a choice for the duration of a ``with`` block and restores the previous
setting afterwards (no lasting global change).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

__all__ = ["run_threads", "torch_threads", "usable_cores", "ThreadTuner", "tuner_for", "thread_steps"]


def usable_cores() -> int:
    """The number of cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_threads(setting: int | None = None) -> int | None:
    """The user's fixed intra-op thread count: ``setting`` if given (>= 1); else None, also when
    ``OMP_NUM_THREADS`` is set in the environment (torch already follows it). None from here means
    "no fixed choice": a :class:`ThreadTuner` chooses (see :func:`tuner_for`)."""
    if setting is not None:
        n = int(setting)
        if n < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {setting}")
        return n
    return None


def tuner_for(setting: int | None = None) -> "ThreadTuner | None":
    """A :class:`ThreadTuner` over 1 .. :func:`usable_cores` threads, or None when the user fixed the count
    (``setting``) or the environment did (``OMP_NUM_THREADS``), or when only one core is usable."""
    if setting is not None or os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    cores = usable_cores()
    return ThreadTuner(range(1, cores + 1)) if cores > 1 else None


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use ``n`` torch intra-op threads inside the block (None: unchanged); restores the previous count."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ThreadTuner:
    """Chooses torch's intra-op thread count for repeated steps of similar work by timing them.

    Each round first probes: ``probe_steps`` steps with every candidate count (the first step after a
    change of count is not timed: thread-pool start-up), then runs ``hold_steps`` steps with the count of
    the least seconds per unit of work, then probes again. ``best`` is the choice so far (the smallest
    candidate before any measurement). Use::

        tuner = ThreadTuner(range(1, usable_cores() + 1))
        for batch in batches:
            with tuner.step(work=len(batch)):
                train_step(batch)

    The previous thread count is restored after every step. ``choices`` counts the hold phases per
    thread count (for the record).
    """

    def __init__(self, candidates, probe_steps: int = 3, hold_steps: int = 60):
        self.candidates = sorted({int(c) for c in candidates})
        if not self.candidates or self.candidates[0] < 1:
            raise ValueError(f"thread candidates must be integers >= 1, got {list(candidates)}")
        self.probe_steps = int(probe_steps)
        self.hold_steps = int(hold_steps)
        self.best = self.candidates[0]
        self.choices: dict[int, int] = {}
        self._plan: list[tuple[int, bool]] = []  # (threads, timed) per coming step
        self._rates: dict[int, list[float]] = {}
        self._last = None

    def _next(self) -> tuple[int, bool]:
        if not self._plan:
            if self._rates:  # a probe has just finished: choose, then hold
                self.best = min(self._rates, key=lambda n: sorted(self._rates[n])[len(self._rates[n]) // 2])
                self.choices[self.best] = self.choices.get(self.best, 0) + 1
                self._rates = {}
                self._plan = [(self.best, False)] * self.hold_steps
            else:
                self._plan = [(n, i > 0) for n in self.candidates for i in range(self.probe_steps + 1)]
        return self._plan.pop(0)

    @contextlib.contextmanager
    def step(self, work: float = 1.0):
        """One step of ``work`` units (e.g. samples) under the thread count of the current plan."""
        n, timed = self._next()
        with torch_threads(n):
            t0 = time.perf_counter()
            yield n
            dt = time.perf_counter() - t0
        if timed and work > 0:
            self._rates.setdefault(n, []).append(dt / float(work))


def thread_steps(tuner: "ThreadTuner | None", work: float = 1.0):
    """``tuner.step(work)``, or a block that leaves torch's threads alone when ``tuner`` is None."""
    return tuner.step(work) if tuner is not None else torch_threads(None)
