"""Survival metrics: concordance (Harrell, Uno), IPCW td-AUROC, Brier/IBS, Kaplan-Meier,
log-rank, Cox hazard ratios and a Breslow baseline that turns any log-risk into S(t).

Thin, validated wrappers over scikit-survival (called, not copied) and lifelines. Scores are
"higher = higher risk" (a log-risk, hazard ratio or t-year risk); times and horizons share one
unit (raypipe uses days).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from raypipe.metrics._checks import as_1d, as_binary, as_survival, check_level
from raypipe.metrics.bootstrap import MetricCI, bootstrap_ci


def _surv(time: NDArray[np.float64], event: NDArray[np.bool_]) -> NDArray[np.void]:
    from sksurv.util import Surv

    return Surv.from_arrays(event=event, time=time)


def _as_estimate(score: ArrayLike, n: int, n_times: int | None = None, name: str = "score") -> NDArray[np.float64]:
    """A 1-D risk score, or an n x len(times) matrix when `n_times` allows one."""
    arr = np.asarray(score, dtype=np.float64)
    if arr.ndim == 2 and n_times is not None:
        if arr.shape != (n, n_times):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({n}, {n_times})")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values")
        return arr
    return as_1d(arr, name, n)


def _as_times(times: ArrayLike) -> NDArray[np.float64]:
    t = np.atleast_1d(as_1d(np.atleast_1d(times), "times"))
    if np.any(np.diff(t) <= 0):
        raise ValueError("times must be strictly increasing")
    return t


@dataclass(frozen=True)
class Concordance:
    """A concordance index with the pair counts it rests on."""

    value: float
    concordant: int
    discordant: int
    tied_risk: int
    tied_time: int


def c_index(time: ArrayLike, event: ArrayLike, score: ArrayLike) -> Concordance:
    """Harrell's C (sksurv `concordance_index_censored`): share of comparable pairs ranked right."""
    from sksurv.metrics import concordance_index_censored

    t, e = as_survival(time, event)
    c, conc, disc, tr, tt = concordance_index_censored(e, t, as_1d(score, "score", t.size))
    return Concordance(float(c), int(conc), int(disc), int(tr), int(tt))


def c_index_or_nan(time: ArrayLike, event: ArrayLike, score: ArrayLike) -> float:
    """Harrell's C over rows with a positive time and finite values; NaN without events (epoch monitors)."""
    t, e, s = (np.asarray(a, dtype=np.float64) for a in (time, event, score))
    keep = np.isfinite(t) & np.isfinite(e) & np.isfinite(s) & (t > 0)
    if keep.sum() < 2 or e[keep].sum() == 0:
        return float("nan")
    return c_index(t[keep], e[keep].astype(bool), s[keep]).value


def concordance_ci(
    time: ArrayLike,
    event: ArrayLike,
    score: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    groups: ArrayLike | None = None,
    level: float = 0.95,
) -> MetricCI:
    """Harrell's C with a percentile bootstrap CI (stratified on the event, patient-level with `groups`).

    One sksurv call per resample (cost grows with n x events): fine for test sets of thousands;
    lower `n_boot` for very large cohorts.
    """
    t, e = as_survival(time, event)
    s = as_1d(score, "score", t.size)

    def harrell(tt: NDArray[np.float64], ee: NDArray[np.bool_], ss: NDArray[np.float64]) -> float:
        from sksurv.metrics import concordance_index_censored

        return float(concordance_index_censored(ee, tt, ss)[0]) if ee.any() else math.nan

    return bootstrap_ci(harrell, (t, e, s), e, n_boot, seed, groups, level)


def c_index_uno(
    time_train: ArrayLike,
    event_train: ArrayLike,
    time: ArrayLike,
    event: ArrayLike,
    score: ArrayLike,
    tau: float | None = None,
) -> Concordance:
    """Uno's IPCW C up to `tau` (sksurv `concordance_index_ipcw`); censoring is estimated on the training data."""
    from sksurv.metrics import concordance_index_ipcw

    tr, er = as_survival(time_train, event_train, "time_train", "event_train")
    t, e = as_survival(time, event)
    c, conc, disc, tri, tti = concordance_index_ipcw(_surv(tr, er), _surv(t, e), as_1d(score, "score", t.size), tau=tau)
    return Concordance(float(c), int(conc), int(disc), int(tri), int(tti))


@dataclass(frozen=True)
class TimeDependentAUROC:
    """Cumulative/dynamic AUROC at each time and its mean weighted by the KM estimate (sksurv)."""

    times: NDArray[np.float64]
    values: NDArray[np.float64]
    mean: float


