"""k-fold CV of the CT CNN-RNN on real local Ray Tune: folds, out-of-fold and external predictions, resume,
metrics.json, Grad-CAM gallery in the report, and papers/000's CT tables.

One tiny CV (2 folds, 1 epoch, tiny CNN-RNN on 48 x 48 slices) serves every Ray test. Its first run is
interrupted on purpose: the fold-fit function registered for it fails once on fold 1, so Tune records an
errored trial and `run_cv` raises; the rerun on the same OUT restores the Tune experiment
(`Tuner.restore`) and must run fold 1 again but not fold 0 (counted in each fold's attempts.log).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe.tune.cv import CVConfig, assign_folds, split_development_external

N_DEV, N_EXT = 24, 6


def write_cv_shards(out: Path, n_dev: int, n_ext: int, seed: int = 0, side: int = 48) -> pd.DataFrame:
    """CT shards (`bone` only) whose trabecular intensity falls with a latent z that drives the label.

    Development patients come from site A, external ones from site B; a few labels are unknown.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowVariableShapedTensorArray

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:side, :side]
    body = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side * 0.3) ** 2
    rows, images = [], []
    for i in range(n_dev + n_ext):
        z = rng.normal()
        y5 = float(z + 0.5 * rng.normal() > 0.3)
        n = int(rng.integers(15, 19))
        vol = rng.normal(-0.8, 0.05, size=(n, side, side))
        vol[:, body] = (0.2 - 0.3 * z + rng.normal(0, 0.1, size=(n, side, side)))[:, body]
        images.append(vol.astype(np.float16))
        rows.append({"patient_id": f"P{i:03d}", "study_id": f"S{i:03d}", "site": "A" if i < n_dev else "B",
                     "split": "train", "time_days": float(rng.uniform(100, 1800) if y5 else rng.uniform(1900, 3000)),
                     "event": int(y5), "fracture_5y": y5 if i % 11 else np.nan,
                     "age": float(rng.normal(70, 8)), "sex": "F" if rng.random() < 0.7 else "M"})
    truth = pd.DataFrame(rows)
    table = pa.Table.from_pandas(truth, preserve_index=False)
    table = table.append_column("bone", ArrowVariableShapedTensorArray.from_numpy(images))
    table = table.append_column("slice_z_mm", pa.array([np.arange(len(v), dtype=np.float32) for v in images]))
    half = len(rows) // 2
    pq.write_table(table.slice(0, half), out / "part-00000.parquet")
    pq.write_table(table.slice(half), out / "part-00001.parquet")
    return truth


def _tiny_config():
    from raypipe.train.config import CTTrainConfig

    return CTTrainConfig(model="cnn_rnn_tiny", pretrained="none", model_kwargs={"dropout": 0.0}, input="bone", lr=3e-3, batch_size=16,
                         eval_batch_size=32, epochs=1, patience=1, num_workers=1, n_boot=50, shuffle_buffer=0,
                         max_failures=0)


@pytest.fixture(scope="module")
def cv_run(ray_session, tmp_path_factory):
    """A 2-fold CV whose first run is interrupted by a failing fold 1, then resumed on the same OUT."""
    from raypipe.tune import cv as cvmod

    root = tmp_path_factory.mktemp("cv_ct")
    truth = write_cv_shards(root / "shards", N_DEV, N_EXT)

    def flaky_fit(task):  # a closure: cloudpickle ships it to the trial by value
        import os

        from raypipe.train.ct import fit_ct_fold

        flag = os.path.join(task.out_dir, "failed_once")
        if task.fold == 1 and not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError("simulated interruption of fold 1")
        return fit_ct_fold(task)

    settings = CVConfig(folds=2, max_failures=0, gradcam_studies=2, n_boot=50, max_concurrent_trials=1)
    out = root / "out"
    with pytest.raises(RuntimeError, match=r"fold\(s\) \[1\] failed"):
        cvmod.run_cv("cnn-rnn", _tiny_config(), str(root / "shards"), str(out), settings, fold_fit=flaky_fit)
    first = {k: (out / "folds" / f"fold_{k:02d}" / "attempts.log").read_text().split() for k in (0, 1)}
    result = cvmod.run_cv("cnn-rnn", _tiny_config(), str(root / "shards"), str(out), settings, fold_fit=flaky_fit)
    return {"result": result, "truth": truth, "out": out, "first_attempts": first}


def test_first_run_was_interrupted_and_resume_skips_the_finished_fold(cv_run) -> None:
    out, first = cv_run["out"], cv_run["first_attempts"]
    assert len(first[0]) == 1 and len(first[1]) == 1
    after = {k: (out / "folds" / f"fold_{k:02d}" / "attempts.log").read_text().split() for k in (0, 1)}
    assert after[0] == first[0]  # fold 0's trial was not started again
    assert len(after[1]) == 2  # fold 1 ran again after the restore
    assert (out / "ray_results" / "cv").is_dir()
    for k in (0, 1):
        info = json.loads((out / "folds" / f"fold_{k:02d}" / "fold.json").read_text())
        assert info["fold"] == k and info["metrics"]["n_val_patients"] > 0


