"""The label store of an active-learning run: merging an iteration's labels, replacing relabelled ones, and
choosing the populated points a polish labels again (openmm_cgflow.labelling)."""

import numpy as np
import pytest

from openmm_cgflow.free_energy import FreeEnergyLabels
from openmm_cgflow.labelling import merge_labels, populated_labels, relabel_ess_ratio, replace_labels


def _labels(s, A, stderr, ess, n_samples=100):
    s = np.asarray(s, dtype=np.float64).reshape(len(A), -1)
    m = len(A)
    return FreeEnergyLabels(s=s, A=np.asarray(A, float), stderr=np.asarray(stderr, float),
                            ess=np.asarray(ess, float) * n_samples, n_samples=n_samples,
                            n_wrong_chirality=np.zeros(m, int), n_nonfinite=np.zeros(m, int),
                            n_evaluations=m * n_samples)


def _store(A):
    m = len(A)
    return {"A": np.asarray(A, float), "stderr": np.full(m, 0.1), "ess": np.full(m, 0.5), "iteration": np.zeros(m)}


def test_replace_labels_replaces_only_finite_new_labels():
    store = _store([1.0, 2.0, 3.0, 4.0])
    again = _labels([0.0, 0.0, 0.0], [10.0, np.inf, 30.0], [0.2, 0.2, np.nan], [0.9, 0.9, 0.9])
    n = replace_labels(store, np.array([3, 1, 0]), again, iteration=7)
    assert n == 1  # only the first new label is finite in both A and stderr
    np.testing.assert_array_equal(store["A"], [1.0, 2.0, 3.0, 10.0])
    np.testing.assert_array_equal(store["stderr"], [0.1, 0.1, 0.1, 0.2])
    np.testing.assert_allclose(store["ess"], [0.5, 0.5, 0.5, 0.9])
    np.testing.assert_array_equal(store["iteration"], [0, 0, 0, 7])


def test_replace_labels_refuses_a_length_mismatch():
    store = _store([1.0, 2.0])
    with pytest.raises(ValueError, match="2 new labels for 1 label indices"):
        replace_labels(store, np.array([0]), _labels([0.0, 0.0], [1.0, 1.0], [0.1, 0.1], [0.5, 0.5]), 1)
    np.testing.assert_array_equal(store["A"], [1.0, 2.0])  # nothing changed


def test_merge_labels_appends_new_and_replaces_replayed():
    store = _store([1.0, 2.0])
    label_s = np.array([[0.1], [0.2]])
    new = _labels([[0.3], [0.4], [0.5]], [5.0, np.nan, 6.0], [0.3, 0.3, 0.3], [0.4, 0.4, 0.4])
    again = _labels([[0.2]], [2.5], [0.05], [0.8])
    label_s, n_relabelled, good = merge_labels(store, label_s, np.array([1]), new, again, iteration=2)
    assert n_relabelled == 1
    np.testing.assert_array_equal(good, [True, False, True])
    np.testing.assert_array_equal(label_s[:, 0], [0.1, 0.2, 0.3, 0.5])
    np.testing.assert_array_equal(store["A"], [1.0, 2.5, 5.0, 6.0])
    np.testing.assert_array_equal(store["iteration"], [0, 2, 2, 2])
    # keep_old: the replayed label stays, the new ones are still appended
    store2 = _store([1.0, 2.0])
    merge_labels(store2, np.array([[0.1], [0.2]]), np.array([1]), new, again, iteration=2, keep_old=True)
    np.testing.assert_array_equal(store2["A"], [1.0, 2.0, 5.0, 6.0])


def test_populated_labels_window_cap_and_order():
    A = np.array([3.0, 0.5, 9.0, np.nan, 2.0, 6.4, np.inf, 1.0])
    # within 6 kT of the minimum 0.5, lowest first; NaN and inf never chosen
    np.testing.assert_array_equal(populated_labels(A, 6.0, 100), [1, 7, 4, 0, 5])
    np.testing.assert_array_equal(populated_labels(A, 6.0, 2), [1, 7])
    np.testing.assert_array_equal(populated_labels(A, 0.1, 100), [1])
    assert len(populated_labels(np.array([np.nan, np.inf]), 6.0, 10)) == 0
    assert len(populated_labels(np.zeros(0), 6.0, 10)) == 0


def test_relabel_ess_ratio_is_the_median_ratio():
    old = np.full(9, 0.1)
    again = _labels(np.zeros(9), np.zeros(9), np.zeros(9), [0.05, 0.1, 0.2, 0.3, 0.2, 0.2, 0.2, 0.05, 0.05])
    assert relabel_ess_ratio(old, again) == pytest.approx(2.0)
    assert relabel_ess_ratio(old[:3], _labels(np.zeros(3), np.zeros(3), np.zeros(3), [0.0, 0.0, 0.0])) == 1.0
