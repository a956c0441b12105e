"""Binary-outcome metrics: AUROC with bootstrap CIs, DeLong's test, metrics at a threshold.

Scores are "higher = more likely positive". Bootstrap CIs are percentile intervals of a
stratified (by label), optionally patient-level (`groups`) bootstrap; see `bootstrap.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import sparse, stats
from sklearn.metrics import roc_auc_score, roc_curve

from raypipe.metrics._checks import as_1d, as_labels, check_level
from raypipe.metrics.bootstrap import MetricCI, bootstrap_weights, percentile_ci, unit_counts


def auroc(y: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve (sklearn), after raypipe's input checks."""
    labels = as_labels(y)
    return float(roc_auc_score(labels, as_1d(score, "score", labels.size)))


def auroc_or_nan(y: ArrayLike, score: ArrayLike) -> float:
    """AUROC over the rows with a known label and a finite score; NaN when a class is missing (epoch monitors)."""
    y, score = np.asarray(y, dtype=np.float64), np.asarray(score, dtype=np.float64)
    keep = np.isfinite(y) & np.isfinite(score)
    if keep.sum() < 2 or len(np.unique(y[keep])) < 2:
        return float("nan")
    return auroc(y[keep].astype(int), score[keep])


def _auroc_design(
    labels: NDArray[np.bool_], score: NDArray[np.float64], unit: NDArray[np.int64], n_units: int
) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """Sparse maps from resampled unit counts to the sums a tie-aware Mann-Whitney AUROC needs.

    With u the sorted distinct positive scores, P[k] is the weight of positives at u[k] and Q[m]
    counts each negative twice: at m = #{u <= s} and at m = #{u < s}. For cumP[m] = sum_{k<m} P[k],
    pairs ranked right = totP * totN - 0.5 * sum_m Q[m] cumP[m] (ties count one half).
    All integer, so every resample's AUROC is exact up to the final division.
    """
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    u = np.unique(score[pos])
    k = np.searchsorted(u, score[pos])
    ones = np.ones(pos.size, dtype=np.int64)
    p_map = sparse.csr_matrix((ones, (k, unit[pos])), shape=(u.size, n_units))
    slots = np.concatenate([np.searchsorted(u, score[neg], "right"), np.searchsorted(u, score[neg], "left")])
    q_map = sparse.csr_matrix(
        (np.ones(slots.size, dtype=np.int64), (slots, np.tile(unit[neg], 2))), shape=(u.size + 1, n_units)
    )
    return p_map, q_map


def _auroc_from_counts(counts: NDArray[np.int64], design: tuple[sparse.csr_matrix, sparse.csr_matrix]) -> NDArray[np.float64]:
    """AUROC of every resample (column of unit `counts`) at once: two sparse products and a cumsum."""
    p_map, q_map = design
    p = p_map @ counts  # (K, b) positive weight per distinct positive score
    q = q_map @ counts  # (K + 1, b)
    cum_p = np.zeros_like(q)
    np.cumsum(p, axis=0, out=cum_p[1:])
    pairs = p.sum(axis=0) * (q.sum(axis=0) // 2)
    with np.errstate(invalid="ignore", divide="ignore"):  # a patient-level resample without negatives: NaN
        return (pairs - 0.5 * np.einsum("ij,ij->j", q, cum_p)) / pairs


def auroc_bootstrap(
    y: ArrayLike, scores: ArrayLike, n_boot: int = 1000, seed: int = 0, groups: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Bootstrap AUROC replicates, (n_boot,) for one score or (n_boot, k) for k scores on shared resamples.

    Vectorised: patient counts for a chunk of resamples are drawn at once and mapped to AUROCs by
    sparse products, O(n) per resample with no sorting, so 1e5 patients x 1000 resamples take seconds.
    Resamples are the same as those of `bootstrap_weights(y, n_boot, seed, groups)`.
    """
    labels = as_labels(y)
    score_arr = np.asarray(scores, dtype=np.float64)
    single = score_arr.ndim == 1
    score_mat = np.atleast_2d(score_arr)
    if score_mat.ndim != 2 or score_mat.shape[1] != labels.size:
        raise ValueError(f"scores must have length {labels.size} (or shape (k, {labels.size})), got {score_arr.shape}")
    if not np.all(np.isfinite(score_mat)):
        raise ValueError("scores contains NaN or infinite values")
    unit, chunks = unit_counts(labels, n_boot, seed, groups)
    n_units = int(unit.max()) + 1
    designs = [_auroc_design(labels, s, unit, n_units) for s in score_mat]
    out = np.empty((n_boot, len(designs)))
    row = 0
    for counts in chunks:
        for k, design in enumerate(designs):
            out[row : row + counts.shape[1], k] = _auroc_from_counts(counts, design)
        row += counts.shape[1]
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
