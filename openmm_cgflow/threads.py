"""How many threads torch uses while a run trains, labels and fits: chosen here, so that a run needs no
environment variable to be fast.

The energy workers (one process per core) take the cores while the flow trains, and other jobs may share
the machine: torch's default of one intra-op thread per core then oversubscribes the cores and thrashes
(measured in issue #12: two Mueller-Brown iterations took 220 s with default threads against 84 s with
``OMP_NUM_THREADS=1`` at load ~4; see ``benchmarks/threads.py``). :func:`run_threads` therefore picks one
thread unless the user chose: an explicit ``torch_threads`` setting wins, then an ``OMP_NUM_THREADS``
in the environment (torch has read it already: left alone). :func:`torch_threads` applies a choice for the
duration of a ``with`` block and restores the previous setting afterwards (no lasting global change).
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["run_threads", "torch_threads"]


def run_threads(setting: int | None = None) -> int | None:
    """Intra-op threads for a run: ``setting`` if given (>= 1), None (leave torch alone) if
    ``OMP_NUM_THREADS`` is set in the environment, else 1."""
    if setting is not None:
        n = int(setting)
        if n < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {setting}")
        return n
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return 1


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
