"""Kaplan-Meier bands and numbers at risk (against lifelines), decision curves (against the definition, by hand)
and calibration by quantile groups of predicted t-year risk."""

from __future__ import annotations

import numpy as np
import pytest

from raypipe import metrics as M


def _cohort(n: int = 300, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exponential event times with a known per-patient hazard, uniform censoring; returns time, event, rate."""
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(-8.5, 0.9, n))
    event_time = -np.log(rng.random(n)) / rate
    censor = rng.uniform(300, 3000, n)
    time = np.round(np.minimum(event_time, censor))  # rounding makes tied times, as in real follow-up
    return np.maximum(time, 1.0), (event_time <= censor).astype(int), rate


def test_kaplan_meier_band_and_numbers_at_risk_match_lifelines() -> None:
    from lifelines import KaplanMeierFitter

    time, event, _ = _cohort()
    km = M.kaplan_meier(time, event)
    kmf = KaplanMeierFitter(alpha=0.05).fit(time, event)
    grid = np.array([0.0, 100.0, 365.0, 730.0, 1000.5, 1825.0, 2500.0, 5000.0])
    np.testing.assert_allclose(km.at(grid), kmf.survival_function_at_times(grid).to_numpy(), atol=1e-10)
    ci = kmf.confidence_interval_survival_function_  # lifelines' default: exponential Greenwood (log(-log))
    lo = ci.iloc[:, 0].reindex(km.time).to_numpy()
    hi = ci.iloc[:, 1].reindex(km.time).to_numpy()
    inside = km.survival > 0  # lifelines and sksurv differ only in how they show the band once S reaches 0
    np.testing.assert_allclose(km.ci_low[inside], lo[inside], atol=1e-6)
    np.testing.assert_allclose(km.ci_high[inside], hi[inside], atol=1e-6)
    expected = [int((time >= t).sum()) for t in grid]
    assert km.at_risk(grid).tolist() == expected
    table = kmf.event_table  # lifelines counts at risk just before each observed time
    assert km.at_risk(km.time).tolist() == table["at_risk"].reindex(km.time).astype(int).tolist()


def test_net_benefit_binary_by_hand() -> None:
    y = [1, 1, 0, 0, 1, 0]
    risk = [0.9, 0.4, 0.35, 0.8, 0.2, 0.1]
    dc = M.net_benefit(y, risk, thresholds=[0.3, 0.5, 0.95])
    # pt 0.3: treated 0.9, 0.4, 0.35, 0.8 -> 2 TP, 2 FP; pt 0.5: 0.9 (TP), 0.8 (FP); pt 0.95: nobody
    np.testing.assert_allclose(dc.model, [2 / 6 - 2 / 6 * 0.3 / 0.7, 1 / 6 - 1 / 6 * 1.0, 0.0])
    np.testing.assert_allclose(dc.treat_all, [0.5 - 0.5 * 0.3 / 0.7, 0.0, 0.5 - 0.5 * 19.0])
    assert dc.treat_none.tolist() == [0.0, 0.0, 0.0] and dc.event_rate == 0.5 and dc.n == 6


def test_net_benefit_survival_by_hand_with_censoring() -> None:
    time = [1, 2, 3, 4, 5, 6]
    event = [1, 0, 1, 0, 1, 0]
    risk = [0.9, 0.8, 0.7, 0.2, 0.1, 0.05]
    dc = M.net_benefit_survival(time, event, risk, horizon=3.5, thresholds=[0.15, 0.5])
    odds = 0.15 / 0.85
    # pt 0.15: the 4 treated (t 1e, 2c, 3e, 4c): S(3.5) = 3/4 * 1/2 = 3/8
    nb_15 = 4 / 6 * ((1 - 3 / 8) - 3 / 8 * odds)
    # pt 0.5: the 3 treated (t 1e, 2c, 3e): S(3.5) = 2/3 * 0 = 0
    nb_50 = 3 / 6 * (1.0 - 0.0)
    np.testing.assert_allclose(dc.model, [nb_15, nb_50])
    s_all = 5 / 6 * 3 / 4  # everyone: events at 1 (6 at risk) and 3 (4 at risk)
    np.testing.assert_allclose(dc.treat_all, [(1 - s_all) - s_all * odds, (1 - s_all) - s_all * 1.0])
    assert dc.event_rate == pytest.approx(1 - s_all) and dc.horizon == 3.5


def test_net_benefit_survival_equals_binary_without_censoring() -> None:
    rng = np.random.default_rng(0)
    time = rng.exponential(1000.0, 400)
    event = np.ones(400, dtype=int)
    risk = 1 - np.exp(-730.0 / 1000.0 * rng.lognormal(0, 0.5, 400))
    thresholds = np.linspace(0.05, 0.9, 18)
    surv = M.net_benefit_survival(time, event, risk, 730.0, thresholds)
    binary = M.net_benefit(time <= 730.0, risk, thresholds)
    np.testing.assert_allclose(surv.model, binary.model, atol=1e-12)
    np.testing.assert_allclose(surv.treat_all, binary.treat_all, atol=1e-12)


def test_net_benefit_of_a_calibrated_model_beats_both_defaults() -> None:
    time, event, rate = _cohort(n=2000, seed=5)
    horizon = 1825.0
    risk = 1 - np.exp(-rate * horizon)  # the true risk by the horizon
    dc = M.net_benefit_survival(time, event, risk, horizon, thresholds=[0.1, 0.2, 0.3])
    assert np.all(dc.model >= np.maximum(dc.treat_all, 0.0) - 0.005)
    assert dc.model[1] > max(dc.treat_all[1], 0.0) + 0.005


def test_decision_curve_input_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        M.net_benefit([0, 1], [0.2, 0.8], thresholds=[0.0, 0.5])
    with pytest.raises(ValueError, match="risk must be a probability"):
        M.net_benefit([0, 1], [0.2, 1.8])
    with pytest.raises(ValueError, match="before the horizon"):
        M.net_benefit_survival([1, 2], [1, 0], [0.2, 0.3], horizon=10.0)
    with pytest.raises(ValueError, match="event"):
        M.net_benefit_survival([1, 2], [1, 2], [0.2, 0.3], horizon=1.5)


def test_survival_calibration_without_censoring_is_the_event_share_per_group() -> None:
    rng = np.random.default_rng(1)
    risk = rng.uniform(0.0, 0.6, 200)
    time = np.where(rng.random(200) < risk, rng.uniform(1, 100, 200), 500.0)
    event = np.ones(200, dtype=int)
    cal = M.survival_calibration(time, event, risk, horizon=100.0, n_groups=4)
    order = np.argsort(risk, kind="stable")
    for g, idx in enumerate(np.array_split(order, 4)):
        assert cal.n[g] == len(idx)
        assert cal.predicted[g] == pytest.approx(risk[idx].mean())
        assert cal.observed[g] == pytest.approx((time[idx] <= 100.0).mean())
        assert cal.events[g] == int((time[idx] <= 100.0).sum())
        assert cal.ci_low[g] <= cal.observed[g] <= cal.ci_high[g]


def test_survival_calibration_of_the_true_risk_lies_on_the_diagonal() -> None:
    time, event, rate = _cohort(n=3000, seed=11)
    risk = 1 - np.exp(-rate * 730.0)
    cal = M.survival_calibration(time, event, risk, horizon=730.0, n_groups=5)
    assert np.all(np.abs(cal.observed - cal.predicted) < 0.04)
    assert np.all((cal.ci_low <= cal.predicted + 0.01) & (cal.predicted - 0.01 <= cal.ci_high))
    assert np.all(np.diff(cal.predicted) > 0)


def test_survival_calibration_is_undefined_beyond_follow_up() -> None:
    cal = M.survival_calibration([1, 2, 3, 6], [0, 0, 1, 0], [0.1, 0.2, 0.3, 0.4], horizon=3.5, n_groups=2)
    assert np.isnan(cal.observed[0]) and cal.observed[1] == pytest.approx(1.0 - 0.5)


def _miscalibrated(n: int = 600, seed: int = 4, intercept: float = 0.7,
                   slope: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from sigmoid(intercept + slope * logit(p)): p is miscalibrated by a known map."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.2, 1.3, n)
    p = 1.0 / (1.0 + np.exp(-z))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(intercept + slope * z)))).astype(int)
    return y, p


def test_logistic_recalibration_matches_sklearn_and_keeps_the_ranking() -> None:
    from sklearn.linear_model import LogisticRegression

    y, p = _miscalibrated()
    cal = M.fit_logistic_recalibration(y, p)
    z = np.log(p / (1 - p))
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    assert cal.n == len(y)
    assert cal.intercept == pytest.approx(float(ref.intercept_[0]), abs=1e-5)
    assert cal.slope == pytest.approx(float(ref.coef_[0, 0]), abs=1e-5)
    assert 0.4 < cal.intercept < 1.0 and 1.3 < cal.slope < 1.9  # near the map that drew the outcomes
    q = cal(p)
    assert M.auroc(y, q) == pytest.approx(M.auroc(y, p))
    assert np.all(np.diff(q[np.argsort(p)]) >= 0)
    assert abs(q.mean() - y.mean()) < 1e-6  # maximum likelihood with an intercept matches the event share


def test_logistic_recalibration_falls_back_when_the_slope_is_not_usable() -> None:
    y, p = _miscalibrated(slope=-1.0)  # scores ranked the wrong way: a negative slope would reverse them
    cal = M.fit_logistic_recalibration(y, p)
    assert cal.slope == 1.0 and abs(cal(p).mean() - y.mean()) < 1e-6  # calibration in the large only
    separated = M.fit_logistic_recalibration([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    assert separated.slope == 1.0 and np.isfinite(separated.intercept)
    one_class = M.fit_logistic_recalibration([0, 0, 0], [0.1, 0.5, 0.9])
    assert (one_class.intercept, one_class.slope) == (0.0, 1.0)
    np.testing.assert_allclose(one_class([0.1, 0.5, 0.9]), [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="probabilities"):
        M.fit_logistic_recalibration([0, 1], [0.2, 1.5])
