"""The thesis's Diff-X survival tables (raypipe.metrics.diffx) on a cohort simulated with known hazard ratios."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypipe.metrics import risk_groups
from raypipe.metrics.diffx import (
    age_regression,
    covariate_frame,
    fracture_score_models,
    out_of_fold_scores,
    pairwise_logrank,
    participant_folds,
    table4,
    table5,
)

HR_BPVF = 1.8  # true HR per 0.1 point of BpVF
HR_FRAX_PER_UNIT = 1.1


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    """600 participants; exponential event times with log-hazard linear in BpVF/0.1, GpVF/0.1 and FRAX."""
    rng = np.random.default_rng(3)
    n = 600
    bpvf = np.clip(rng.normal(0.4, 0.12, n), 0, 1)
    gpvf = np.clip(bpvf + rng.normal(0.1, 0.1, n), 0, 1)
    age = rng.normal(68, 8, n)
    frax = np.clip(rng.normal(12, 6, n), 1, None)
    lin = np.log(HR_BPVF) * bpvf / 0.1 + np.log(1.2) * gpvf / 0.1 + np.log(HR_FRAX_PER_UNIT) * frax + 0.03 * age
    t_event = rng.exponential(1.0 / (np.exp(lin - lin.mean()) * 1.2e-4))
    t_cens = rng.uniform(400, 4500, n)
    return pd.DataFrame({
        "patient_id": [f"P{i}" for i in range(n)], "time_days": np.minimum(t_event, t_cens),
        "event": (t_event <= t_cens).astype(int), "bpvf": bpvf, "gpvf": gpvf, "age": age,
        "sex": rng.choice(["F", "M"], n), "bmi": rng.normal(24, 3, n), "frax_mof": frax,
        "group": risk_groups(bpvf, gpvf),
    })


def _logrank_by_hand(t: np.ndarray, e: np.ndarray, in_a: np.ndarray) -> float:
    """Two-group log-rank chi-square: (sum O_a - E_a)^2 / sum V over distinct event times."""
    o_e, var = 0.0, 0.0
    for x in np.unique(t[e == 1]):
        at_risk = t >= x
        n, n_a = at_risk.sum(), (at_risk & in_a).sum()
        d, d_a = ((t == x) & (e == 1)).sum(), ((t == x) & (e == 1) & in_a).sum()
        o_e += d_a - d * n_a / n
        if n > 1:
            var += d * (n_a / n) * (1 - n_a / n) * (n - d) / (n - 1)
    return o_e ** 2 / var


def test_pairwise_logrank_matches_hand_computation_and_lifelines(cohort):
    from lifelines.statistics import pairwise_logrank_test

    t, e, g = cohort["time_days"].to_numpy(), cohort["event"].to_numpy(), cohort["group"].to_numpy()
    res = pairwise_logrank(t, e, g)
    assert [(r.a, r.b) for r in res] == [("HIGH", "LH"), ("HIGH", "LL"), ("LH", "LL")]
    ref = pairwise_logrank_test(t, g, e).summary
    for r in res:
        m = (g == r.a) | (g == r.b)
        assert r.statistic == pytest.approx(_logrank_by_hand(t[m], e[m], g[m] == r.a), rel=1e-6)
        row = ref.loc[(r.a, r.b)] if (r.a, r.b) in ref.index else ref.loc[(r.b, r.a)]
        assert r.p_value == pytest.approx(float(row["p"]), rel=1e-6)
        assert r.p_bonferroni == pytest.approx(min(1.0, 3 * r.p_value))


def test_table5_hr_per_tenth_point_recovers_the_simulated_hazard_ratio(cohort):
    """BpVF per 0.1 point: the HR is exp(0.1 x the per-unit coefficient) and covers the simulated 1.8."""
    from lifelines import CoxPHFitter

    t5 = table5(cohort)
    assert t5["columns"] == ["univariable", "score_based", "clinical"]
    scored = t5["rows"]["bpvf"]["score_based"]
    assert scored["ci_low"] < HR_BPVF < scored["ci_high"]
    raw = CoxPHFitter().fit(cohort[["time_days", "event", "bpvf"]], "time_days", "event")
    assert t5["rows"]["bpvf"]["univariable"]["hr"] == pytest.approx(np.exp(0.1 * raw.params_["bpvf"]), rel=1e-4)
    assert t5["units"]["gpvf"] == "per 0.1-point increase"
    fit = t5["fit"]
    assert fit["score_based"]["lr_chi2"] > fit["clinical"]["lr_chi2"] and fit["score_based"]["c_index"] > 0.6


def test_table4_frax_per_sd_and_nested_models(cohort):
    """FRAX HR per SD = exp(SD x per-unit coefficient); models 1 and 2 add to the risk groups' LR chi-square."""
    from lifelines import CoxPHFitter

    t4 = table4(cohort)
    assert t4["columns"] == ["risk_group", "model1", "model2"]
    sd = cohort["frax_mof"].std(ddof=1)
    raw = CoxPHFitter().fit(cohort[["time_days", "event", "frax_mof"]], "time_days", "event")
    assert t4["rows"]["frax_mof"]["univariable"]["hr"] == pytest.approx(np.exp(sd * raw.params_["frax_mof"]), rel=1e-4)
    assert t4["units"]["frax_mof"].startswith("per 1 SD increase")
    assert t4["rows"]["group=HIGH"]["risk_group"]["hr"] > t4["rows"]["group=LH"]["risk_group"]["hr"] > 1
    fit = t4["fit"]
    assert set(fit) == {"risk_group", "clinical", "model1", "frax", "model2"}
    assert fit["model1"]["lr_chi2"] > fit["risk_group"]["lr_chi2"] and fit["model2"]["lr_chi2"] > fit["risk_group"]["lr_chi2"]


