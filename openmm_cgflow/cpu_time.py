"""CPU seconds spent by this process and its local energy workers: how busy a run keeps the machine.

The mean number of busy cores over a phase is (CPU seconds of this process and of its worker processes)
/ wall seconds; a run on two cores whose flow and workers alternate well reaches ~2. Worker CPU time is
read from ``/proc/<pid>/stat`` (Linux; elsewhere only this process counts, and :func:`cpu_seconds` says so
by returning ``complete=False``). Written by hand because the one field needed does not justify a
dependency such as psutil.
"""

from __future__ import annotations

import os
import time

__all__ = ["cpu_seconds", "CPUMeter"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / float(_TICKS)  # utime + stime (fields 14, 15)


def cpu_seconds(pids=()) -> tuple[float, bool]:
    """(CPU seconds of this process, all threads, plus those of ``pids``; whether every pid was readable)."""
    total, complete = time.process_time(), True
    for pid in pids:
        t = _proc_cpu(pid)
        if t is None:
            complete = False
        else:
            total += t
    return total, complete


class CPUMeter:
    """Mean busy cores of this process and ``pids`` over the time the meter runs (``with`` block or
    start/stop pairs; accumulates)."""

    def __init__(self, pids=()):
        self.pids = list(pids)
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.complete = True
        self._t0 = None

    def start(self) -> None:
        self._t0 = (time.perf_counter(), cpu_seconds(self.pids)[0])

    def stop(self) -> None:
        wall0, cpu0 = self._t0
        cpu1, complete = cpu_seconds(self.pids)
        self.wall_s += time.perf_counter() - wall0
        self.cpu_s += cpu1 - cpu0
        self.complete &= complete

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def load(self) -> float:
        """CPU seconds per wall second (mean busy cores)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else float("nan")
