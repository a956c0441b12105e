"""Calibration of predicted t-year risk: mean predicted risk against Kaplan-Meier observed risk per risk group.

Patients are cut into quantile groups of predicted risk by the horizon (deciles by default); in each group
the observed risk is 1 - S(horizon) from Kaplan-Meier (so censoring before the horizon is handled), with
its log(-log) 95% CI. A well calibrated model puts every group on the diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from raypipe.metrics._checks import as_1d, as_binary
from raypipe.metrics.survival import kaplan_meier


@dataclass(frozen=True)
class CalibrationGroups:
    """Per quantile group of predicted risk: mean prediction, observed KM risk (CI), size and events."""

    horizon: float
    predicted: NDArray[np.float64]
    observed: NDArray[np.float64]  # NaN where follow-up ends before the horizon
    ci_low: NDArray[np.float64]
    ci_high: NDArray[np.float64]
    n: NDArray[np.int64]
    events: NDArray[np.int64]  # events up to the horizon


def survival_calibration(
    time: ArrayLike, event: ArrayLike, risk: ArrayLike, horizon: float, n_groups: int = 10, level: float = 0.95
) -> CalibrationGroups:
    """Observed (Kaplan-Meier) against mean predicted risk by `horizon` in `n_groups` quantile groups of risk."""
    t = as_1d(time, "time")
    e = as_binary(event, "event", t.size)
    r = as_1d(risk, "risk", t.size)
    if np.any(r < 0) or np.any(r > 1):
        raise ValueError(f"risk must be a probability in [0, 1], found values in [{r.min():.4g}, {r.max():.4g}]")
    if not horizon > 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    if n_groups < 1 or n_groups > t.size:
        raise ValueError(f"n_groups must be in [1, {t.size}], got {n_groups}")
    codes = pd.qcut(pd.Series(r).rank(method="first"), n_groups, labels=False).to_numpy()
    rows = []
    for g in range(n_groups):
        sel = codes == g
        tt, ee = t[sel], e[sel]
        km = kaplan_meier(tt, ee, level)
        s = float(km.at([horizon])[0])
        lo, hi = (float(v[0]) for v in km.ci_at([horizon]))
        undefined = tt.max() < horizon and s > 0
        obs = np.nan if undefined else 1.0 - s
        ci = (np.nan, np.nan) if undefined else (1.0 - hi, 1.0 - lo)
        rows.append((float(r[sel].mean()), obs, *ci, int(sel.sum()), int((ee & (tt <= horizon)).sum())))
    p, o, lo, hi, n, ev = (np.array(c) for c in zip(*rows))
    return CalibrationGroups(float(horizon), p.astype(np.float64), o.astype(np.float64), lo.astype(np.float64),
                             hi.astype(np.float64), n.astype(np.int64), ev.astype(np.int64))
