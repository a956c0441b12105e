"""One cross-validation fold as a training task sees it: its patients by role, its folder, its callbacks.

`raypipe.tune.cv` builds a `FoldTask` per fold and calls the task's fold-fit function
(`raypipe.tasks`); the fold-fit trains on the fold's `train` patients only (selecting the model on an
inner `tune` split of them) and scores the held-out `val` patients and any `external` ones.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

UNUSED_ROLE = "unused"  # studies of patients a fold neither trains on nor scores


@dataclass(frozen=True)
class FoldTask:
    """What a fold-fit function gets: the model config, data, the fold's folder, patients, callbacks."""

    fold: int
    n_folds: int
    config: Any
    data_dir: str
    out_dir: str
    patients: Mapping[str, Sequence[str]]
    callbacks: tuple[Any, ...] = field(default=())


def fold_config(cfg: BaseModel, fold: int, **update: Any) -> Any:
    """The model config of one fold: its own Ray Train run (and storage, when one is configured)."""
    from raypipe import storage

    changes: dict[str, Any] = {"run_name": "train", **update}
    if getattr(cfg, "storage_path", None):
        changes["storage_path"] = storage.join(cfg.storage_path, f"fold_{fold:02d}")
    return type(cfg).model_validate({**cfg.model_dump(), **changes})


def fold_summary(out_dir: str) -> dict[str, float]:
    """A few scalars of a finished fold for Tune's table: best epoch, epochs run, the monitored value."""
    from raypipe.artifact import read_artifact

    art = read_artifact(out_dir)
    out = {"best_epoch": float(art.best_epoch or 0), "epochs_run": float(art.epochs_run)}
    if art.best_value is not None and art.monitor:
        out[art.monitor] = float(art.best_value)
    return out


def fold_roles(meta: Any, task: FoldTask, label: str | None, seed: int, inner_fraction: float) -> Any:
    """study_id -> role of one fold (train / tune / val / external / unused): its training patients split again
    by patient (`nested_fold_roles`), with a seed of its own per fold."""
    import pandas as pd

    from raypipe.data.splits import nested_fold_roles

    role = nested_fold_roles(meta, task.patients, label, seed + 7919 * (task.fold + 1), inner_fraction)
    return pd.Series(role.replace("", UNUSED_ROLE).to_numpy(), index=meta["study_id"].astype(str).to_numpy())
