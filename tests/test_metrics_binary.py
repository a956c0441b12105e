"""Binary metrics against sklearn, an O(n^2) DeLong reference and bootstrap replicates.

Real data: scikit-learn's bundled Wisconsin breast-cancer set, scored by two logistic models on
different feature subsets (correlated scores on the same patients, as in a model comparison).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from raypipe.metrics import (
    auroc,
    auroc_bootstrap,
    auroc_ci,
    auroc_delong_ci,
    binary_metrics,
    binary_metrics_ci,
    binary_summary,
    bootstrap_weights,
    delong_covariance,
    delong_test,
    metric_summary,
    to_json_dict,
    youden_threshold,
)


@pytest.fixture(scope="module")
def two_models() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two correlated, imperfect scores (3 vs 2 features) on a held-out set of 341 patients."""
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.6, random_state=0, stratify=y)
    cols_a, cols_b = [1, 4, 8], [1, 9]  # texture, smoothness, symmetry / fractal dimension
    a = LogisticRegression().fit(x_tr[:, cols_a], y_tr).decision_function(x_te[:, cols_a])
    b = LogisticRegression().fit(x_tr[:, cols_b], y_tr).decision_function(x_te[:, cols_b])
    return y_te, a, b


def _placements_quadratic(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """DeLong's structural components from the O(n^2) kernel psi (1 if pos > neg, 1/2 if tied)."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return float(psi.mean()), psi.mean(axis=1), psi.mean(axis=0)


def test_auroc_equals_sklearn(two_models):
    y, a, _ = two_models
    assert auroc(y, a) == pytest.approx(roc_auc_score(y, a), abs=1e-12)


@pytest.mark.parametrize("grouped", [False, True])
def test_vectorised_bootstrap_equals_sklearn_on_each_resample(grouped):
    rng = np.random.default_rng(1)
    n = 400
    y = rng.random(n) < 0.3
    score = np.round(y + rng.normal(size=n), 1)  # many tied scores
    groups = rng.integers(0, 150, n) if grouped else None
    reps = auroc_bootstrap(y, score, n_boot=25, seed=7, groups=groups)
    ref = []
    for w in bootstrap_weights(y, 25, 7, groups):
        for row in w:
            idx = np.repeat(np.arange(n), row)
            ref.append(roc_auc_score(y[idx], score[idx]))
    np.testing.assert_allclose(reps, ref, atol=1e-12)


def test_bootstrap_is_stratified_and_patient_level():
    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.2
    for w in bootstrap_weights(y, 10, 0):
        assert np.all(w[:, y].sum(axis=1) == y.sum()) and np.all(w[:, ~y].sum(axis=1) == (~y).sum())
    patient = rng.integers(0, 60, 300)
    for w in bootstrap_weights(y, 10, 0, groups=patient):
        for p in np.unique(patient):  # every study of a patient drawn the same number of times
            assert np.unique(w[:, patient == p], axis=1).shape[1] == 1


def test_auroc_ci_covers_estimate_and_is_seeded(two_models):
    y, a, _ = two_models
    r = auroc_ci(y, a, n_boot=500, seed=0)
    assert r.ci_low < r.value < r.ci_high
    assert r == auroc_ci(y, a, n_boot=500, seed=0)
    assert r.ci_low != auroc_ci(y, a, n_boot=500, seed=1).ci_low
    d = auroc_delong_ci(y, a)  # asymptotic and bootstrap intervals agree on 341 patients
    assert d.ci_low == pytest.approx(r.ci_low, abs=0.02) and d.ci_high == pytest.approx(r.ci_high, abs=0.02)


def test_delong_fast_equals_quadratic_placements(two_models):
    y, a, b = two_models
    b_tied = np.round(b, 1)  # exercise midranks
    aucs, cov = delong_covariance(y, np.vstack([a, b_tied]))
    comps = [_placements_quadratic(y, s) for s in (a, b_tied)]
    m, n = int(y.sum()), int((1 - y).sum())
    v10 = np.vstack([c[1] for c in comps])
    v01 = np.vstack([c[2] for c in comps])
    ref_cov = np.cov(v10) / m + np.cov(v01) / n
    np.testing.assert_allclose(aucs, [c[0] for c in comps], atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert aucs[1] == pytest.approx(roc_auc_score(y, b_tied), abs=1e-12)


def test_delong_agrees_with_bootstrap_of_difference(two_models):
    y, a, b = two_models
    res = delong_test(y, a, b)
    assert res.value == pytest.approx(res.auroc_a - res.auroc_b)
    reps = auroc_bootstrap(y, np.vstack([a, b]), n_boot=2000, seed=0)
    diff = reps[:, 0] - reps[:, 1]
    # standard errors agree within sampling error of a 2000-resample bootstrap (and DeLong's O(1/n) bias)
    assert diff.std(ddof=1) == pytest.approx(res.se, rel=0.15)
    lo, hi = np.quantile(diff, [0.025, 0.975])
    assert res.ci_low == pytest.approx(lo, abs=0.3 * res.se) and res.ci_high == pytest.approx(hi, abs=0.3 * res.se)
    p_boot = 2 * min((diff <= 0).mean(), (diff >= 0).mean())
    assert abs(res.p_value - p_boot) < 0.05
    assert 0 < res.p_value < 1


def test_delong_identical_scores():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    res = delong_test(y, s, s)
    assert res.value == 0 and res.p_value == 1.0


def test_binary_metrics_hand_example():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.5, 0.5])
    m = binary_metrics(y, s, 0.5)  # predicted positive: 0.9, 0.6, 0.7, 0.5, 0.5
    assert (m.tp, m.fp, m.tn, m.fn) == (3, 2, 2, 1)
    assert m.accuracy == pytest.approx(5 / 8) and m.sensitivity == pytest.approx(3 / 4)
    assert m.specificity == pytest.approx(2 / 4) and m.ppv == pytest.approx(3 / 5) and m.npv == pytest.approx(2 / 3)
    tn, fp, fn, tp = confusion_matrix(y, s >= 0.5).ravel()
    assert (m.tp, m.fp, m.tn, m.fn) == (tp, fp, tn, fn)
    assert np.isnan(binary_metrics(y, s, 2.0).ppv)  # nobody predicted positive


def test_youden_threshold_is_brute_force_optimum(two_models):
    y, a, _ = two_models
    t = youden_threshold(y, a)
    j = [binary_metrics(y, a, c).sensitivity + binary_metrics(y, a, c).specificity for c in np.unique(a)]
    best = binary_metrics(y, a, t)
    assert best.sensitivity + best.specificity == pytest.approx(max(j))


def test_binary_metrics_ci(two_models):
    y, a, _ = two_models
    t = youden_threshold(y, a)
    res = binary_metrics_ci(y, a, t, n_boot=300, seed=0)
    point = binary_metrics(y, a, t)
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv"):
        ci = getattr(res, name)
        assert ci.value == getattr(point, name)
        assert ci.ci_low <= ci.value <= ci.ci_high


def test_binary_summary_json(two_models):
    y, a, _ = two_models
    entry = metric_summary(binary_summary(y, a, n_boot=50))
    assert set(entry) == {"auroc", "accuracy", "sensitivity", "specificity", "ppv", "npv"}
    assert set(entry["auroc"]) == {"value", "ci_low", "ci_high"}
    json.dumps(entry)
    assert to_json_dict(delong_test(y, a, a + 1e-3 * np.arange(a.size)))["p_value"] is not None


@pytest.mark.parametrize(
    ("y", "score", "match"),
    [
        ([0, 1, 1], [0.1, 0.2], "score has length 2"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "score contains 1 NaN"),
        ([0, 2, 1], [0.1, 0.2, 0.3], "y must contain only 0/1"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "y must contain both classes"),
    ],
)
def test_invalid_input_names_the_argument(y, score, match):
    with pytest.raises(ValueError, match=match):
        auroc_ci(y, score, n_boot=10)
