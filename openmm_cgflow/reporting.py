"""Reporters of an active-learning run, in the manner of OpenMM's reporters.

After every finished iteration (the checkpoint already written) :class:`~openmm_cgflow.learner.PMFLearner`
calls ``reporter.report(learner, record)`` on each of its reporters, in order; ``reporter.close()`` is
called when the learner closes (a reporter must accept further reports after it, as the default ones
do, since a learner can be used again). ``record`` is the iteration's dict (the line of
``iterations.jsonl``: iteration, energy_evaluations, cg_points, max_spread_kT, wall_s, kld when a
reference is given, ...); ``learner.history`` holds all records so far. ``wall_s`` (s) is the learner's own
time: the reporters' time and the reference KLD are not counted in it.

Default reporters: :class:`PlotReporter` (PNG plots) and :class:`ConsoleReporter` (one line per
iteration); add your own with ``PMFLearner(..., reporters=[...])``. The run directory's own
``iterations.jsonl`` is written when an iteration commits (:meth:`RunDirectory.commit_iteration
<openmm_cgflow.run_directory.RunDirectory.commit_iteration>`), before the reporters are called;
:class:`JsonlReporter` writes the same records into another run directory object.

A number that is not finite (e.g. an infinite KLD) is recorded as None with a flag
``"<key>_nonfinite": "inf"``, so every record is strict JSON.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Reporter", "ConsoleReporter", "JsonlReporter", "PlotReporter", "format_record"]

#: Importance samples per plot of a PMF with d >= 4 CG coordinates (plus half as many uniform pilot points).
IMPORTANCE_SAMPLES = 100_000


class Reporter:
    """The reporter protocol (subclassing it is optional: any object with these two methods will do)."""

    def report(self, learner, record: dict) -> None:
        """Called once per finished iteration."""

    def close(self) -> None:
        """Called when the learner closes."""


def format_record(r: dict) -> str:
    """One line summarising an iteration record (energies in kT, wall time in s)."""
    parts = [f"iteration {r['iteration']}", f"evals {r['energy_evaluations']:,}", f"points {r['cg_points']}",
             f"max spread {r['max_spread_kT']:.3f} kT", f"mean spread {r['mean_spread_kT']:.3f} kT",
             f"mean ESS/N {r['mean_ess']:.3f}", f"uncertain {r.get('uncertain_found', 0)}", f"wall {r['wall_s']:.0f} s"]
    if r.get("kld") is not None:
        parts.append(f"KLD {r['kld']:.2e}")
    elif "kld" in r:
        parts.append(f"KLD {r.get('kld_nonfinite', 'n/a')}")
    return " | ".join(parts)


class ConsoleReporter(Reporter):
    """Prints :func:`format_record` of every iteration to ``file`` (default: stdout)."""

    def __init__(self, file=None):
        self.file = file

    def report(self, learner, record: dict) -> None:
        print(format_record(record), file=self.file, flush=True)


class JsonlReporter(Reporter):
    """Rewrites ``iterations.jsonl`` of ``run_directory`` (a :class:`~openmm_cgflow.run_directory.RunDirectory`)
    with ``learner.history`` (atomically, strict JSON)."""

    def __init__(self, run_directory):
        self.run_directory = run_directory

    def report(self, learner, record: dict) -> None:
        self.run_directory.write_iterations(learner.history)


class PlotReporter(Reporter):
    """PNG plots under ``plots/``: the PMF mean and spread of every iteration with the new centres
    (``pmf_NNN.png``, :func:`openmm_cgflow_plugin.plot_pmf`; for more than two CG coordinates the 2-D
    marginals of consecutive pairs, :func:`openmm_cgflow_plugin.plot_marginals`, by quadrature for d = 3 and
    from :data:`IMPORTANCE_SAMPLES` importance samples of exp(-A) for d >= 4) and, when records carry a KLD, the
    KLD against energy evaluations (``kld.png``). A failed plot prints a warning and never ends a run."""

    def __init__(self, run_directory):
        self.run_directory = run_directory

    def report(self, learner, record: dict) -> None:
        try:
            from openmm_cgflow_plugin import plot_marginals, plot_pmf

            k = record["iteration"]
            centres = record.get("new_centres")
            path = self.run_directory.plot_path(f"pmf_{k:03d}.png")
            title = f"iteration {k}: {len(learner.label_s)} labelled CG points"
            if learner.cgsystem.n_cg <= 2:
                plot_pmf(self.run_directory.pmf_path, path, points=None if centres is None else np.asarray(centres),
                         threshold=learner.settings.threshold_kT, title=title)
            else:  # one panel per (phi, psi)-like pair: 2-D marginals, coarse enough for every iteration
                method = "importance" if learner.cgsystem.n_cg >= 4 else "auto"  # quadrature for d = 3
                plot_marginals(self.run_directory.pmf_path, path, n_grid=40, method=method, n_quadrature=6,
                               n_samples=IMPORTANCE_SAMPLES, points=None if centres is None else np.asarray(centres),
                               title=title)
            if any(r.get("kld") is not None for r in learner.history):
                self.plot_kld(learner.history)
        except Exception as exc:  # a plot must never end a run
            print(f"warning: plotting failed: {exc}")

    def plot_kld(self, history) -> None:
        """``plots/kld.png``: forward KLD to the reference against energy evaluations (log-log)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        ev = [r["energy_evaluations"] for r in history if r.get("kld") is not None]
        kl = [r["kld"] for r in history if r.get("kld") is not None]
        fig = Figure(figsize=(4.5, 3.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.loglog(ev, kl, "o-")
        ax.set_xlabel("energy evaluations")
        ax.set_ylabel("forward KLD to reference")
        fig.tight_layout()
        self.run_directory.write_bytes(self.run_directory.plot_path("kld.png"),
                                       lambda fh: fig.savefig(fh, format="png", dpi=120))
