"""Binary-outcome metrics: AUROC with bootstrap CIs, DeLong's test, metrics at a threshold.

Scores are "higher = more likely positive". Bootstrap CIs are percentile intervals of a
stratified (by label), optionally patient-level (`groups`) bootstrap; see `bootstrap.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from raypipe.metrics._checks import as_1d, as_labels, check_level
from raypipe.metrics.bootstrap import MetricCI, bootstrap_weights, percentile_ci


def auroc(y: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve (sklearn), after raypipe's input checks."""
    labels = as_labels(y)
    return float(roc_auc_score(labels, as_1d(score, "score", labels.size)))


def _weighted_auroc(weights: NDArray[np.int64], y_sorted: NDArray[np.bool_], starts: NDArray[np.intp]) -> NDArray[np.float64]:
    """AUROC of every resample row at once (Mann-Whitney with midranks for tied scores).

    `weights` are multiplicities in ascending-score order; `starts` index the first element of
    each block of tied scores. Per block: positives x (negatives strictly below + half the tied ones).
    """
    pos = np.add.reduceat(weights * y_sorted, starts, axis=1).astype(np.float64)
    neg = np.add.reduceat(weights * ~y_sorted, starts, axis=1).astype(np.float64)
    neg_below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    return (pos * (neg_below + 0.5 * neg)).sum(axis=1) / pairs


