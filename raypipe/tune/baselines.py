"""Clinical baselines cross-validated with the image models' folds: XGBoost A-D (Ray tasks) and FRAX.

`run_clinical_cv` reads the cohort (a shards folder or a manifest), takes the folds of an image CV
(`folds.csv` of `raypipe cv`, or the same `assign_folds` call: same patients, label and seed give the
same folds), fits each (model, fold) as one Ray task (XGBoost with `n_jobs=1`, so tasks fill the CPUs),
and writes OUT/predictions.parquet in the prediction schema: out-of-fold rows `clinical_A`..`clinical_D`
(split `val`, fold k) and the external set scored by the mean of the fold models (`clinical_A@external`,
split `external`, fold -1); FRAX columns, when present, are scores without fitting (`frax_mof`,
`frax_hip`: % / 100, same rows and names). OUT/metrics.json has both sets (`raypipe.tune.cv.summarise`).
Thresholds for the threshold metrics (`threshold` column) are chosen on each fold's training patients
(Youden on the fold model's training scores); for the external set, on the out-of-fold rows.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from raypipe.models.clinical import CLINICAL_MODELS, FRAX_COLUMNS, ClinicalModel, frax_probability, model_name
from raypipe.data.subsets import shard_meta
from raypipe.tune.cv import DEV_SPLIT, EXTERNAL_SPLIT, EXTERNAL_SUFFIX, FoldPlan, assign_folds, youden_cutoff

log = logging.getLogger(__name__)


def load_cohort(path: str) -> pd.DataFrame:
    """One row per CT study with clinical columns: from a shards folder, or a manifest (its CT rows)."""
    from raypipe import storage

    if os.path.isdir(path) or (storage.is_uri(path) and not path.endswith((".csv", ".parquet"))):
        return shard_meta(path)
    frame = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    if "modality" in frame.columns and frame["modality"].eq("CT").any():
        frame = frame[frame["modality"] == "CT"]
    frame = frame.reset_index(drop=True)
    frame["patient_id"] = frame["patient_id"].astype(str)
    frame["study_id"] = frame["study_id"].astype(str)
    return frame


def plan_from_csv(path: str, seed: int = 0, label: str | None = None) -> FoldPlan:
    """The FoldPlan of a CV's `folds.csv` (patient_id, fold, set), to reuse its folds exactly."""
    from raypipe import storage
    from raypipe.tune.cv import io_bytes

    df = pd.read_csv(io_bytes(storage.read_bytes(path)), dtype={"patient_id": str})
    dev = df[df["set"] == "development"]
    return FoldPlan(n_folds=int(dev["fold"].max()) + 1, seed=seed, label=label,
                    fold_of=dict(zip(dev["patient_id"], dev["fold"].astype(int))),
                    external=tuple(df.loc[df["set"] == "external", "patient_id"]))