def test_fracture_score_models_cross_validated_td_auroc(cohort):
    """Out-of-fold CoxPH: td-AUROC at 1, 5, 10 years and mean; the scores carry the simulated signal."""
    res = fracture_score_models(cohort, folds=5, seed=0)
    models = res["models"]
    assert set(models) == {"fracture_scores", "fracture_scores_clinical", "frax"}
    scores = models["fracture_scores"]
    assert set(scores["td_auroc"]) == {"1y", "5y", "10y"} and 0.6 < scores["td_auroc_mean"] < 1
    assert scores["c_index"] > 0.6 and models["frax"]["c_index"] > 0.55
    again = fracture_score_models(cohort, folds=5, seed=0)
    assert again["models"]["frax"]["c_index"] == models["frax"]["c_index"]  # deterministic given the seed


def test_evaluate_renders_the_diffx_tables(cohort, tmp_path):
    """`raypipe evaluate` on Diff-X predictions shows Tables 4 and 5, pairwise log-rank and the CV models."""
    from raypipe.evaluate import evaluate
    from raypipe.predictions import write_predictions

    preds = cohort.assign(study_id=cohort["patient_id"] + "_s", split="test", fold=-1, model="diffx",
                          score=cohort["gpvf"], score_kind="probability")
    write_predictions(preds, str(tmp_path / "predictions.parquet"), {"model": "diffx"})
    evaluate(str(tmp_path / "predictions.parquet"), tmp_path / "eval", n_boot=20)
    html = (tmp_path / "eval" / "report.html").read_text()
    for title in ("thesis Table 4", "thesis Table 5", "pairwise log-rank", "fracture-score CoxPH models",
                  "fracture-score DeepSurv models", "2) Fracture scores + age, sex, BMI"):
        assert title in html
    assert "Not computed" not in html
    assert "per 1 SD increase" in html and "per 0.1-point increase" in html and "Model 2 (+ FRAX)" in html


def test_fracture_score_td_auroc_and_c_agree_with_scikit_survival_and_lifelines(cohort):
    """Out-of-fold CoxPH scores recomputed here with lifelines per fold; td-AUROC with sksurv, C with lifelines."""
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    res = fracture_score_models(cohort, folds=5, seed=0, method="coxph")["models"]["fracture_scores_clinical"]
    data, _ = covariate_frame(cohort)
    fold, _ = participant_folds(cohort, 5, 0)
    covs = ["bpvf", "gpvf", "age", "sex", "bmi"]
    lp = np.empty(len(data))
    for k in range(5):
        cph = CoxPHFitter().fit(data.loc[fold != k, ["time", "event", *covs]], "time", "event")
        lp[fold == k] = cph.predict_log_partial_hazard(data.loc[fold == k, covs]).to_numpy()
    oof = out_of_fold_scores(data, covs, fold, "coxph")
    np.testing.assert_allclose(oof["score"].to_numpy(), lp, rtol=1e-10)
    t, e = data["time"].to_numpy(float), data["event"].to_numpy(bool)
    y = Surv.from_arrays(e, t)
    horizons = [365.25, 5 * 365.25, 10 * 365.25]
    usable = [h for h in horizons if t.min() < h < t.max()]
    auc, mean = cumulative_dynamic_auc(y, y, lp, usable)
    assert [res["td_auroc"][f"{h / 365.25:g}y"] for h in usable] == pytest.approx(list(auc), abs=1e-12)
    assert res["td_auroc_mean"] == pytest.approx(mean, abs=1e-12)
    assert res["c_index"] == pytest.approx(concordance_index(t, -lp, e), abs=1e-9)