def auroc_bootstrap(
    y: ArrayLike, scores: ArrayLike, n_boot: int = 1000, seed: int = 0, groups: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Bootstrap AUROC replicates, (n_boot,) for one score or (n_boot, k) for k scores on shared resamples.

    Vectorised: weights for all resamples are drawn in chunks and each chunk's AUROCs come from one
    rank-based formula, so 1e5 patients x 1000 resamples take seconds.
    """
    labels = as_labels(y)
    score_arr = np.asarray(scores, dtype=np.float64)
    single = score_arr.ndim == 1
    score_mat = np.atleast_2d(score_arr)
    if score_mat.shape[1] != labels.size:
        raise ValueError(f"scores has length {score_mat.shape[1]}, expected {labels.size}")
    if not np.all(np.isfinite(score_mat)):
        raise ValueError("scores contains NaN or infinite values")
    orders, sorted_labels, block_starts = [], [], []
    for s in score_mat:
        order = np.argsort(s, kind="mergesort")
        s_sorted = s[order]
        orders.append(order)
        sorted_labels.append(labels[order])
        block_starts.append(np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]]))
    out = np.empty((n_boot, score_mat.shape[0]))
    row = 0
    for w in bootstrap_weights(labels, n_boot, seed, groups):
        for k in range(score_mat.shape[0]):
            out[row : row + w.shape[0], k] = _weighted_auroc(w[:, orders[k]], sorted_labels[k], block_starts[k])
        row += w.shape[0]
    return out[:, 0] if single else out


def auroc_ci(
    y: ArrayLike,
    score: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    groups: ArrayLike | None = None,
    level: float = 0.95,
) -> MetricCI:
    """AUROC with a stratified (patient-level when `groups` is given) percentile bootstrap CI."""
    value = auroc(y, score)
    return percentile_ci(value, auroc_bootstrap(y, score, n_boot, seed, groups), level)


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of two correlated AUROCs; `value` is AUROC(a) - AUROC(b)."""

    auroc_a: float
    auroc_b: float
    value: float
    ci_low: float
    ci_high: float
    se: float
    z: float
    p_value: float
    level: float = 0.95


def _delong_placements(
    y: NDArray[np.bool_], score_mat: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """AUROCs and placement values (V10 for positives, V01 for negatives) by Sun & Xu's midranks.

    For k scores the cost is O(k n log n): midranks within positives (tx), within negatives (ty)
    and over all (tz) give V10_i = (tz_i - tx_i)/n_neg and V01_j = 1 - (tz_j - ty_j)/n_pos.
    """
    pos, neg = score_mat[:, y], score_mat[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def delong_covariance(y: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """AUROCs of k scores and their k x k DeLong (1988) covariance matrix."""
    labels = as_labels(y)
    score_mat = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    for k, s in enumerate(score_mat):
        as_1d(s, f"scores[{k}]", labels.size)
    aucs, v10, v01 = _delong_placements(labels, score_mat)
    m, n = v10.shape[1], v01.shape[1]
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(y: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, level: float = 0.95) -> DeLongResult:
    """Compare two AUROCs on the same studies (DeLong 1988, fast midrank algorithm of Sun & Xu 2014).

    Studies are assumed independent; for several studies per patient prefer a patient-level
    bootstrap of the difference (`auroc_bootstrap` with `groups`).
    """
    level = check_level(level)
    labels = as_labels(y)
    a = as_1d(score_a, "score_a", labels.size)
    b = as_1d(score_b, "score_b", labels.size)
    aucs, cov = delong_covariance(labels, np.vstack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    crit = float(stats.norm.ppf((1 + level) / 2))
    if se > 0:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    else:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, diff - crit * se, diff + crit * se, se, z, p, level)


def auroc_delong_ci(y: ArrayLike, score: ArrayLike, level: float = 0.95) -> MetricCI:
    """AUROC with DeLong's asymptotic CI: a fast alternative to the bootstrap for large cohorts."""
    level = check_level(level)
    aucs, cov = delong_covariance(y, score)
    se = math.sqrt(max(float(cov[0, 0]), 0.0))
    crit = float(stats.norm.ppf((1 + level) / 2))
    value = float(aucs[0])
    return MetricCI(value, max(0.0, value - crit * se), min(1.0, value + crit * se), level, "delong")


@dataclass(frozen=True)
class BinaryMetrics:
    """Confusion-matrix metrics at one threshold (score >= threshold is predicted positive)."""

    threshold: float
    accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    tp: int
    fp: int
    tn: int
    fn: int


def _ratio(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _confusion_rates(w: NDArray[np.float64], y: NDArray[np.bool_], pred: NDArray[np.bool_]) -> dict[str, NDArray[np.float64]]:
    """Weighted confusion counts for every row of `w`, turned into the five rates."""
    tp, fp = w @ (y & pred), w @ (~y & pred)
    tn, fn = w @ (~y & ~pred), w @ (y & ~pred)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def binary_metrics(y: ArrayLike, score: ArrayLike, threshold: float) -> BinaryMetrics:
    """Accuracy, sensitivity, specificity, PPV and NPV at a fixed threshold (NaN where undefined)."""
    labels = as_labels(y)
    pred = as_1d(score, "score", labels.size) >= threshold
    rates = _confusion_rates(np.ones((1, labels.size)), labels, pred)
    counts = [int(np.sum(labels & pred)), int(np.sum(~labels & pred)), int(np.sum(~labels & ~pred)), int(np.sum(labels & ~pred))]
    return BinaryMetrics(float(threshold), *(float(rates[k][0]) for k in rates), *counts)


def youden_threshold(y: ArrayLike, score: ArrayLike) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (highest such threshold on ties)."""
    labels = as_labels(y)
    fpr, tpr, thresholds = roc_curve(labels, as_1d(score, "score", labels.size))
    finite = np.isfinite(thresholds)
    j = np.where(finite, tpr - fpr, -np.inf)
    return float(thresholds[int(np.argmax(j))])


@dataclass(frozen=True)
class BinaryMetricsCI:
    """Threshold metrics with stratified bootstrap CIs; the threshold is held fixed across resamples."""

    threshold: float
    accuracy: MetricCI
    sensitivity: MetricCI
    specificity: MetricCI
    ppv: MetricCI
    npv: MetricCI


def binary_metrics_ci(
    y: ArrayLike,
    score: ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    groups: ArrayLike | None = None,
    level: float = 0.95,
) -> BinaryMetricsCI:
    """`binary_metrics` with percentile CIs from a vectorised stratified (patient-level) bootstrap."""
    point = binary_metrics(y, score, threshold)
    labels = as_labels(y)
    pred = as_1d(score, "score", labels.size) >= threshold
    names = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
    reps: dict[str, list[NDArray[np.float64]]] = {k: [] for k in names}
    for w in bootstrap_weights(labels, n_boot, seed, groups):
        for k, v in _confusion_rates(w.astype(np.float64), labels, pred).items():
            reps[k].append(v)
    cis = {k: percentile_ci(getattr(point, k), np.concatenate(reps[k]), level) for k in names}
    return BinaryMetricsCI(float(threshold), **cis)
