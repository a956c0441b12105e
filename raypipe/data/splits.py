"""Patient-level splits: every study of a patient lands in the same role, stratified, seeded.

Used by `raypipe train` (train/val/test), by cross-validation for the nested inner split of a fold's
training patients (early stopping, checkpoint and threshold choice never see the held-out fold), and by
the clinical baselines. Plain functions with explicit arguments.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

TUNE_ROLE = "tune"  # a fold's inner validation patients (drawn from its training patients)
SPLIT_ALIASES = {"valid": "val", "validation": "val", "training": "train"}


def patient_strata(meta: pd.DataFrame, label: str | None) -> pd.Series:
    """Per patient: True when any of their studies has a positive `label` (False when unknown or absent)."""
    pid = meta["patient_id"].astype(str)
    if label and label in meta.columns:
        y = pd.to_numeric(meta[label], errors="coerce").fillna(0)
    else:
        y = pd.Series(0, index=meta.index)
    return (y.groupby(pid).max() > 0).sort_index()


def draw_patients(strata: pd.Series, fraction: float, seed: int, minimum: int = 1) -> list[str]:
    """A seeded, stratified draw of about `fraction` of the patients (at least `minimum` per stratum of > 1)."""
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for _, group in strata.groupby(strata):
        ids = group.index.to_numpy().astype(object)
        rng.shuffle(ids)
        n = int(round(len(ids) * fraction))
        if len(ids) > 1:
            n = max(minimum, n)
        chosen += [str(p) for p in ids[: min(n, len(ids) - 1 if len(ids) > 1 else 0)]]
    return sorted(chosen)


def split_by_patient(meta: pd.DataFrame, label: str | None, seed: int, val_fraction: float,
                     test_fraction: float = 0.0) -> pd.Series:
    """Role per study (train / val / test / any other manifest split), assigned by patient.

    A `split` column is honoured: its `train` patients are divided into train and val (unless val rows
    are given); every other split is kept and scored at the end. Without one, patients are drawn into
    val/test by the fractions, stratified on whether a patient has a positive label.
    """
    split = meta["split"].astype("string").str.lower() if "split" in meta.columns else None
    role = pd.Series("train", index=meta.index, dtype="object")
    pool = meta.index
    has_split = split is not None and bool(split.notna().any())
    if has_split:
        role[:] = split.fillna("train").replace(SPLIT_ALIASES).to_numpy()
        pool = meta.index[role == "train"]
        if (role == "val").any():
            return role
    sub = meta.loc[pool]
    strata = patient_strata(sub, label)
    rng = np.random.default_rng(seed)
    val_p: list[str] = []
    test_p: list[str] = []
    frac_test = 0.0 if has_split else test_fraction
    for _, group in strata.groupby(strata):
        ids = group.index.to_numpy().astype(object)
        rng.shuffle(ids)
        n_test = int(round(len(ids) * frac_test))
        n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
        test_p += list(ids[:n_test])
        val_p += list(ids[n_test:n_test + n_val])
    pid = meta.loc[pool, "patient_id"].astype(str)
    role.loc[pool[pid.isin(val_p).to_numpy()]] = "val"
    role.loc[pool[pid.isin(test_p).to_numpy()]] = "test"
    return role


def roles_from_fold(meta: pd.DataFrame, fold_patients: Mapping[str, Sequence[str]]) -> pd.Series:
    """Role per study from a role -> patient ids mapping (a CV fold); "" for patients in no role."""
    seen: dict[str, str] = {}
    for name, ids in fold_patients.items():
        for pid in map(str, ids):
            if seen.setdefault(pid, name) != name:
                raise ValueError(f"patient in both {seen[pid]!r} and {name!r} roles of the fold")
    if not fold_patients.get("train") or not fold_patients.get("val"):
        raise ValueError("fold_patients needs non-empty 'train' and 'val' patient lists")
    return meta["patient_id"].astype(str).map(seen).fillna("").astype("object")


def nested_fold_roles(meta: pd.DataFrame, fold_patients: Mapping[str, Sequence[str]], label: str | None,
                      seed: int, inner_fraction: float) -> pd.Series:
    """Fold roles with the fold's training patients split again: `train` and `tune` (inner validation).

    Only the training patients' labels decide the inner split (stratification), so permuting the held-out
    fold's labels changes nothing that is chosen on `tune` (early stopping, checkpoint, threshold).
    """
    role = roles_from_fold(meta, fold_patients)
    train_rows = meta[(role == "train").to_numpy()]
    if train_rows["patient_id"].nunique() < 2:
        raise ValueError("a fold needs at least 2 training patients for its inner validation split")
    tune = set(draw_patients(patient_strata(train_rows, label), inner_fraction, seed))
    inner = meta["patient_id"].astype(str).isin(tune).to_numpy() & (role == "train").to_numpy()
    role = role.copy()
    role[inner] = TUNE_ROLE
    return role
