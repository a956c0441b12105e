"""The thesis's Diff-X survival tables (raypipe.metrics.diffx) on a cohort simulated with known hazard ratios."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypipe.metrics import risk_groups
from raypipe.metrics.diffx import fracture_score_models, pairwise_logrank, table4, table5

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
    for title in ("thesis Table 4", "thesis Table 5", "pairwise log-rank", "fracture-score CoxPH models"):
        assert title in html
    assert "Not computed" not in html
    assert "per 1 SD increase" in html and "per 0.1-point increase" in html and "Model 2 (+ FRAX)" in html