def test_out_of_fold_predictions_cover_every_development_patient_once(cv_run) -> None:
    from raypipe.predictions import read_predictions

    res, truth, out = cv_run["result"], cv_run["truth"], cv_run["out"]
    preds = read_predictions(out / "predictions.parquet")
    oof = preds[preds["model"] == "cnn_rnn_bone"]
    dev_ids = sorted(truth.loc[truth["site"] == "A", "patient_id"])
    assert sorted(oof["patient_id"]) == dev_ids
    assert oof["split"].eq("val").all()
    assert (oof["patient_id"].map(res.plan.fold_of) == oof["fold"]).all()
    assert set(oof["fold"]) == {0, 1}
    assert oof["score"].between(0, 1).all()
    # the labels travel with the predictions, unknown ones stay unknown
    merged = oof.merge(truth, on="study_id", suffixes=("", "_t"))
    assert merged["fracture_5y"].isna().equals(merged["fracture_5y_t"].isna())


def test_external_set_is_scored_by_the_mean_of_the_fold_models(cv_run) -> None:
    from raypipe.predictions import read_predictions
    from raypipe.tune.cv import recalibrate_fold

    truth, out = cv_run["truth"], cv_run["out"]
    preds = read_predictions(out / "predictions.parquet")
    ext = preds[preds["model"] == "cnn_rnn_bone@external"].set_index("study_id")
    assert sorted(ext["patient_id"]) == sorted(truth.loc[truth["site"] == "B", "patient_id"])
    assert ext["fold"].eq(-1).all() and ext["split"].eq("external").all()
    # each fold model's probabilities are first put on one scale by its own tune rows (Platt), then averaged
    per_fold = [recalibrate_fold(read_predictions(out / "folds" / f"fold_{k:02d}" / "predictions.parquet"), k)
                for k in (0, 1)]
    scores = [f[(f["split"] == "external") & (f["model"] == "cnn_rnn_bone")].set_index("study_id")["score"]
              for f in per_fold]
    expected = (scores[0] + scores[1]) / 2
    assert np.allclose(ext.loc[expected.index, "score"], expected)
    oof = preds[preds["model"] == "cnn_rnn_bone"].set_index("study_id")["score"]
    for f in per_fold:
        val = f[(f["split"] == "val") & (f["model"] == "cnn_rnn_bone")].set_index("study_id")["score"]
        assert np.allclose(oof.loc[val.index], val)


def test_metrics_json_has_both_sets_with_cis(cv_run) -> None:
    out = cv_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"models", "comparisons"}
    for name in ("cnn_rnn_bone", "cnn_rnn_bone@external"):
        entry = metrics["models"][name]
        for key in ("auroc", "accuracy", "sensitivity", "specificity"):
            assert set(entry[key]) == {"value", "ci_low", "ci_high"}
            assert 0.0 <= entry[key]["value"] <= 1.0
    assert cv_run["result"].metrics == metrics
    assert (out / "folds.csv").is_file() and (out / "metrics.csv").is_file() and (out / "config.yaml").is_file()


def test_gradcam_grids_are_written_and_shown_in_the_report(cv_run, tmp_path) -> None:
    from PIL import Image

    from raypipe.evaluate import evaluate

    out = cv_run["out"]
    pngs = sorted((out / "gradcam").glob("*.png"))
    assert len(pngs) == 2 and pngs == sorted(Path(p) for p in cv_run["result"].gradcam)
    index = json.loads((out / "gradcam" / "index.json").read_text())
    assert set(index) == {p.name for p in pngs} and all(v["slices"] == 14 for v in index.values())
    with Image.open(pngs[0]) as img:  # 2 rows x 7 slices of 48 x 48 with 2-pixel gaps
        assert img.size == (7 * 48 + 6 * 2, 2 * 48 + 2) and img.mode == "RGB"
    evaluate(out / "predictions.parquet", tmp_path / "report", n_boot=20)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Grad-CAM" in html
    assert (tmp_path / "report" / "gradcam_cnn_rnn_bone_external.png").is_file()