def test_deepsurv_fracture_score_models(cohort):
    """DeepSurv variant (thesis Figure 17): same folds and outputs as CoxPH; it learns the simulated risk."""
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    ds = fracture_score_models(cohort, folds=5, seed=0, method="deepsurv")
    cox = fracture_score_models(cohort, folds=5, seed=0, method="coxph")
    assert ds["method"] == "deepsurv" and set(ds["models"]) == set(cox["models"])
    for name, m in ds["models"].items():
        assert set(m["td_auroc"]) == {"1y", "5y", "10y"}
        assert abs(m["c_index"] - cox["models"][name]["c_index"]) < 0.07, name  # linear truth: both near optimal
    assert ds["models"]["fracture_scores"]["td_auroc_mean"] > 0.6
    data, _ = covariate_frame(cohort)
    fold, _ = participant_folds(cohort, 5, 0)
    oof = out_of_fold_scores(data, ["frax_mof"], fold, "deepsurv")
    y = Surv.from_arrays(oof["event"].to_numpy(bool), oof["time"].to_numpy(float))
    _, mean = cumulative_dynamic_auc(y, y, oof["score"].to_numpy(), [365.25, 5 * 365.25, 10 * 365.25])
    assert ds["models"]["frax"]["td_auroc_mean"] == pytest.approx(mean, abs=1e-12)
    again = fracture_score_models(cohort, folds=5, seed=0, method="deepsurv")
    assert again["models"]["frax"]["c_index"] == ds["models"]["frax"]["c_index"]  # seeded


def test_fracture_score_models_use_the_image_models_cv_folds(cohort):
    """A ``fold`` column (out-of-fold image-model predictions) defines the folds; no participant scores itself."""
    from lifelines import CoxPHFitter

    folded = cohort.assign(fold=np.arange(len(cohort)) % 3)
    res = fracture_score_models(folded, method="coxph")
    assert res["folds"] == 3 and res["fold_source"].startswith("fold column")
    data, _ = covariate_frame(folded)
    fold, _ = participant_folds(folded)
    np.testing.assert_array_equal(fold, folded["fold"].to_numpy())
    oof = out_of_fold_scores(data, ["frax_mof"], fold, "coxph")
    held = fold == 1
    cph = CoxPHFitter().fit(data.loc[~held, ["time", "event", "frax_mof"]], "time", "event")
    np.testing.assert_allclose(oof["score"].to_numpy()[held],
                               cph.predict_log_partial_hazard(data.loc[held, ["frax_mof"]]).to_numpy(), rtol=1e-10)


def test_deepsurv_mlp_fits_and_validates_its_input():
    from raypipe.baselines.deepsurv_mlp import DeepSurvMLP

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    t = rng.exponential(np.exp(-(1.0 * x[:, 0] - 0.5 * x[:, 1])))
    e = rng.random(300) < 0.8
    net = DeepSurvMLP(epochs=150, seed=1).fit(x, t, e)
    assert net.loss_history_[-1] < net.loss_history_[0]
    risk = net.log_risk(x)
    assert np.corrcoef(risk, x[:, 0] - 0.5 * x[:, 1])[0, 1] > 0.8
    np.testing.assert_array_equal(DeepSurvMLP(epochs=150, seed=1).fit(x, t, e).log_risk(x), risk)
    with pytest.raises(ValueError, match="no events"):
        DeepSurvMLP(epochs=5).fit(x, t, np.zeros(300))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        net.log_risk(x[:, :1])


def test_age_regression_matches_scipy():
    """The thesis's age check: R-square of predicted on prompted age (0.841 in the thesis), slope, MAE."""
    from scipy.stats import linregress

    rng = np.random.default_rng(2)
    prompted = rng.uniform(50, 90, 200)
    predicted = 5 + 0.9 * prompted + rng.normal(0, 4, 200)
    r = age_regression(prompted, predicted)
    ref = linregress(prompted, predicted)
    assert r.n == 200 and r.r_squared == pytest.approx(ref.rvalue ** 2) and r.slope == pytest.approx(ref.slope)
    assert r.intercept == pytest.approx(ref.intercept) and r.mae == pytest.approx(np.abs(predicted - prompted).mean())
    with pytest.raises(ValueError, match="one length"):
        age_regression(prompted, predicted[:-1])
    with pytest.raises(ValueError, match="varying"):
        age_regression([70, 70, 70], [60, 65, 70])
