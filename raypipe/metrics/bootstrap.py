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


def _patient_strata(
    strata: NDArray[np.int64], groups: NDArray[np.int64] | None
) -> tuple[NDArray[np.int64] | None, NDArray[np.int64]]:
    """Stratum per sampling unit: a patient's stratum is the largest of its studies' (any positive)."""
    if groups is None:
        return None, strata
    unit_strata = np.full(int(groups.max()) + 1, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(unit_strata, groups, strata)
    return groups, unit_strata


def bootstrap_weights(
    strata: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
    chunk_size: int | None = None,
) -> Iterator[NDArray[np.int64]]:
    """Yield (chunk, n) matrices of resample multiplicities; stratified and patient-level.

    `strata` holds one integer per study (e.g. the label); with `groups` (patient ids) whole
    patients are resampled, stratified by their largest study stratum. Chunks keep memory bounded
    (about 4e6 weights each); the sequence is deterministic given `seed` and the input size.
    """
    strata_arr = np.asarray(strata).astype(np.int64).ravel()
    n = strata_arr.shape[0]
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    codes, unit_strata = _patient_strata(strata_arr, as_groups(groups, n))
    n_units = unit_strata.shape[0]
    members = [np.flatnonzero(unit_strata == s) for s in np.unique(unit_strata)]
    rng = np.random.default_rng(seed)
    step = chunk_size or max(1, min(n_boot, _CHUNK_ELEMENTS // max(n, n_units)))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        drawn = np.concatenate([m[rng.integers(0, m.size, size=(b, m.size))] for m in members], axis=1)
        drawn += (np.arange(b, dtype=np.int64) * n_units)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=b * n_units).reshape(b, n_units)
        yield counts if codes is None else counts[:, codes]


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