# ---------------------------------------------------------------------------------------------- no Ray below
def test_folds_are_patient_level_stratified_and_seeded() -> None:
    rng = np.random.default_rng(3)
    n = 60
    meta = pd.DataFrame({"patient_id": [f"P{i // 2:03d}" for i in range(2 * n)],  # two studies per patient
                         "study_id": [f"S{i:03d}" for i in range(2 * n)],
                         "site": ["A"] * 100 + ["B"] * 20, "split": ["train"] * 90 + ["test"] * 30})
    y = rng.random(n) < 0.3
    meta["fracture_5y"] = np.repeat(y.astype(float), 2)
    plan = assign_folds(meta, 5, seed=7, label="fracture_5y")
    assert plan == assign_folds(meta, 5, seed=7, label="fracture_5y")
    assert plan.fold_of != assign_folds(meta, 5, seed=8, label="fracture_5y").fold_of
    dev, ext = split_development_external(meta)
    assert ext == sorted(meta.loc[meta["split"].eq("test") | meta["site"].eq("B"), "patient_id"].unique())
    assert sorted(plan.fold_of) == dev and plan.external == tuple(ext)
    pos = {p for p, v in zip([f"P{i:03d}" for i in range(n)], y) if v}
    per_fold = pd.Series({p: f for p, f in plan.fold_of.items() if p in pos}).value_counts()
    assert per_fold.max() - per_fold.min() <= 1
    sizes = pd.Series(plan.fold_of).value_counts()
    assert sizes.max() - sizes.min() <= 1
    roles = plan.patients(2)
    assert not set(roles["train"]) & set(roles["val"]) and set(roles["external"]) == set(ext)


def test_fit_ct_fold_hook_maps_patients_to_roles() -> None:
    from raypipe.data.splits import roles_from_fold

    meta = pd.DataFrame({"patient_id": ["a", "a", "b", "c", "d"], "study_id": list("12345")})
    role = roles_from_fold(meta, {"train": ["a"], "val": ["b"], "external": ["c"]})
    assert role.tolist() == ["train", "train", "val", "external", ""]
    with pytest.raises(ValueError, match="both"):
        roles_from_fold(meta, {"train": ["a"], "val": ["a"]})
    with pytest.raises(ValueError, match="non-empty"):
        roles_from_fold(meta, {"train": ["a"], "val": []})


def _fake_set(rng: np.random.Generator, n: int, strengths: dict[str, float], split: str, fold: bool,
              suffix: str = "") -> pd.DataFrame:
    """Predictions of several models on one set of n patients: score = strength * y + noise."""
    y = (rng.random(n) < 0.35).astype(float)
    parts = []
    for name, s in strengths.items():
        score = 1 / (1 + np.exp(-(s * (2 * y - 1) + rng.normal(0, 1, n))))
        parts.append(pd.DataFrame({"patient_id": [f"{split}{i}" for i in range(n)],
                                   "study_id": [f"{split}{i}_CT" for i in range(n)], "split": split,
                                   "fold": (np.arange(n) % 3) if fold else -1, "model": name + suffix,
                                   "score": score, "score_kind": "probability", "fracture_5y": y}))
    return pd.concat(parts, ignore_index=True)


def test_report_shows_papers_ct_tables(tmp_path) -> None:
    from raypipe import metrics as M
    from raypipe.evaluate import evaluate
    from raypipe.predictions import write_predictions
    from raypipe.evaluate import paper_ct_tables

    rng = np.random.default_rng(0)
    strengths = {"cnn_rnn_bone_muscle": 1.6, "cnn_rnn_bone": 1.1, "clinical_A": 0.5, "clinical_D": 0.7,
                 "frax_mof": 0.4}
    dev = _fake_set(rng, 160, strengths, "val", fold=True)
    ext = _fake_set(rng, 80, strengths, "external", fold=False, suffix="@external")
    frame = pd.concat([ext, dev], ignore_index=True)
    write_predictions(frame, tmp_path / "predictions.parquet")

    tables = paper_ct_tables(frame, n_boot=50)
    assert [t.caption.rsplit(" (papers", 1)[0] for t in tables] == ["Image models: bone only vs bone + muscle",
                                                          "Image (bone + muscle) vs clinical models"]
    rows4 = list(tables[1].rows)
    split_at = [r[0] for r in rows4].index("External validation set")
    assert rows4[0][0] == "Development set"
    table4 = {row[0]: row for row in rows4[1:split_at]}  # the development set
    assert table4["Image: bone + muscle"][2] == "Reference"
    rows = dev[dev["model"] == "clinical_D"]
    expected = M.auroc(rows["fracture_5y"].astype(int), rows["score"])
    assert table4["Clinical model D"][1].startswith(f"{expected:.3f}")
    bm = dev[dev["model"] == "cnn_rnn_bone_muscle"].set_index("study_id")
    p = M.delong_test(bm["fracture_5y"].astype(int), bm["score"], rows.set_index("study_id").loc[bm.index, "score"])
    from raypipe.report.html import fmt_p

    assert table4["Clinical model D"][2] == fmt_p(p.p_value)

    evaluate(tmp_path / "predictions.parquet", tmp_path / "report", n_boot=50)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "CT: image vs clinical models" in html and "Clinical model D" in html and "FRAX (MOF)" in html
