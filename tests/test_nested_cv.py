"""Nested model selection: nothing chosen in a CV fold (checkpoint, early stopping, cut-off) sees its held-out labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe.data.splits import TUNE_ROLE, nested_fold_roles
from tests.test_train_ct import _tiny_cfg, write_planted_shards

LABELS = ("fracture_5y", "time_days", "event", "prevalent_fracture")


def _permute_labels(src: Path, dst: Path, patients: set[str], seed: int) -> None:
    """Copy shards with the label columns of `patients` permuted among themselves (images untouched)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401  (registers the tensor extension type for reading)

    dst.mkdir(parents=True)
    tables = {f.name: pq.read_table(f) for f in sorted(src.glob("part-*.parquet"))}
    whole = pa.concat_tables(tables.values()).select(["patient_id", *LABELS]).to_pandas()
    rows = np.flatnonzero(whole["patient_id"].isin(patients).to_numpy())
    perm = np.random.default_rng(seed).permutation(rows)
    assert (perm != rows).any()
    shuffled = whole.copy()
    shuffled.loc[rows, list(LABELS)] = whole.loc[perm, list(LABELS)].to_numpy()
    start = 0
    for name, table in tables.items():
        part = shuffled.iloc[start:start + table.num_rows]
        start += table.num_rows
        for col in LABELS:
            idx = table.schema.get_field_index(col)
            table = table.set_column(idx, col, pa.array(part[col].to_numpy(), type=table.schema.field(col).type))
        pq.write_table(table, dst / name)


def test_inner_split_uses_training_patients_only() -> None:
    meta = pd.DataFrame({"patient_id": [f"P{i}" for i in range(40)], "study_id": [f"S{i}" for i in range(40)],
                         "fracture_5y": [float(i % 4 == 0) for i in range(40)]})
    fold = {"train": [f"P{i}" for i in range(30)], "val": [f"P{i}" for i in range(30, 40)]}
    role = nested_fold_roles(meta, fold, "fracture_5y", seed=3, inner_fraction=0.2)
    tune = set(meta.loc[(role == TUNE_ROLE).to_numpy(), "patient_id"])
    assert tune and tune <= set(fold["train"]) and len(tune) == 6
    assert (role[meta["patient_id"].isin(fold["val"]).to_numpy()] == "val").all()
    assert meta.loc[(role == TUNE_ROLE).to_numpy(), "fracture_5y"].sum() >= 1  # stratified: positives in tune
    flipped = meta.assign(fracture_5y=np.where(meta["patient_id"].isin(fold["val"]), 1 - meta["fracture_5y"],
                                               meta["fracture_5y"]))
    assert nested_fold_roles(flipped, fold, "fracture_5y", seed=3, inner_fraction=0.2).equals(role)


def test_fold_predictions_ignore_held_out_labels(ray_session, tmp_path: Path) -> None:
    """Permute the held-out fold's labels: its predictions and its chosen cut-off stay exactly the same."""
    from raypipe.predictions import read_predictions
    from raypipe.train.ct import fit_ct_fold
    from raypipe.train.fold import FoldTask
    from raypipe.tune.cv import fold_recalibration, youden_cutoff

    truth = write_planted_shards(tmp_path / "shards", 48, seed=11)
    patients = sorted(truth["patient_id"])
    held_out = patients[::4]
    fold = {"train": [p for p in patients if p not in held_out], "val": held_out}
    _permute_labels(tmp_path / "shards", tmp_path / "permuted", set(held_out), seed=5)
    cfg = _tiny_cfg(epochs=3, patience=3, val_fraction=0.25, n_boot=10, display_name="cnn_rnn_bone")
    runs = {}
    for name in ("shards", "permuted"):
        task = FoldTask(fold=0, n_folds=4, config=cfg, data_dir=str(tmp_path / name), out_dir=str(tmp_path / f"fold_{name}"),
                        patients=fold)
        fit_ct_fold(task)
        runs[name] = read_predictions(tmp_path / f"fold_{name}" / "predictions.parquet")
    a, b = (runs[n].sort_values(["split", "study_id"]).reset_index(drop=True) for n in ("shards", "permuted"))
    assert set(a["split"]) == {"val", TUNE_ROLE}
    assert sorted(a.loc[a["split"] == "val", "patient_id"]) == sorted(held_out)
    assert a["study_id"].tolist() == b["study_id"].tolist()
    np.testing.assert_array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    val_a, val_b = a[a["split"] == "val"], b[b["split"] == "val"]
    assert not val_a["fracture_5y"].equals(val_b["fracture_5y"])  # the labels really differ
    cut_a, cut_b = youden_cutoff(a[a["split"] == TUNE_ROLE]), youden_cutoff(b[b["split"] == TUNE_ROLE])
    assert np.isfinite(cut_a) and cut_a == cut_b
    cal_a, cal_b = fold_recalibration(a[a["split"] == TUNE_ROLE]), fold_recalibration(b[b["split"] == TUNE_ROLE])
    assert cal_a.n > 0 and cal_a == cal_b  # the pooling's recalibration is chosen on training patients too


