"""`raypipe train age`: the thesis's age regressor (papers/004, Methods 8, Results 2) on Ray Train.

The thesis checks that Diff-X's prompt LDM puts the prompt's age into its images: "a regression model
backboned with Efficient-net" predicts the age of generated images, and the agreement of predicted and
prompted age is reported (R-square 0.841). This task trains that regressor on real radiographs. It is the
pVF classifier's network and input pipeline (`raypipe.train.pvf`: the same registry builders
``pvf_efficientnet_b4`` / ``pvf_tiny``, `PVFPreprocess`, manifest-or-shard datasets, batch augmentation and
BatchNorm recalibration) with its one output read as standardised age: the target is
``(age - mean) / sd`` of the training studies, the loss the mean squared error, model selection the
validation MAE in years. ``model_meta.json`` carries ``target_scale`` (mean, sd), so
`raypipe.scoring.pvf.load_age_regressor` returns ages in years.

Outputs beside the shared run files (model.pt, model_meta.json, config.yaml, metrics.csv):
``age_predictions.parquet`` (held-out studies: true age, predicted age and the training mean, the trivial
baseline) and ``metrics.json`` with the model's MAE and R-square next to the baseline's MAE on the same rows
(`raypipe.metrics.diffx.age_regression`, the statistic generation reports for generated images).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn

from raypipe.train.common import autocast
from raypipe.train.loop import run_worker_loop
from raypipe.train.pvf import (
    PVFTrainConfig,
    PVFWorkerTask,
    build,
    dataset_for,
    fit_network,
    input_batches,
    model_kwargs,
)

log = logging.getLogger(__name__)

TASK = "age"


class AgeRegressorConfig(PVFTrainConfig):
    """One age-regressor run: the pVF classifier's settings, with age as the target and MAE for selection."""

    display_name: str = "age"
    label: str = Field("age", description="numeric target column (years)")
    monitor: str = "val_mae"
    monitor_mode: Literal["max", "min"] = "min"
    gradcam_images: int = Field(0, ge=0, description="unused by the regressor")


def mse_standardised(pred: torch.Tensor, y: torch.Tensor, mean: float, sd: float) -> torch.Tensor:
    """Mean squared error of standardised predictions against ``(y - mean) / sd`` over the known targets."""
    known = torch.isfinite(y)
    if not bool(known.any()):
        return pred.sum() * 0.0
    target = (y[known] - mean) / sd
    return nn.functional.mse_loss(pred.float()[known], target)


class AgeWorkerTask(PVFWorkerTask):
    """Hooks of the shared worker loop for the age regressor: standardised MSE, validation MAE in years."""

    def __init__(self, cfg: AgeRegressorConfig, loop_config: Mapping[str, Any]) -> None:
        super().__init__(cfg, loop_config)
        self.mean, self.sd = float(loop_config["target_mean"]), float(loop_config["target_sd"])

    def build_model(self) -> nn.Module:
        return build(self.cfg)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mse_standardised(out, y, self.mean, self.sd)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        pred, true = [], []
        for x, y in self.validation_batches():
            with autocast(self.setup):
                out = model(x.to(self.setup.device).float()).float().cpu().numpy()
            pred.append(self.mean + self.sd * out)
            true.append(y.numpy())
        if not pred:
            return {"val_loss": float("nan"), "val_mae": float("nan")}
        p, t = np.concatenate(pred), np.concatenate(true)
        ok = np.isfinite(t)
        err = p[ok] - t[ok]
        return {"val_loss": float(np.mean((err / self.sd) ** 2)), "val_mae": float(np.mean(np.abs(err)))}


def train_loop_age(loop_config: dict) -> None:
    """Ray Train worker loop of the age regressor (the shared skeleton, `raypipe.train.loop`)."""
    run_worker_loop(AgeWorkerTask(AgeRegressorConfig.model_validate(loop_config["config"]), loop_config))


def fit_age(config: AgeRegressorConfig, data: str, out_dir: str, callbacks: Sequence[Any] = ()) -> Any:
    """Train the age regressor on `data` (manifest or shard folder); write the run folder into `out_dir`."""

    def age_scale(ages: pd.Series) -> dict[str, Any]:
        ages = ages.dropna()
        if len(ages) < 2 or not float(ages.std(ddof=1)) > 0:
            raise ValueError(f"{data}: the training studies' {config.label!r} values do not vary; nothing to regress")
        return {"target_mean": float(ages.mean()), "target_sd": float(ages.std(ddof=1))}

    run = fit_network(config, data, out_dir, callbacks, train_loop_age, age_scale)
    write_outputs(config, run.result, data, run.kind, run.table, run.role, run.out, run.settings["target_mean"],
                  run.settings["target_sd"])
    return run.result