def td_auroc(
    time_train: ArrayLike,
    event_train: ArrayLike,
    time: ArrayLike,
    event: ArrayLike,
    score: ArrayLike,
    times: ArrayLike,
) -> TimeDependentAUROC:
    """IPCW cumulative/dynamic AUROC at `times`; `score` is a risk (n,) or a risk per time (n, len(times))."""
    from sksurv.metrics import cumulative_dynamic_auc

    tr, er = as_survival(time_train, event_train, "time_train", "event_train")
    t, e = as_survival(time, event)
    grid = _as_times(times)
    est = _as_estimate(score, t.size, grid.size)
    values, mean = cumulative_dynamic_auc(_surv(tr, er), _surv(t, e), est, grid)
    return TimeDependentAUROC(grid, np.asarray(values, dtype=np.float64), float(mean))


@dataclass(frozen=True)
class BrierScore:
    """IPCW Brier score at each time and its integral over the times divided by their span (IBS)."""

    value: float
    times: NDArray[np.float64]
    brier: NDArray[np.float64]


def integrated_brier_score(
    time_train: ArrayLike,
    event_train: ArrayLike,
    time: ArrayLike,
    event: ArrayLike,
    surv: ArrayLike,
    times: ArrayLike,
) -> BrierScore:
    """Integrated Brier score of predicted survival `surv` (n x len(times)) via sksurv (lower is better)."""
    from sksurv.metrics import brier_score, integrated_brier_score as sk_ibs

    tr, er = as_survival(time_train, event_train, "time_train", "event_train")
    t, e = as_survival(time, event)
    grid = _as_times(times)
    if grid.size < 2:
        raise ValueError("times needs at least two time points to integrate the Brier score")
    s = np.asarray(surv, dtype=np.float64)
    if s.shape != (t.size, grid.size) or not np.all(np.isfinite(s)):
        raise ValueError(f"surv must be a finite ({t.size}, {grid.size}) matrix, got shape {s.shape}")
    train, test = _surv(tr, er), _surv(t, e)
    _, scores = brier_score(train, test, s, grid)
    return BrierScore(float(sk_ibs(train, test, s, grid)), grid, np.asarray(scores, dtype=np.float64))


