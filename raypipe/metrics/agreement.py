"""Agreement between two measurements of the same quantity (e.g. pVF score on real vs generated images)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from raypipe.metrics._checks import as_1d, check_level


@dataclass(frozen=True)
class BlandAltman:
    """Mean difference (a - b) and the limits of agreement mean +/- z * SD of the differences."""

    mean_difference: float
    sd_difference: float
    loa_low: float
    loa_high: float
    n: int
    level: float = 0.95


def bland_altman(a: ArrayLike, b: ArrayLike, level: float = 0.95) -> BlandAltman:
    """Bland-Altman bias and limits of agreement (1.96 SD at 95%; SD with n - 1 degrees of freedom)."""
    level = check_level(level)
    x = as_1d(a, "a")
    y = as_1d(b, "b", x.size)
    if x.size < 2:
        raise ValueError("bland_altman needs at least two pairs")
    d = x - y
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    z = float(stats.norm.ppf((1 + level) / 2))
    return BlandAltman(mean, sd, mean - z * sd, mean + z * sd, int(x.size), level)


@dataclass(frozen=True)
class Correlation:
    """Pearson correlation with its Fisher-z confidence interval and the t-test p-value."""

    value: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    level: float = 0.95


def correlation_ci(a: ArrayLike, b: ArrayLike, level: float = 0.95) -> Correlation:
    """Pearson r with CI tanh(atanh(r) +/- z / sqrt(n - 3)); needs n >= 4 and non-constant inputs."""
    level = check_level(level)
    x = as_1d(a, "a")
    y = as_1d(b, "b", x.size)
    if x.size < 4:
        raise ValueError("correlation_ci needs at least four pairs for the Fisher-z interval")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("correlation is undefined when a or b is constant")
    res = stats.pearsonr(x, y)
    r = float(res.statistic)
    z = float(stats.norm.ppf((1 + level) / 2))
    half = z / math.sqrt(x.size - 3)
    zr = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15))
    return Correlation(r, math.tanh(zr - half), math.tanh(zr + half), float(res.pvalue), int(x.size), level)