def write_outputs(cfg: AgeRegressorConfig, result: Any, data: str, kind: str, table: pd.DataFrame, role: pd.Series,
                  out: str, mean: float, sd: float) -> dict[str, Any]:
    """Best checkpoint -> the run files; held-out studies scored once into age_predictions.parquet and metrics.json."""
    from raypipe import storage
    from raypipe.artifact import RunArtifact
    from raypipe.config import config_hash
    from raypipe.train.outputs import best_and_latest, selection_fields, write_run_files

    payload, latest = best_and_latest(result)
    model = build(cfg)
    model.load_state_dict(payload["model"])
    model.eval()
    selection = selection_fields(cfg, payload, latest)
    artifact = RunArtifact(builder=cfg.model, kwargs=model_kwargs(cfg), task=TASK, train_task=TASK,
                           display_name=cfg.name, preprocess=cfg.preprocess(), labels=[cfg.label], score_kind=None,
                           config_hash=config_hash(cfg), **selection, target_scale={"mean": mean, "sd": sd},
                           label=cfg.label)
    write_run_files(out, cfg, payload["model"], latest["state"]["history"], artifact)

    held = table[(role != "train").to_numpy()].assign(split=role[(role != "train").to_numpy()].to_numpy())
    held = held.assign(study_id=held["study_id"].astype(str))
    predicted = predict_years(model, dataset_for(data, kind, table, held["study_id"].tolist(), cfg),
                              cfg.eval_batch_size, mean, sd)
    frame = held[["patient_id", "study_id", "split", cfg.label]].merge(predicted, on="study_id", validate="one_to_one")
    frame = frame.rename(columns={cfg.label: "age"}).assign(mean_baseline=mean)
    frame = frame[np.isfinite(pd.to_numeric(frame["age"], errors="coerce"))].reset_index(drop=True)
    storage.atomic_write_parquet(frame, storage.join(out, "age_predictions.parquet"))
    metrics = held_out_metrics(frame, cfg.name)
    storage.atomic_write_json(storage.join(out, "metrics.json"), metrics)
    m = metrics["models"][cfg.name]
    log.info("age held-out MAE %.2f years (predicting the training mean: %.2f), R-square %s",
             m["mae"]["value"], m["mae_mean_baseline"]["value"], m["r_squared"]["value"])
    return metrics


@torch.no_grad()
def predict_years(model: nn.Module, ds: Any, batch_size: int, mean: float, sd: float) -> pd.DataFrame:
    """Predicted age in years keyed by study_id."""
    rows = [pd.DataFrame({"study_id": sids, "predicted_age": mean + sd * model(x).float().numpy()})
            for x, _, sids in input_batches(ds, batch_size)]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({"study_id": [], "predicted_age": []})


def held_out_metrics(frame: pd.DataFrame, name: str) -> dict[str, Any]:
    """metrics.json of held-out ages: MAE, R-square, slope (thesis statistic) and the training-mean baseline's MAE."""
    from raypipe.metrics.diffx import age_regression

    true, pred = frame["age"].to_numpy(float), frame["predicted_age"].to_numpy(float)
    if true.size == 0:
        raise ValueError("no held-out studies with an age to evaluate the regressor on")
    base = float(np.mean(np.abs(frame["mean_baseline"].to_numpy(float) - true)))
    entry: dict[str, Any] = {"n": {"value": int(true.size)},
                             "mae": {"value": float(np.mean(np.abs(pred - true)))},
                             "mae_mean_baseline": {"value": base}}
    try:
        stat = age_regression(true, pred)
        entry.update({"r_squared": {"value": stat.r_squared}, "pearson_r": {"value": stat.pearson_r},
                      "slope": {"value": stat.slope}, "intercept": {"value": stat.intercept}})
    except ValueError as exc:  # e.g. constant predictions: no correlation to report
        entry.update({"r_squared": {"value": None, "error": str(exc)}})
    for v in entry.values():
        v.setdefault("ci_low", None)
        v.setdefault("ci_high", None)
    return {"models": {name: entry}, "comparisons": []}
