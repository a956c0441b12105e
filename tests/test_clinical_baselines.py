"""Clinical baselines of papers/000: variable sets A-D, XGBoost CV with the image folds, FRAX, prediction schema.

The cohort is the synthetic generator's clinical part (`draw_clinical`, no images): its Cox model
(docs/synthetic_cohort.md) gives glucocorticoid use a direct hazard ratio of exp(0.60) plus a lower planted
bone density, BMI a protective term, and secondary osteoporosis and smoking lower density; HIV and
hepatitis C carry no signal at all. So model D (which adds them to age and sex) must not lose to model A.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raypipe.metrics import auroc
from raypipe.models.clinical import CLINICAL_MODELS, ClinicalModel, clinical_features, frax_probability
from raypipe.predictions import validate_predictions
from raypipe.tune.baselines import clinical_cv_predictions
from raypipe.tune.cv import assign_folds


def synthetic_clinical_cohort(n: int, seed: int = 0) -> pd.DataFrame:
    """One CT row per synthetic patient (clinical columns, FRAX, outcome, site), without rendering images."""
    from raypipe.data.synth.cohort import draw_clinical

    rows = []
    for i in range(n):
        row = draw_clinical(seed, i).row()
        row["study_id"] = f"{row['patient_id']}_CT"
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return synthetic_clinical_cohort(2000)


def test_variable_sets_are_the_papers() -> None:
    assert CLINICAL_MODELS["A"] == ("age", "sex")
    assert CLINICAL_MODELS["B"] == ("age", "sex", "bmi")
    assert set(CLINICAL_MODELS["C"]) == {"age", "sex", "bmi", "glucocorticoid", "alcohol", "smoker",
                                         "secondary_osteoporosis"}
    assert set(CLINICAL_MODELS["D"]) == set(CLINICAL_MODELS["C"]) | {"t2dm", "hiv", "hcv", "renal_failure"}
    for small, big in zip("ABC", "BCD"):
        assert set(CLINICAL_MODELS[small]) < set(CLINICAL_MODELS[big])
    assert ClinicalModel.paper("D").variables == CLINICAL_MODELS["D"]
    with pytest.raises(ValueError, match="one of"):
        ClinicalModel.paper("E")


def test_features_encode_sex_and_keep_missing() -> None:
    frame = pd.DataFrame({"age": [70.0, None], "sex": ["F", "M"], "t2dm": [True, 0]})
    x = clinical_features(frame, ["age", "sex", "t2dm"])
    assert x[0].tolist() == [70.0, 1.0, 1.0] and x[1, 1:].tolist() == [0.0, 0.0] and np.isnan(x[1, 0])
    with pytest.raises(ValueError, match="hiv"):
        clinical_features(frame, ["hiv"])
    assert frax_probability(pd.DataFrame({"frax_mof": [12.5, None]})).tolist()[0] == pytest.approx(0.125)


def test_model_d_is_not_worse_than_a_and_uses_glucocorticoids(cohort: pd.DataFrame) -> None:
    """Out-of-fold AUROC of D >= A (D adds variables the Cox model uses); GC carries more gain than HIV/HCV."""
    plan = assign_folds(cohort, 5, seed=0, label="fracture_5y")
    preds = clinical_cv_predictions(cohort, plan, models=("A", "D"), frax=(), use_ray=False)
    dev = preds[(preds["split"] == "val") & preds["fracture_5y"].notna()]
    au = {m: auroc(g["fracture_5y"].astype(int), g["score"]) for m, g in dev.groupby("model")}
    assert au["clinical_A"] > 0.6
    assert au["clinical_D"] >= au["clinical_A"]
    train = cohort[cohort["patient_id"].isin(plan.fold_of)]
    d = ClinicalModel.paper("D").fit(train, train["fracture_5y"])
    gain = d.booster_.get_booster().get_score(importance_type="total_gain")
    names = dict(zip([f"f{i}" for i in range(len(d.variables))], d.variables))
    by_name = {names[k]: v for k, v in gain.items()}
    assert by_name.get("glucocorticoid", 0) > by_name.get("hiv", 0) + by_name.get("hcv", 0)


def test_cv_predictions_follow_the_schema_and_folds(cohort: pd.DataFrame) -> None:
    small = cohort.iloc[:300]
    plan = assign_folds(small, 3, seed=1, label="fracture_5y")
    preds = validate_predictions(clinical_cv_predictions(small, plan, models=("A", "B"), use_ray=False))
    assert set(preds["model"]) == {"clinical_A", "clinical_B", "frax_mof", "frax_hip", "clinical_A@external",
                                   "clinical_B@external", "frax_mof@external", "frax_hip@external"}
    assert preds["score_kind"].eq("probability").all()
    for name in ("clinical_A", "frax_mof"):
        oof = preds[preds["model"] == name]
        assert sorted(oof["patient_id"]) == sorted(plan.fold_of)  # every development patient exactly once
        assert (oof["patient_id"].map(plan.fold_of) == oof["fold"]).all()
        ext = preds[preds["model"] == f"{name}@external"]
        assert sorted(ext["patient_id"]) == sorted(plan.external) and ext["fold"].eq(-1).all()
        assert ext["split"].eq("external").all()
    frax = preds[preds["model"] == "frax_mof"].merge(small, on="study_id", suffixes=("", "_src"))
    assert np.allclose(frax["score"], frax["frax_mof_src"] / 100)


def test_folds_run_as_ray_tasks_and_match_the_serial_run(ray_session, cohort: pd.DataFrame) -> None:
    small = cohort.iloc[:400]
    plan = assign_folds(small, 3, seed=0, label="fracture_5y")
    serial = clinical_cv_predictions(small, plan, models=("A", "C"), frax=(), use_ray=False)
    parallel = clinical_cv_predictions(small, plan, models=("A", "C"), frax=(), use_ray=True)
    pd.testing.assert_frame_equal(serial, parallel)