def fit_fold(frame: pd.DataFrame, letter: str, plan: FoldPlan, fold: int, label: str, seed: int,
             params: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One (model, fold): fit on the fold's training patients; scores of its validation and external rows,
    and the Youden cut-off of its scores on the training patients (a threshold never chosen on held-out rows)."""
    roles = plan.patients(fold)
    pid = frame["patient_id"].astype(str)
    train = frame[pid.isin(roles["train"])]
    model = ClinicalModel.paper(letter, seed=seed + fold, params=params).fit(train, train[label].to_numpy())
    val = frame[pid.isin(roles["val"])]
    ext = frame[pid.isin(roles.get("external", []))]
    cutoff = training_cutoff(train[label].to_numpy(dtype=float), model.predict_proba(train))
    return model.predict_proba(val), (model.predict_proba(ext) if len(ext) else np.zeros(0)), cutoff


def training_cutoff(y: np.ndarray, score: np.ndarray) -> float:
    """Youden cut-off on training rows with a known label (NaN without both classes)."""
    from raypipe import metrics as M

    keep = np.isfinite(y) & np.isfinite(score)
    if keep.sum() < 2 or len(np.unique(y[keep])) < 2:
        return float("nan")
    return float(M.youden_threshold(y[keep].astype(int), score[keep]))


def _base_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns every prediction row carries (ids, outcome, labels, clinical variables)."""
    from raypipe.predictions import CLINICAL_COLUMNS, label_columns

    keep = ["patient_id", "study_id", *[c for c in ("time_days", "event") if c in frame.columns],
            *label_columns(list(frame.columns)), *[c for c in CLINICAL_COLUMNS if c in frame.columns]]
    return frame[list(dict.fromkeys(keep))].copy()


def clinical_cv_predictions(frame: pd.DataFrame, plan: FoldPlan, label: str = "fracture_5y", seed: int = 0,
                            models: Sequence[str] = tuple(CLINICAL_MODELS), frax: Sequence[str] = FRAX_COLUMNS,
                            params: dict[str, Any] | None = None, use_ray: bool = True) -> pd.DataFrame:
    """Out-of-fold and external predictions of clinical models `models` (A-D) and FRAX columns present."""
    pid = frame["patient_id"].astype(str)
    base = _base_rows(frame)
    jobs = [(letter, k) for letter in models for k in range(plan.n_folds)]
    if use_ray:
        import ray

        from raypipe.ray_utils import init_ray

        init_ray()
        task = ray.remote(num_cpus=1)(fit_fold)
        ref = ray.put(frame)
        outputs = ray.get([task.remote(ref, letter, plan, k, label, seed, params) for letter, k in jobs])
    else:
        outputs = [fit_fold(frame, letter, plan, k, label, seed, params) for letter, k in jobs]

    parts: list[pd.DataFrame] = []
    ext_mask = pid.isin(plan.external).to_numpy()
    for letter in models:
        name = model_name(letter)
        ext_scores, oof = [], []
        for (lt, k), (val_s, ext_s, cutoff) in zip(jobs, outputs):
            if lt != letter:
                continue
            rows = base[pid.isin(plan.patients(k)["val"]).to_numpy()]
            oof.append(rows.assign(model=name, score=val_s, score_kind="probability", split=DEV_SPLIT, fold=k,
                                   threshold=cutoff))
            if ext_mask.any():
                ext_scores.append(ext_s)
        parts += oof
        if ext_scores:
            parts.append(base[ext_mask].assign(model=name + EXTERNAL_SUFFIX, score=np.mean(ext_scores, axis=0),
                                               score_kind="probability", split=EXTERNAL_SPLIT, fold=-1,
                                               threshold=youden_cutoff(pd.concat(oof))))
    fold_of = pid.map(plan.fold_of)
    for col in frax:
        if col not in frame.columns:
            continue
        score = frax_probability(frame, col)
        ok = np.isfinite(score)
        if (~ok).any():
            log.info("%s: %d studies without a value are left out", col, int((~ok).sum()))
        dev = ok & fold_of.notna().to_numpy()
        y = pd.to_numeric(frame[label], errors="coerce").to_numpy(dtype=float) if label in frame.columns \
            else np.full(len(frame), np.nan)
        cut = {k: training_cutoff(y[dev & (fold_of != k).to_numpy()], score[dev & (fold_of != k).to_numpy()])
               for k in range(plan.n_folds)}
        frax_dev = base[dev].assign(model=col, score=score[dev], score_kind="probability", split=DEV_SPLIT,
                                    fold=fold_of[dev].astype(int).to_numpy())
        frax_dev["threshold"] = frax_dev["fold"].map(cut).astype(float)
        parts.append(frax_dev)
        ext = ok & ext_mask
        if ext.any():
            parts.append(base[ext].assign(model=col + EXTERNAL_SUFFIX, score=score[ext], score_kind="probability",
                                          split=EXTERNAL_SPLIT, fold=-1, threshold=youden_cutoff(frax_dev)))
    out = pd.concat(parts, ignore_index=True)
    external_first = out["split"].eq(EXTERNAL_SPLIT).map({True: 0, False: 1})
    return out.assign(_o=external_first).sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def run_clinical_cv(data: str, out_dir: str, folds: int = 10, seed: int = 0, label: str = "fracture_5y",
                    folds_csv: str | None = None, development_site: str | None = None,
                    models: Sequence[str] = tuple(CLINICAL_MODELS), n_boot: int = 1000,
                    use_ray: bool = True) -> dict[str, Any]:
    """Cross-validate the clinical baselines and FRAX; write predictions.parquet, metrics.json, folds.csv."""
    from raypipe import storage
    from raypipe.predictions import write_predictions
    from raypipe.tune.cv import summarise, summary_table

    frame = load_cohort(data)
    plan = plan_from_csv(folds_csv, seed, label) if folds_csv else assign_folds(
        frame, folds, seed, label, development_site)
    known = set(frame["patient_id"].astype(str))
    lost = (set(plan.fold_of) | set(plan.external)) - known
    if lost:
        log.warning("%d patients of the fold plan are not in %s", len(lost), data)
    storage.makedirs(out_dir)
    storage.atomic_write_text(storage.join(out_dir, "folds.csv"), plan.frame().to_csv(index=False))
    preds = clinical_cv_predictions(frame, plan, label, seed, models, use_ray=use_ray)
    write_predictions(preds, storage.join(out_dir, "predictions.parquet"),
                      {"model": "clinical baselines", "cv_folds": plan.n_folds, "cv_seed": seed,
                       "variables": {model_name(k): list(CLINICAL_MODELS[k]) for k in models}})
    metrics = summarise(preds, n_boot=n_boot, seed=seed)
    storage.atomic_write_json(storage.join(out_dir, "metrics.json"), metrics)
    for line in summary_table(metrics):
        log.info("%s", line)
    return metrics
