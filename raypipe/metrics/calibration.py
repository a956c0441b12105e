"""Calibration: observed against predicted t-year risk, and logistic recalibration of probabilities.

`survival_calibration`: patients are cut into quantile groups of predicted risk by the horizon (deciles by
default); in each group the observed risk is 1 - S(horizon) from Kaplan-Meier (so censoring before the horizon is
handled), with its log(-log) 95% CI. A well calibrated model puts every group on the diagonal.

`fit_logistic_recalibration` (Platt scaling on the logit): maps one model's probabilities onto the outcome scale
of held-aside rows. Cross-validation fits it per fold on the fold's inner validation patients, so the fold
models' out-of-fold probabilities share one scale before they are pooled (`raypipe.tune.cv`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from raypipe.metrics._checks import as_1d, as_binary
from raypipe.metrics.survival import kaplan_meier

MAX_RECALIBRATION_SLOPE = 20.0  # beyond this the rows separate the classes and the slope is not identified
_EPS = 1e-6


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


@dataclass(frozen=True)
class LogisticRecalibration:
    """p -> sigmoid(intercept + slope * logit(p)); the identity is intercept 0, slope 1."""

    intercept: float = 0.0
    slope: float = 1.0
    n: int = 0  # rows it was fitted on (0: not fitted, identity)

    def __call__(self, p: ArrayLike) -> NDArray[np.float64]:
        """Recalibrated probabilities (monotone in `p`, so rankings and AUROC are unchanged)."""
        return _sigmoid(self.intercept + self.slope * _logit(np.asarray(p, dtype=np.float64)))


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.exp(-np.logaddexp(0.0, -z))


def _log_likelihood(y: NDArray[np.float64], eta: NDArray[np.float64]) -> float:
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def _newton(y: NDArray[np.float64], design: NDArray[np.float64], offset: NDArray[np.float64],
            iterations: int = 100) -> NDArray[np.float64] | None:
    """Maximum-likelihood logistic coefficients by Newton-Raphson with step halving; None if it diverges."""
    beta = np.zeros(design.shape[1])
    ll = _log_likelihood(y, offset)
    for _ in range(iterations):
        eta = offset + design @ beta
        mu = _sigmoid(eta)
        grad = design.T @ (y - mu)
        hess = design.T @ (design * (mu * (1.0 - mu))[:, None])
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            return None
        for _ in range(30):  # halve until the likelihood does not fall
            new = beta + step
            new_ll = _log_likelihood(y, offset + design @ new)
            if new_ll >= ll - 1e-12:
                break
            step = step / 2.0
        beta, ll = new, new_ll
        if not np.all(np.isfinite(beta)):
            return None
        if np.max(np.abs(step)) < 1e-10:
            return beta
    return beta


def fit_logistic_recalibration(y: ArrayLike, p: ArrayLike) -> LogisticRecalibration:
    """Platt's logistic recalibration of probabilities `p` to binary outcomes `y` (maximum likelihood).

    Falls back to an intercept-only fit (slope 1: calibration in the large) when the fitted slope is not positive
    or exceeds `MAX_RECALIBRATION_SLOPE` (a recalibration must keep the ranking and stay finite), and to the
    identity when `y` holds one class only.
    """
    yy = as_binary(y, "y").astype(np.float64)
    pp = as_1d(p, "p", yy.size)
    if np.any((pp < 0) | (pp > 1)):
        raise ValueError(f"p must be probabilities in [0, 1], found values in [{pp.min():.4g}, {pp.max():.4g}]")
    z = _logit(pp)
    if yy.size == 0 or yy.min() == yy.max():
        return LogisticRecalibration(n=int(yy.size))
    beta = _newton(yy, np.column_stack([np.ones_like(z), z]), np.zeros_like(z))
    if beta is not None and 0.0 < beta[1] <= MAX_RECALIBRATION_SLOPE:
        return LogisticRecalibration(float(beta[0]), float(beta[1]), int(yy.size))
    shift = _newton(yy, np.ones((z.size, 1)), z)
    return LogisticRecalibration(float(shift[0]) if shift is not None else 0.0, 1.0, int(yy.size))
