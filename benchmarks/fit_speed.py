"""Ensemble fit speed: the written-out backward pass of ``fit_ensemble`` against autograd, side by side.

``fit_ensemble`` trains its stacked networks with a written-out backward pass on one flat parameter
(``openmm_cgflow.ensemble_fit._FlatStackedTraining``). :class:`AutogradTraining` here is the same fit with autograd
differentiating ``PMFEnsemble.networks`` on the ensemble's own parameters, the way the fit ran before; both give
the same ensemble bit for bit (tests/test_ensemble.py uses this class). Interleaved rounds, one process, each fit
timed end to end; reported per size: seconds per fit (min and median), the ratio, and whether the two ensembles
are equal.

    python benchmarks/fit_speed.py                      # ~1 min, torch with one thread
    python benchmarks/fit_speed.py --threads 2 --rounds 5 --json benchmarks/data/fit_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from unittest import mock

import numpy as np
import torch

from openmm_cgflow import ensemble_fit
from openmm_cgflow.ensemble_fit import fit_ensemble

#: (name, labels, periodic, fit keywords): Mueller-Brown's fit (1-D, 10 x [32, 32], 2,500 steps) and alanine
#: dipeptide's loop fit (2 dihedrals, 10 x [64, 64], 3,000 steps of <= 512 labels).
SIZES = [("mueller-brown", 150, [False], dict(n_models=10, hidden=(32, 32), steps=2500)),
         ("alanine-dipeptide", 800, [True, True], dict(n_models=10, hidden=(64, 64), steps=3000))]


class AutogradTraining(ensemble_fit._FlatStackedTraining):
    """The fit through autograd: the ensemble's own parameters take the flat parameter's values, autograd
    differentiates ``PMFEnsemble.networks``, and the gradients are copied into the flat gradient."""

    def __init__(self, ens):
        super().__init__(ens)
        self.ens = ens

    def backward(self, x, loss_grad):
        values = [t for pair in zip(self.weights, self.biases) for t in pair]
        grads = [t for pair in zip(self.weight_grads, self.bias_grads) for t in pair]
        params = [t for layer in self.ens.layers for t in (layer.weight, layer.bias)]
        with torch.no_grad():
            for param, value in zip(params, values):
                param.copy_(value)
                param.grad = None
        pred = self.ens.networks(x)
        pred.backward(loss_grad(pred.detach()))
        with torch.no_grad():
            for param, g in zip(params, grads):
                g.copy_(param.grad)


def fit_through(path: str, s, A, se, periodic, kw):
    """One fit by ``path`` ("written" or "autograd"); returns (seconds, ensemble)."""
    training = ensemble_fit._FlatStackedTraining if path == "written" else AutogradTraining
    with mock.patch.object(ensemble_fit, "_FlatStackedTraining", training):
        t = time.perf_counter()
        ens = fit_ensemble(s, A, se, periodic, seed=1, **kw)
        return time.perf_counter() - t, ens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    out = {"threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "sizes": {}}
    for name, m, periodic, kw in SIZES:
        s = rng.uniform(-3.0, 3.0, (m, len(periodic)))
        A = 2.0 * np.sin(s).sum(axis=1) + 0.2 * rng.standard_normal(m)
        se = rng.uniform(0.02, 0.2, m)
        fit_through("written", s[:40], A[:40], se[:40], periodic, dict(kw, steps=50))  # warm-up
        times = {"written": [], "autograd": []}
        ens = {}
        for _ in range(args.rounds):
            for path in ("autograd", "written"):
                dt, ens[path] = fit_through(path, s, A, se, periodic, kw)
                times[path].append(dt)
        x = torch.as_tensor(s)
        with torch.no_grad():
            equal = bool(torch.equal(ens["written"].predict_all(x), ens["autograd"].predict_all(x)))
        row = {"labels": m, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
               "autograd_s": [round(t, 3) for t in times["autograd"]], "written_s": [round(t, 3) for t in times["written"]],
               "ratio_median": round(statistics.median(times["written"]) / statistics.median(times["autograd"]), 3),
               "equal": equal}
        out["sizes"][name] = row
        print(f"{name}: {m} labels, {kw['steps']} steps; autograd {min(times['autograd']):.2f} s "
              f"(median {statistics.median(times['autograd']):.2f}), written {min(times['written']):.2f} s "
              f"(median {statistics.median(times['written']):.2f}); ratio {row['ratio_median']:.2f}; "
              f"same ensemble: {equal}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
