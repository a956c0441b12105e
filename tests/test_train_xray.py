"""X-ray branch on real local Ray: DeepSurv near the synthetic ceiling, pycox heads, CV, Tune, keypoints.

One synthetic X-ray cohort of 500 patients (`conftest.xray_cohort`) is drawn per test session and
preprocessed once to L1-L5 patch shards at 64 x 64 (the tiny configs' input). Ground truth of the cohort's Cox model
(docs/synthetic_cohort.md): `true_clinical_lp` (age, sex, BMI, glucocorticoid, prior fracture) and
`true_image_lp` (the radiograph's planted density and deformity); an X-ray model can at best reach the
C-index of `true_clinical_lp + true_image_lp` (the "X-ray ceiling"; `true_lp` adds muscle fat, which a
radiograph does not show).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml


@pytest.fixture(scope="module")
def cohort(xray_cohort, ray_session) -> tuple[Path, Path]:
    return xray_cohort


def _cfg(**kw):
    from raypipe.train.xray_config import DeepSurvConfig

    base = dict(model="deepsurv_tiny", pretrained="none", model_kwargs={"dropout": 0.0}, lr=3e-3, batch_size=64, eval_batch_size=64,
                epochs=8, patience=8, shuffle_buffer=0, num_workers=1, max_failures=0, n_boot=50)
    return DeepSurvConfig(**{**base, **kw})


def _c(t, e, s) -> float:
    from raypipe.metrics import c_index

    return c_index(np.asarray(t, float), np.asarray(e, int), np.asarray(s, float)).value


def test_deepsurv_image_clinical_near_xray_ceiling(cohort, tmp_path):
    """Held-out Harrell C of image + clinical DeepSurv within 0.05 of the X-ray ceiling on the same rows.

    The model sees clinical model 3's variables plus prior fracture and the 5 L1-L5 patches; the ceiling is
    C(true_clinical_lp + true_image_lp) on the cohort's `test` patients (20 %). Also checks the run folder:
    files, the scorer's S(t) at 1..10 years and 5-year risk, and that model.pt rebuilds from model_meta.json.
    """
    import torch

    from raypipe.models.registry import build_model
    from raypipe.predictions import read_predictions
    from raypipe.train.deepsurv import fit_deepsurv

    manifest, shards = cohort
    cols = ["age", "sex", "bmi", "glucocorticoid", "secondary_osteoporosis", "prior_fracture"]
    # the committed tiny config's remedies (bench/RESULTS.md, issue 14): without the image scale and the per-study
    # flip/shift the 5 patches' features swamp the clinical ones and the held-out C swings 0.67-0.76 between seeds
    cfg = _cfg(variant="image_clinical", clinical_columns=cols, model_kwargs={"dropout": 0.0, "image_scale": 0.1},
               augment_flip=0.5, augment_shift=0.06, epochs=12, patience=12, shuffle_buffer=512)
    run = tmp_path / "run"
    fit_deepsurv(cfg, str(shards), str(run))
    for name in ("model.pt", "model_meta.json", "baseline_hazard.json", "config.yaml", "metrics.json",
                 "metrics.csv", "predictions.parquet", "preprocess.yaml"):
        assert (run / name).is_file(), name
    preds = read_predictions(run / "predictions.parquet")
    truth = pd.read_csv(manifest)[["study_id", "true_clinical_lp", "true_image_lp"]]
    test = preds[preds["split"] == "test"].merge(truth, on="study_id")
    model_c = _c(test["time_days"], test["event"], test["score"])
    ceiling = _c(test["time_days"], test["event"], test["true_clinical_lp"] + test["true_image_lp"])
    assert model_c >= ceiling - 0.05, (model_c, ceiling)

    surv = test[[f"surv_{y}y" for y in range(1, 11)]].to_numpy()
    assert np.all(np.diff(surv, axis=1) <= 1e-12) and np.all((surv > 0) & (surv <= 1))
    np.testing.assert_allclose(test["risk_5y"], 1 - test["surv_5y"], atol=1e-6)
    meta = json.loads((run / "model_meta.json").read_text())
    assert meta["task"] == "xray_survival" and meta["clinical"]["columns"] == cols
    assert meta["baseline_hazard"]["kind"] == "breslow"
    model = build_model(meta["builder"], **meta["kwargs"])
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["models"][cfg.name]["c_index"]["value"] - model_c) < 1e-9


# measured on the idle 2-core machine: cohort 54 s, image+clinical 88 s, each head about 45 s, CV 2 folds 129 s,
# Tune 2 trials 106 s, keypoints 202 s. The heads, CV and Tune run in `make test-slow` (the suite's 25-minute
# budget); `make test` keeps the heads' start from the Kaplan-Meier curve (test_xray_units) and the CT CV/Tune tests
@pytest.mark.slow
@pytest.mark.parametrize("head", ["logistic_hazard", "deephit", "coxtime"])
def test_pycox_heads_train_and_give_survival(cohort, tmp_path, head):
    """Each pycox head trains on the clinical variables and scores S(t) and the 5-year risk; C above chance."""
    from raypipe.predictions import read_predictions
    from raypipe.train.deepsurv import fit_deepsurv

    _, shards = cohort
    cfg = _cfg(variant="clinical", clinical_model=3, head=head, epochs=4, patience=4, num_durations=10)
    fit_deepsurv(cfg, str(shards), str(tmp_path / head))
    preds = read_predictions(tmp_path / head / "predictions.parquet")
    test = preds[preds["split"] == "test"]
    assert (test["score_kind"] == "probability").all() and test["score"].between(0, 1).all()
    surv = test[[f"surv_{y}y" for y in range(1, 11)]].to_numpy()
    assert np.all(np.diff(surv, axis=1) <= 1e-9)
    assert _c(test["time_days"], test["event"], test["score"]) > 0.55


@pytest.mark.slow
def test_cv_two_folds_out_of_fold_covers_every_patient_once(cohort, tmp_path):
    """`raypipe cv deepsurv --folds 2`: one Tune trial per fold; OOF predictions hold every patient once."""
    from raypipe.predictions import read_predictions
    from raypipe.tune.cv import cv_cli

    manifest, shards = cohort
    cfg = _cfg(variant="clinical", clinical_model=2, epochs=2, patience=2).model_dump(mode="json")
    cfg["cv"] = {"external": False, "max_concurrent_trials": 1, "gradcam_studies": 0, "n_boot": 20}
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cv_cli("deepsurv", str(path), 2, str(shards), str(tmp_path / "cv")).plan.n_folds == 2
    preds = read_predictions(tmp_path / "cv" / "predictions.parquet")
    oof = preds[preds["split"] == "val"]
    all_patients = set(pd.concat([pd.read_parquet(f, columns=["patient_id"]) for f in shards.glob("part-*.parquet")])
                       ["patient_id"].astype(str))
    assert all_patients == set(pd.read_csv(manifest, dtype=str)["patient_id"])
    assert set(oof["patient_id"]) == all_patients
    assert not oof.duplicated(["model", "patient_id"]).any() and set(oof["fold"]) == {0, 1}
    for k in (0, 1):
        assert (tmp_path / "cv" / "folds" / f"fold_{k:02d}" / "model.pt").is_file()


@pytest.mark.slow
def test_tune_two_trials_exports_best_config(cohort, tmp_path):
    """`raypipe tune deepsurv --trials 2`: Optuna + ASHA, results.csv with both trials, a loadable best config."""
    from raypipe.config import load_config
    from raypipe.train.xray_config import DeepSurvConfig
    from raypipe.tune.search import tune_cli

    _, shards = cohort
    base = _cfg(variant="clinical", clinical_model=1, epochs=2, patience=2).model_dump(mode="json")
    spec = {"base": base, "metric": "val_c_index", "mode": "max",
            "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                      "model_kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.3},
                      "model_kwargs.hidden_sizes": {"type": "choice", "values": [[8], [16, 8]]}},
            "asha": {"grace_period": 1}, "max_concurrent_trials": 1}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert tune_cli("deepsurv", str(path), 2, str(shards), str(tmp_path / "tune")) == 0
    table = pd.read_csv(tmp_path / "tune" / "results.csv")
    assert len(table) == 2 and table["best_val_c_index"].notna().any()
    best = load_config(DeepSurvConfig, tmp_path / "tune" / "best_config.yaml")
    assert 1e-3 <= best.lr <= 1e-2 and best.model_kwargs["hidden_sizes"] in ([8], [16, 8])


def _keypoint_cfg(**kw):
    from raypipe.train.xray_config import KeypointTrainConfig

    base = dict(model="keypoints_tiny", pretrained="none", input_size=128, heatmap_sigma=1.5, lr=2e-3, lr_min=1e-5, batch_size=16,
                eval_batch_size=32, epochs=8, patience=8, num_workers=1, max_failures=0, n_boot=50,
                rotation_deg=10.0, scale_range=(0.9, 1.1))
    return KeypointTrainConfig(**{**base, **kw})


def test_keypoints_reach_paper_oks_ap_on_held_out_radiographs(cohort, tmp_path):
    """Tiny HRNet (128 px, 8 epochs, spatial-softmax heatmaps): OKS-AP >= 0.9 on the cohort's test radiographs.

    The validation error also falls to under half that of the first epoch; the run folder holds the
    standard files and keypoint predictions for the held-out radiographs, and the model rebuilds from its meta.
    """
    import torch

    from raypipe.models.registry import build_model
    from raypipe.train.keypoints import fit_keypoints

    manifest, _ = cohort
    run = tmp_path / "kp"
    fit_keypoints(_keypoint_cfg(), str(manifest), str(run))
    for name in ("model.pt", "model_meta.json", "config.yaml", "metrics.json", "metrics.csv",
                 "keypoint_predictions.parquet"):
        assert (run / name).is_file(), name
    hist = pd.read_csv(run / "metrics.csv")
    assert hist["val_mean_error_px"].min() < 0.5 * hist["val_mean_error_px"].iloc[0], hist.to_dict("list")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["models"]["keypoints_tiny"]["oks_ap"]["value"] >= 0.9, metrics
    preds = pd.read_parquet(run / "keypoint_predictions.parquet")
    assert set(preds["split"]) == {"val", "test"} and (preds["confidence"].between(0, 1)).all()
    meta = json.loads((run / "model_meta.json").read_text())
    assert meta["builder"] == "keypoints_tiny" and meta["input_size"] == 128
    assert meta["kwargs"]["heatmap_kind"] == "softmax"
    model = build_model(meta["builder"], **meta["kwargs"])
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
