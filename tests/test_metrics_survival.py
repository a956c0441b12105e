"""Survival metrics against scikit-survival and lifelines on real bundled data (GBSG2, Rossi).

GBSG2 (686 breast-cancer patients, recurrence-free survival in days): a CoxPH fitted on a 70/30
split stratified on the event scores the test set, as in STACK.md's reference run.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_rossi
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index
from sklearn.model_selection import train_test_split
from sksurv.compare import compare_survival
from sksurv.datasets import load_gbsg2
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score as sk_ibs,
)
from sksurv.preprocessing import OneHotEncoder
from sksurv.util import Surv

from raypipe.metrics import (
    breslow_baseline,
    c_index,
    c_index_uno,
    concordance_ci,
    cox_hazard_ratios,
    group_hazard_ratios,
    group_incidence,
    hazard_ratio_summary,
    integrated_brier_score,
    kaplan_meier,
    logrank_test,
    metric_summary,
    risk_groups,
    survival_summary,
    td_auroc,
)

TIMES = np.array([365.0, 730.0, 1095.0, 1460.0, 1825.0])  # 1-5 years, in days


@pytest.fixture(scope="module")
def gbsg2() -> dict:
    x, y = load_gbsg2()
    xe = OneHotEncoder().fit_transform(x)
    x_tr, x_te, y_tr, y_te = train_test_split(xe, y, test_size=0.3, random_state=0, stratify=y["cens"])
    model = CoxPHSurvivalAnalysis().fit(x_tr, y_tr)
    surv = np.vstack([f(TIMES) for f in model.predict_survival_function(x_te)])
    return {
        "y_train": y_tr, "y_test": y_te, "t_tr": y_tr["time"], "e_tr": y_tr["cens"], "t": y_te["time"],
        "e": y_te["cens"], "score": model.predict(x_te), "score_train": model.predict(x_tr), "surv": surv,
        "tgrade": x.loc[x_te.index, "tgrade"].astype(str).to_numpy(),
    }


@pytest.fixture(scope="module")
def rossi() -> pd.DataFrame:
    return load_rossi()


def test_harrell_c_equals_sksurv_and_lifelines(gbsg2):
    d = gbsg2
    res = c_index(d["t"], d["e"], d["score"])
    ref = concordance_index_censored(d["e"], d["t"], d["score"])
    assert res.value == pytest.approx(ref[0], abs=1e-6)
    assert (res.concordant, res.discordant, res.tied_risk, res.tied_time) == tuple(ref[1:])
    assert res.value == pytest.approx(concordance_index(d["t"], -d["score"], d["e"]), abs=1e-6)
    assert 0.6 < res.value < 0.72  # STACK.md reports 0.663 for this set-up


def test_uno_c_equals_sksurv(gbsg2):
    d = gbsg2
    for tau in (None, 1825.0):
        res = c_index_uno(d["t_tr"], d["e_tr"], d["t"], d["e"], d["score"], tau=tau)
        ref = concordance_index_ipcw(d["y_train"], d["y_test"], d["score"], tau=tau)
        assert res.value == pytest.approx(ref[0], abs=1e-6)


def test_td_auroc_equals_sksurv(gbsg2):
    d = gbsg2
    res = td_auroc(d["t_tr"], d["e_tr"], d["t"], d["e"], d["score"], TIMES)
    values, mean = cumulative_dynamic_auc(d["y_train"], d["y_test"], d["score"], TIMES)
    np.testing.assert_allclose(res.values, values, atol=1e-6)
    assert res.mean == pytest.approx(mean, abs=1e-6)
    per_time = td_auroc(d["t_tr"], d["e_tr"], d["t"], d["e"], 1 - d["surv"], TIMES)  # risk per time
    np.testing.assert_allclose(per_time.values, cumulative_dynamic_auc(d["y_train"], d["y_test"], 1 - d["surv"], TIMES)[0], atol=1e-6)


def test_ibs_equals_sksurv_and_breslow_reproduces_coxph_survival(gbsg2):
    d = gbsg2
    res = integrated_brier_score(d["t_tr"], d["e_tr"], d["t"], d["e"], d["surv"], TIMES)
    assert res.value == pytest.approx(sk_ibs(d["y_train"], d["y_test"], d["surv"], TIMES), abs=1e-6)
    assert res.brier.shape == TIMES.shape
    baseline = breslow_baseline(d["t_tr"], d["e_tr"], d["score_train"])
    np.testing.assert_allclose(baseline.survival(d["score"], TIMES), d["surv"], atol=1e-6)
    np.testing.assert_allclose(baseline.risk(d["score"], 1825.0), 1 - d["surv"][:, -1], atol=1e-6)


def test_breslow_equals_lifelines_prediction(rossi):
    cph = CoxPHFitter().fit(rossi, "week", "arrest")
    x = rossi.drop(columns=["week", "arrest"])
    log_risk = x.to_numpy(float) @ cph.params_.to_numpy()
    baseline = breslow_baseline(rossi["week"], rossi["arrest"], log_risk + 500.0)  # any offset: stable
    times = [1.0, 10.0, 26.0, 52.0, 60.0]  # 60 is past the last time: survival stays flat
    ref = cph.predict_survival_function(x, times=times).T.to_numpy()
    np.testing.assert_allclose(baseline.survival(log_risk + 500.0, times), ref, atol=1e-6)
    assert np.all(baseline.survival(log_risk, [0.5]) == 1.0)


def test_kaplan_meier_equals_lifelines(gbsg2):
    d = gbsg2
    km = kaplan_meier(d["t"], d["e"])
    kmf = KaplanMeierFitter().fit(d["t"], d["e"])
    np.testing.assert_allclose(km.survival, kmf.survival_function_.loc[km.time].to_numpy()[:, 0], atol=1e-6)
    ci = kmf.confidence_interval_.loc[km.time].to_numpy()
    np.testing.assert_allclose(km.ci_low, ci[:, 0], atol=1e-6)
    np.testing.assert_allclose(km.ci_high, ci[:, 1], atol=1e-6)
    table = kmf.event_table.loc[km.time]
    np.testing.assert_array_equal(km.n_at_risk, table["at_risk"].to_numpy())
    np.testing.assert_array_equal(km.n_events, table["observed"].to_numpy())
    np.testing.assert_allclose(km.at([0.0, 1000.0, 1e6]), kmf.survival_function_at_times([0.0, 1000.0, 1e6]).to_numpy(), atol=1e-6)


def test_logrank_equals_lifelines_and_sksurv(gbsg2):
    d = gbsg2
    res = logrank_test(d["t"], d["e"], d["tgrade"])
    ref = multivariate_logrank_test(d["t"], d["tgrade"], d["e"])
    chi2, p = compare_survival(d["y_test"], d["tgrade"])
    assert res.statistic == pytest.approx(ref.test_statistic, abs=1e-6) and res.df == 2
    assert res.statistic == pytest.approx(chi2, abs=1e-6) and res.p_value == pytest.approx(p, abs=1e-6)


def test_cox_hazard_ratios_equal_lifelines_and_sksurv(rossi):
    res = cox_hazard_ratios(rossi, "week", "arrest")
    cph = CoxPHFitter().fit(rossi, "week", "arrest")
    s = cph.summary
    for name in s.index:
        hr = res[name]
        assert hr.value == pytest.approx(s.loc[name, "exp(coef)"], abs=1e-6)
        assert hr.ci_low == pytest.approx(s.loc[name, "exp(coef) lower 95%"], abs=1e-6)
        assert hr.ci_high == pytest.approx(s.loc[name, "exp(coef) upper 95%"], abs=1e-6)
        assert hr.p_value == pytest.approx(s.loc[name, "p"], abs=1e-6)
    lr = cph.log_likelihood_ratio_test()
    assert (res.lr_statistic, res.lr_df) == (pytest.approx(lr.test_statistic, abs=1e-6), 7)
    assert res.lr_p_value == pytest.approx(lr.p_value, abs=1e-9)
    x = rossi.drop(columns=["week", "arrest"]).astype(float)  # independent fit: sksurv's Efron Newton-Raphson
    sk = CoxPHSurvivalAnalysis(ties="efron").fit(x, Surv.from_arrays(rossi["arrest"].astype(bool), rossi["week"]))
    np.testing.assert_allclose([res[c].coef for c in x.columns], sk.coef_, atol=1e-6)


def test_concordance_ci_covers_estimate(gbsg2):
    d = gbsg2
    r = concordance_ci(d["t"], d["e"], d["score"], n_boot=100, seed=0)
    assert r.value == c_index(d["t"], d["e"], d["score"]).value
    assert r.ci_low < r.value < r.ci_high


def test_survival_summary_metric_names(gbsg2):
    d = gbsg2
    summary = survival_summary(
        d["t"], d["e"], d["score"], time_train=d["t_tr"], event_train=d["e_tr"], times=TIMES, surv=d["surv"], n_boot=20
    )
    expected = {"c_index", "c_index_uno", "ibs", "td_auroc_mean"} | {f"td_auroc@{int(t)}" for t in TIMES}
    assert set(summary) == expected
    for ci in summary.values():
        assert ci.ci_low <= ci.value <= ci.ci_high
    assert summary["td_auroc@365"].value == pytest.approx(cumulative_dynamic_auc(d["y_train"], d["y_test"], d["score"], TIMES)[0][0])
    json.dumps(metric_summary(summary))


def test_risk_groups_hand_example():
    baseline = [0.10, 0.49, 0.50, 0.90, 0.20, 0.30]
    generated = [0.10, 0.60, 0.10, 0.20, 0.59, 0.95]
    assert risk_groups(baseline, generated).tolist() == ["LL", "LH", "HIGH", "HIGH", "LL", "LH"]
    assert risk_groups(baseline, generated, low=0.25, high=0.9).tolist() == ["LL", "HIGH", "HIGH", "HIGH", "LL", "HIGH"]
    assert risk_groups(0.1, 0.7).tolist() == ["LH"]


def test_group_incidence_and_hazard_ratios(rossi):
    groups = np.where(rossi["prio"] >= 3, "HIGH", np.where(rossi["age"] < 22, "LH", "LL"))
    t, e = rossi["week"].to_numpy(), rossi["arrest"].to_numpy()
    inc = group_incidence(groups, t, e, horizon=26.0)
    for name, g in inc.items():
        kmf = KaplanMeierFitter().fit(t[groups == name], e[groups == name])
        assert g.incidence == pytest.approx(1 - kmf.survival_function_at_times(26.0).iloc[0], abs=1e-6)
        assert g.ci_low <= g.incidence <= g.ci_high
        assert g.n == int((groups == name).sum())
        assert g.n_events == int(((groups == name) & (e == 1) & (t <= 26)).sum())
    hrs = group_hazard_ratios(groups, t, e)
    assert set(hrs) == {"LH", "HIGH"}
    df = pd.DataFrame({"lh": (groups == "LH").astype(float), "high": (groups == "HIGH").astype(float), "t": t, "e": e})
    ref = CoxPHFitter().fit(df, "t", "e").summary
    assert hrs["HIGH"].value == pytest.approx(ref.loc["high", "exp(coef)"], abs=1e-6)
    assert set(hazard_ratio_summary(groups, t, e)) == {"hr@LH", "hr@HIGH"}


@pytest.mark.parametrize(
    ("time", "event", "match"),
    [
        ([1.0, 2.0, 3.0], [0, 0, 0], "event has no events"),
        ([1.0, -2.0, 3.0], [1, 0, 1], "time must be >= 0"),
        ([1.0, 2.0, 3.0], [1, 2, 1], "event must contain only 0/1"),
        ([1.0, np.nan, 3.0], [1, 0, 1], "time contains 1 NaN"),
        ([1.0, 2.0], [1, 0, 1], "event has length 3, expected 2"),
    ],
)
def test_invalid_survival_input(time, event, match):
    with pytest.raises(ValueError, match=match):
        c_index(time, event, [0.1, 0.2, 0.3][: len(time)])
