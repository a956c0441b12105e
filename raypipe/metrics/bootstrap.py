"""Stratified, patient-level bootstrap: resample weights drawn once, shared by every metric.

A resample is a row of integer multiplicities (how often each study is drawn). Patients are drawn
with replacement inside their stratum (e.g. label or event), and every study of a drawn patient
comes with it, so correlated studies of one patient never split across a resample. Drawing the
whole weight matrix at once lets rank- and count-based metrics be computed for all resamples with
array operations instead of a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from raypipe.metrics._checks import as_groups, check_level

# Elements of one weight-matrix chunk (resamples x studies); about 32 MB of int64.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class MetricCI:
    """A point estimate with its confidence interval, as written to metrics.json."""

    value: float
    ci_low: float
    ci_high: float
    level: float = 0.95
    method: str = "bootstrap"

    def to_dict(self) -> dict[str, float | None]:
        """The metrics.json entry `{"value", "ci_low", "ci_high"}`; NaN becomes null."""
        return {k: _json_float(getattr(self, k)) for k in ("value", "ci_low", "ci_high")}


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def unit_counts(
    strata: ArrayLike, n_boot: int = 1000, seed: int = 0, groups: ArrayLike | None = None
) -> tuple[NDArray[np.int64], Iterator[NDArray[np.int64]]]:
    """Stratified draws of sampling units (patients, or studies without `groups`), as counts.

    Returns `unit_of_study` (n,) and an iterator of (n_units, chunk) count matrices, one column per
    resample. Units are numbered stratum by stratum, so each stratum's draws are one
    `integers(lo, hi)` call and one `bincount`, with no gathers; column-major counts feed sparse
    products directly. A patient's stratum is its largest study stratum (any positive study).
    """
    strata_arr = np.asarray(strata).astype(np.int64).ravel()
    n = strata_arr.shape[0]
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    codes = as_groups(groups, n)
    if codes is None:
        codes = np.arange(n, dtype=np.int64)
    n_units = int(codes.max()) + 1
    per_unit = np.full(n_units, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(per_unit, codes, strata_arr)
    order = np.argsort(per_unit, kind="stable")
    rank = np.empty(n_units, dtype=np.int64)
    rank[order] = np.arange(n_units)
    bounds = np.flatnonzero(np.r_[True, np.diff(per_unit[order]) != 0, True])

    def chunks() -> Iterator[NDArray[np.int64]]:
        rng = np.random.default_rng(seed)
        step = max(1, min(n_boot, _CHUNK_ELEMENTS // max(n, n_units)))
        for start in range(0, n_boot, step):
            b = min(step, n_boot - start)
            counts = np.empty((n_units, b), dtype=np.int64)
            column = np.arange(b, dtype=np.int64)[:, None]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                drawn = rng.integers(0, hi - lo, size=(b, hi - lo))
                drawn *= b
                drawn += column
                counts[lo:hi] = np.bincount(drawn.ravel(), minlength=(hi - lo) * b).reshape(hi - lo, b)
            yield counts

    return rank[codes], chunks()


def bootstrap_weights(
    strata: ArrayLike, n_boot: int = 1000, seed: int = 0, groups: ArrayLike | None = None
) -> Iterator[NDArray[np.int64]]:
    """Yield (chunk, n) matrices of study multiplicities, stratified and patient-level (see `unit_counts`).

    `strata` holds one integer per study (e.g. the label); with `groups` (patient ids) whole
    patients are resampled, stratified by their largest study stratum. Chunks keep memory bounded
    (about 4e6 weights each); the draws are deterministic given `seed` and the data.
    """
    unit_of_study, chunks = unit_counts(strata, n_boot, seed, groups)
    for counts in chunks:
        yield counts[unit_of_study].T


def bootstrap_indices(
    strata: ArrayLike, n_boot: int = 1000, seed: int = 0, groups: ArrayLike | None = None
) -> Iterator[NDArray[np.int64]]:
    """Yield one index array per resample, for statistics that cannot take weights."""
    for chunk in bootstrap_weights(strata, n_boot, seed, groups):
        positions = np.arange(chunk.shape[1])
        for row in chunk:
            yield np.repeat(positions, row)


def percentile_ci(value: float, replicates: ArrayLike, level: float = 0.95) -> MetricCI:
    """Percentile interval of bootstrap replicates around the full-sample estimate (NaN resamples dropped)."""
    level = check_level(level)
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return MetricCI(float(value), math.nan, math.nan, level)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return MetricCI(float(value), float(lo), float(hi), level)


def bootstrap_replicates(
    statistic: Callable[..., float | ArrayLike],
    arrays: Sequence[ArrayLike],
    strata: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Replicates (n_boot, k) of a scalar or vector `statistic(*arrays)` by a loop over resamples.

    For metrics that cannot take weights (e.g. IPCW estimators). A resample where the statistic
    raises ValueError (e.g. no comparable pairs) gives NaN.
    """
    arrs = [np.asarray(a) for a in arrays]
    rows: list[NDArray[np.float64]] = []
    width = None
    for idx in bootstrap_indices(strata, n_boot, seed, groups):
        try:
            row = np.atleast_1d(np.asarray(statistic(*(a[idx] for a in arrs)), dtype=np.float64))
            width = row.size
        except ValueError:
            row = np.array([])
        rows.append(row)
    width = width or 1
    return np.vstack([r if r.size == width else np.full(width, math.nan) for r in rows])


def bootstrap_ci(
    statistic: Callable[..., float],
    arrays: Sequence[ArrayLike],
    strata: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
    level: float = 0.95,
) -> MetricCI:
    """Percentile CI of a scalar `statistic(*arrays)`: full-sample value, resampled by `bootstrap_replicates`."""
    value = float(statistic(*(np.asarray(a) for a in arrays)))
    return percentile_ci(value, bootstrap_replicates(statistic, arrays, strata, n_boot, seed, groups)[:, 0], level)


def normal_p_value(observed: float, replicates: ArrayLike) -> float | None:
    """Two-sided p-value of `observed` with the SD of its bootstrap replicates as SE (normal reference)."""
    from scipy import stats

    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if not math.isfinite(observed) or reps.size < 2:
        return None
    se = float(reps.std(ddof=1))
    if se == 0:
        return 1.0 if observed == 0 else 0.0
    return float(2 * stats.norm.sf(abs(observed) / se))


def paired_bootstrap_p(diff: Callable[[NDArray[np.int64]], float], strata: ArrayLike, groups: ArrayLike | None,
                       n_boot: int = 1000, seed: int = 0) -> float | None:
    """p-value of a paired difference `diff(index)` of two models on the same rows, resampled by patient."""
    index = np.arange(len(np.asarray(strata)))
    reps = bootstrap_replicates(diff, (index,), strata, n_boot, seed, groups)
    return normal_p_value(float(diff(index)), reps[:, 0])