@dataclass(frozen=True)
class KaplanMeier:
    """Kaplan-Meier curve at each distinct time, with a log(-log) (exponential Greenwood) CI."""

    time: NDArray[np.float64]
    survival: NDArray[np.float64]
    ci_low: NDArray[np.float64]
    ci_high: NDArray[np.float64]
    n_at_risk: NDArray[np.int64]
    n_events: NDArray[np.int64]
    level: float = 0.95

    def at(self, times: ArrayLike) -> NDArray[np.float64]:
        """Survival at arbitrary times (right-continuous step function; 1 before the first time)."""
        idx = np.searchsorted(self.time, np.asarray(times, dtype=np.float64), side="right") - 1
        return np.where(idx >= 0, self.survival[np.clip(idx, 0, None)], 1.0)

    def ci_at(self, times: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Pointwise CI at arbitrary times, same step convention as `at`."""
        idx = np.searchsorted(self.time, np.asarray(times, dtype=np.float64), side="right") - 1
        ok = idx >= 0
        j = np.clip(idx, 0, None)
        return np.where(ok, self.ci_low[j], 1.0), np.where(ok, self.ci_high[j], 1.0)

    def at_risk(self, times: ArrayLike) -> NDArray[np.int64]:
        """Number still at risk (follow-up >= t) at arbitrary times: the numbers-at-risk table under a KM plot."""
        idx = np.searchsorted(self.time, np.asarray(times, dtype=np.float64), side="left")
        counts = np.concatenate([self.n_at_risk, [0]])
        return counts[idx].astype(np.int64)


def kaplan_meier(time: ArrayLike, event: ArrayLike, level: float = 0.95) -> KaplanMeier:
    """Kaplan-Meier estimate (sksurv) with number at risk and events per time, for curves and tables."""
    from sksurv.nonparametric import kaplan_meier_estimator

    level = check_level(level)
    t = as_1d(time, "time")
    e = as_binary(event, "event", t.size)
    if np.any(t < 0):
        raise ValueError(f"time must be >= 0, found {float(t.min())}")
    times, surv, ci = kaplan_meier_estimator(e, t, conf_level=level, conf_type="log-log")
    uniq, inverse = np.unique(t, return_inverse=True)
    n_events = np.bincount(inverse, weights=e, minlength=uniq.size).astype(np.int64)
    leaving = np.bincount(inverse, minlength=uniq.size)
    n_at_risk = (t.size - np.concatenate([[0], np.cumsum(leaving)[:-1]])).astype(np.int64)
    if not np.array_equal(uniq, times):  # sksurv reports every distinct time; keep the tables aligned
        raise RuntimeError("unexpected time grid from sksurv kaplan_meier_estimator")
    return KaplanMeier(times.astype(np.float64), surv, ci[0], ci[1], n_at_risk, n_events, level)


@dataclass(frozen=True)
class LogRankResult:
    """Log-rank test of equal survival across k groups."""

    statistic: float
    df: int
    p_value: float


def logrank_test(time: ArrayLike, event: ArrayLike, group: ArrayLike) -> LogRankResult:
    """k-group log-rank test (lifelines `multivariate_logrank_test`)."""
    from lifelines.statistics import multivariate_logrank_test

    t, e = as_survival(time, event)
    g = np.asarray(group)
    if g.shape != t.shape:
        raise ValueError(f"group has shape {g.shape}, expected {t.shape}")
    if pd.isna(g).any():
        raise ValueError("group contains missing values")
    if np.unique(g).size < 2:
        raise ValueError("group must contain at least two groups")
    res = multivariate_logrank_test(t, g, e)
    return LogRankResult(float(res.test_statistic), int(res.degrees_of_freedom), float(res.p_value))


@dataclass(frozen=True)
class HazardRatio:
    """Hazard ratio of one covariate (per unit increase) with its Wald CI and p-value."""

    covariate: str
    value: float
    ci_low: float
    ci_high: float
    p_value: float
    coef: float
    se: float


@dataclass(frozen=True)
class CoxSummary:
    """A fitted Cox model's hazard ratios and its likelihood-ratio test against the null model."""

    ratios: dict[str, HazardRatio] = field(repr=False)
    lr_statistic: float
    lr_df: int
    lr_p_value: float
    log_likelihood: float
    concordance: float
    n: int
    n_events: int
    level: float = 0.95

    def __getitem__(self, covariate: str) -> HazardRatio:
        return self.ratios[covariate]


def cox_hazard_ratios(df: pd.DataFrame, duration_col: str, event_col: str, level: float = 0.95) -> CoxSummary:
    """Fit lifelines' CoxPHFitter (Efron ties) on every other column of `df` and summarise it."""
    from lifelines import CoxPHFitter

    level = check_level(level)
    for col in (duration_col, event_col):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in df (columns: {list(df.columns)})")
    as_survival(df[duration_col].to_numpy(), df[event_col].to_numpy(), duration_col, event_col)
    covariates = [c for c in df.columns if c not in (duration_col, event_col)]
    if not covariates:
        raise ValueError("df has no covariate columns besides the duration and event columns")
    for c in covariates:
        as_1d(df[c].to_numpy(), f"df[{c!r}]")
    cph = CoxPHFitter(alpha=1 - level).fit(df, duration_col=duration_col, event_col=event_col)
    s = cph.summary
    lo_col = next(c for c in s.columns if c.startswith("exp(coef) lower"))
    hi_col = next(c for c in s.columns if c.startswith("exp(coef) upper"))
    ratios = {
        str(name): HazardRatio(
            str(name), float(r["exp(coef)"]), float(r[lo_col]), float(r[hi_col]), float(r["p"]), float(r["coef"]), float(r["se(coef)"])
        )
        for name, r in s.iterrows()
    }
    lr = cph.log_likelihood_ratio_test()
    return CoxSummary(
        ratios,
        float(lr.test_statistic),
        int(lr.degrees_freedom),
        float(lr.p_value),
        float(cph.log_likelihood_),
        float(cph.concordance_index_),
        int(df.shape[0]),
        int(df[event_col].sum()),
        level,
    )


@dataclass(frozen=True)
class BreslowBaseline:
    """Breslow cumulative baseline hazard H0(t) fitted for a log-risk model, to predict S(t | log-risk).

    H0 is stored relative to `offset` (the mean training log-risk), which keeps exp() in range:
    S(t | r) = exp(-H0(t) * exp(r - offset)).
    """

    time: NDArray[np.float64]
    cumulative_hazard: NDArray[np.float64]
    offset: float

    def _hazard_at(self, times: ArrayLike) -> NDArray[np.float64]:
        idx = np.searchsorted(self.time, np.atleast_1d(np.asarray(times, dtype=np.float64)), side="right") - 1
        return np.where(idx >= 0, self.cumulative_hazard[np.clip(idx, 0, None)], 0.0)

    def survival(self, log_risk: ArrayLike, times: ArrayLike) -> NDArray[np.float64]:
        """S(t) for each log-risk (rows) at each time (columns); flat after the last event time."""
        r = as_1d(np.atleast_1d(log_risk), "log_risk")
        return np.exp(-np.outer(np.exp(r - self.offset), self._hazard_at(times)))

    def risk(self, log_risk: ArrayLike, horizon: float) -> NDArray[np.float64]:
        """Probability of the event by `horizon` (e.g. the 5-year fracture risk): 1 - S(horizon)."""
        return 1.0 - self.survival(log_risk, [horizon])[:, 0]


def breslow_baseline(time: ArrayLike, event: ArrayLike, log_risk: ArrayLike) -> BreslowBaseline:
    """Fit the Breslow baseline (sksurv `BreslowEstimator`) so any model's log-risk maps to S(t) and t-year risk."""
    from sksurv.linear_model.coxph import BreslowEstimator

    t, e = as_survival(time, event)
    r = as_1d(log_risk, "log_risk", t.size)
    offset = float(r.mean())
    est = BreslowEstimator().fit(r - offset, e, t)
    step = est.cum_baseline_hazard_
    return BreslowBaseline(np.asarray(step.x, dtype=np.float64), np.asarray(step.y, dtype=np.float64), offset)
