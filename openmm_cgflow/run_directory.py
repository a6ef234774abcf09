"""The run directory of an active-learning run: every file it holds, and every write to it.

Layout (the ``cgflow run --out DIR`` contract)::

    DIR/pmf.pt              the latest exported ensemble (TorchScript; openmm_cgflow_plugin.load_pmf)
    DIR/flow.pt             the latest flow with its system (openmm_cgflow.model_io.load_model), for backmapping
    DIR/checkpoint.pt       everything needed to resume after the last finished iteration
    DIR/iterations.jsonl    one JSON object per finished iteration
    DIR/pmfs/pmf_NNN.pt     the ensemble exported in iteration NNN
    DIR/plots/*.png         plots (openmm_cgflow.reporting.PlotReporter)

Every write goes through :func:`openmm_cgflow_plugin.files.atomic_write` (temporary file in the same folder,
fsync, rename), so a crash leaves the previous version of a file or the new one, never a mixture.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from openmm_cgflow_plugin.files import atomic_write

__all__ = ["RunDirectory", "CHECKPOINT_FORMAT"]

#: Format tag of checkpoint.pt.
CHECKPOINT_FORMAT = "openmm-cgflow-checkpoint/1"


class RunDirectory:
    """The files of one run in the folder ``path`` (created; must be writable, else ValueError)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create output directory {self.path}: {exc}") from exc
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ValueError(f"output directory {self.path} is not writable")

    def __repr__(self) -> str:
        return f"RunDirectory({self.path!r})"

    # ------------------------------------------------------------------ paths
    @property
    def pmf_path(self) -> str:
        """The latest exported ensemble."""
        return os.path.join(self.path, "pmf.pt")

    @property
    def flow_path(self) -> str:
        """The latest flow with its system."""
        return os.path.join(self.path, "flow.pt")

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.path, "checkpoint.pt")

    @property
    def iterations_path(self) -> str:
        return os.path.join(self.path, "iterations.jsonl")

    @property
    def plots_dir(self) -> str:
        return os.path.join(self.path, "plots")

    def snapshot_path(self, iteration: int) -> str:
        """``pmfs/pmf_NNN.pt``: the ensemble exported in ``iteration``."""
        return os.path.join(self.path, "pmfs", f"pmf_{int(iteration):03d}.pt")

    def plot_path(self, name: str) -> str:
        """``plots/NAME`` (the folder is created)."""
        os.makedirs(self.plots_dir, exist_ok=True)
        return os.path.join(self.plots_dir, name)

    # ------------------------------------------------------------------ writes
    def write_bytes(self, path: str, write) -> None:
        """Write the file ``path`` (inside the run directory) atomically: ``write(fh)`` fills a binary handle."""
        with atomic_write(path, "wb") as fh:
            write(fh)

    def save_checkpoint(self, payload: dict) -> None:
        """Write ``checkpoint.pt`` (``payload`` plus the format tag) atomically."""
        data = dict(payload)
        data["format"] = CHECKPOINT_FORMAT
        self.write_bytes(self.checkpoint_path, lambda fh: torch.save(data, fh))

    def save_flow(self, flow, cgsystem, **extra) -> None:
        """Write ``flow.pt`` (the flow and its system; see :func:`openmm_cgflow.model_io.save_model`)."""
        from .model_io import save_model

        save_model(self.flow_path, flow, cgsystem, **extra)

    def snapshot_pmf(self, iteration: int) -> str:
        """Copy the current ``pmf.pt`` to ``pmfs/pmf_NNN.pt`` (atomically); returns the snapshot's path."""
        dst = self.snapshot_path(iteration)
        with open(self.pmf_path, "rb") as src:
            self.write_bytes(dst, lambda fh: shutil.copyfileobj(src, fh))
        return dst

    def write_iterations(self, records) -> None:
        """Rewrite ``iterations.jsonl`` with one JSON object per record (atomically)."""
        with atomic_write(self.iterations_path, "w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")

    # ------------------------------------------------------------------ reads
    def has_checkpoint(self) -> bool:
        return os.path.exists(self.checkpoint_path)

    def load_checkpoint(self) -> dict:
        """The checkpoint's payload; FileNotFoundError if there is none, ValueError if it is unreadable."""
        path = self.checkpoint_path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(f"checkpoint {path} is unreadable (corrupt?): {exc}") from exc
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an openmm-cgflow checkpoint")
        return ck

    def read_iterations(self) -> list[dict]:
        """The records of ``iterations.jsonl`` (empty if there is none yet)."""
        if not os.path.exists(self.iterations_path):
            return []
        with open(self.iterations_path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