def test_evaluate_reports_out_of_fold_and_external_side_by_side(tmp_path: Path) -> None:
    """`raypipe evaluate` on CV predictions: both sets in metrics.json; cut-offs from the rows' training side."""
    from raypipe import metrics as M
    from raypipe.evaluate import evaluate_frame

    rng = np.random.default_rng(0)
    parts = []
    for split, n, fold, name in (("val", 120, True, "m"), ("external", 60, False, "m@external")):
        y = (rng.random(n) < 0.4).astype(float)
        score = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1, n))))
        parts.append(pd.DataFrame({
            "patient_id": [f"{split}{i}" for i in range(n)], "study_id": [f"{split}{i}" for i in range(n)],
            "split": split, "fold": (np.arange(n) % 3) if fold else -1, "model": name, "score": score,
            "score_kind": "probability", "fracture_5y": y,
            "threshold": (0.4 + 0.05 * (np.arange(n) % 3)) if fold else 0.5}))
    df = pd.concat(parts, ignore_index=True)
    ev = evaluate_frame(df, n_boot=20)
    assert set(ev.metrics["models"]) == {"m", "m@external"} and ev.splits == ["val", "external"]
    oof = df[df["split"] == "val"]
    expected = M.binary_metrics(oof["fracture_5y"].to_numpy(int), (oof["score"] - oof["threshold"]).to_numpy(), 0.0)
    assert ev.metrics["models"]["m"]["sensitivity"]["value"] == pytest.approx(expected.sensitivity)
    res = {r.name: r for r in ev.models}
    assert "training patients" in res["m"].threshold_source and res["m@external"].threshold == 0.5


def _fold_frame(fold: int, offset: float, seed: int) -> pd.DataFrame:
    """One fold model's rows: a probability model whose logit is off by `offset`, and a Cox model (log-risk)."""
    rng = np.random.default_rng(seed)
    parts = []
    for split, n in (("tune", 80), ("val", 60), ("external", 40)):
        y = (rng.random(n) < 0.25).astype(float)
        z = 1.2 * y + rng.normal(-1.5, 1.0, n)
        ids = [f"{'x' if split == 'external' else f'f{fold}{split}'}{i}" for i in range(n)]
        base = {"patient_id": ids, "study_id": ids, "split": split, "fold": fold, "fracture_5y": y}
        parts.append(pd.DataFrame({**base, "model": "cnn", "score": 1 / (1 + np.exp(-(z + offset))),
                                   "score_kind": "probability"}))
        parts.append(pd.DataFrame({**base, "model": "cox", "score": z + offset, "score_kind": "log_risk"}))
    return pd.concat(parts, ignore_index=True)


def test_fold_probabilities_are_recalibrated_on_tune_rows_only() -> None:
    """Per-fold Platt scaling: fitted on `tune` (training patients), monotone, blind to held-out labels."""
    from raypipe import metrics as M
    from raypipe.tune.cv import recalibrate_fold

    raw = _fold_frame(0, offset=-1.5, seed=1)
    out = recalibrate_fold(raw, 0)
    cnn, tune = raw["model"] == "cnn", raw["split"] == "tune"
    cal = M.fit_logistic_recalibration(raw.loc[cnn & tune, "fracture_5y"], raw.loc[cnn & tune, "score"])
    assert cal.intercept > 0.5  # the offset is undone
    np.testing.assert_allclose(out.loc[cnn, "score"], cal(raw.loc[cnn, "score"]))
    np.testing.assert_array_equal(out.loc[~cnn, "score"], raw.loc[~cnn, "score"])  # log-risk: no scale to fix
    val = cnn & (raw["split"] == "val")
    assert M.auroc(raw.loc[val, "fracture_5y"], out.loc[val, "score"]) == pytest.approx(
        M.auroc(raw.loc[val, "fracture_5y"], raw.loc[val, "score"]))
    permuted = raw.copy()
    held = permuted["split"] != "tune"
    labels = permuted.loc[held, "fracture_5y"].to_numpy()
    permuted.loc[held, "fracture_5y"] = np.random.default_rng(2).permutation(labels)
    np.testing.assert_array_equal(recalibrate_fold(permuted, 0)["score"], out["score"])


def test_pooled_out_of_fold_scores_share_one_scale(tmp_path: Path) -> None:
    """Fold models on different scales: pooling raw scores loses AUROC that the recalibrated pooling keeps."""
    from raypipe import metrics as M
    from raypipe.predictions import write_predictions
    from raypipe.tune.cv import FoldPlan, collect_predictions, fold_dir

    frames = [_fold_frame(k, offset, seed=10 + k) for k, offset in enumerate((-2.0, 0.0, 2.0))]
    plan = FoldPlan(3, 0, "fracture_5y", {p: k for k, f in enumerate(frames)
                                          for p in f.loc[f["split"] == "val", "patient_id"]},
                    external=tuple(sorted(set(frames[0].loc[frames[0]["split"] == "external", "patient_id"]))))
    for k, f in enumerate(frames):
        d = Path(fold_dir(str(tmp_path), k))
        d.mkdir(parents=True)
        write_predictions(f, d / "predictions.parquet")
    pooled = collect_predictions(str(tmp_path), plan)
    oof = pooled[(pooled["model"] == "cnn") & (pooled["split"] == "val")]
    raw = pd.concat(frames)
    raw = raw[(raw["model"] == "cnn") & (raw["split"] == "val")]
    per_fold = np.mean([M.auroc(g["fracture_5y"], g["score"]) for _, g in raw.groupby("fold")])
    auc_raw, auc_recal = M.auroc(raw["fracture_5y"], raw["score"]), M.auroc(oof["fracture_5y"], oof["score"])
    assert auc_raw < per_fold - 0.05 and abs(auc_recal - per_fold) < 0.03, (auc_raw, auc_recal, per_fold)
    ext = pooled[pooled["model"] == "cnn@external"]
    assert len(ext) == 40 and ext["threshold"].notna().all()
