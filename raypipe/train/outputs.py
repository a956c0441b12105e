"""What every trainer writes into its OUT folder once Ray Train has finished (driver side, one writer).

`config.yaml` (the resolved config), `metrics.csv` (per epoch), `model.pt` (the best checkpoint's
state_dict), `model_meta.json` (the `raypipe.artifact.RunArtifact`), `predictions.parquet` (prediction
schema) and `metrics.json` (the schema of `raypipe evaluate`). Writes are atomic (temporary name, rename).
"""
from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel

from raypipe.artifact import RunArtifact, write_artifact
from raypipe.train.common import best_checkpoint, read_checkpoint
from raypipe.train.loop import CHECKPOINT_SCORE

log = logging.getLogger(__name__)


def best_and_latest(result: Any, attribute: str | None = CHECKPOINT_SCORE) -> tuple[dict, dict]:
    """Payloads of the best checkpoint (by `attribute`; the latest when None) and of the latest one."""
    best = best_checkpoint(result, attribute, "max")
    if best is None:
        raise RuntimeError("training reported no checkpoint")
    payload = read_checkpoint(best)
    latest = read_checkpoint(result.checkpoint) if result.checkpoint is not None else payload
    return payload, latest


def selection_fields(cfg: Any, payload: Mapping[str, Any], latest: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact's model-selection fields: best epoch, monitored metric and value, epochs run."""
    state = payload["state"]
    return {"best_epoch": state.get("best_epoch"), "monitor": getattr(cfg, "monitor", None),
            "best_value": state.get("best_value"), "epochs_run": int(latest["state"]["epoch"])}


def write_run_files(out: str, cfg: BaseModel, model_state: Mapping[str, torch.Tensor],
                    history: list[Mapping[str, Any]], artifact: RunArtifact) -> None:
    """config.yaml, metrics.csv, model.pt and model_meta.json of a finished run."""
    from raypipe import storage
    from raypipe.config import dump_config
    from raypipe.train.common import metrics_csv_text

    dump_config(cfg, storage.join(out, "config.yaml"))
    storage.atomic_write_text(storage.join(out, "metrics.csv"), metrics_csv_text(history))
    buf = io.BytesIO()
    torch.save(dict(model_state), buf)
    storage.atomic_write_bytes(storage.join(out, "model.pt"), buf.getvalue())
    write_artifact(out, artifact)


def write_scored(out: str, frame: pd.DataFrame, cfg: Any, best_epoch: int | None,
                 extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """predictions.parquet and metrics.json (evaluated as `raypipe evaluate` would) of the scored rows."""
    from raypipe import storage
    from raypipe.config import config_hash
    from raypipe.evaluate import evaluate_frame
    from raypipe.predictions import validate_predictions, write_predictions

    valid = validate_predictions(frame)
    metrics = evaluate_frame(valid, reference_model=cfg.name, n_boot=cfg.n_boot, seed=cfg.seed).metrics
    write_predictions(frame, storage.join(out, "predictions.parquet"),
                      {"model": cfg.name, "config_hash": config_hash(cfg), "best_epoch": best_epoch,
                       **dict(extra_meta or {})})
    storage.atomic_write_json(storage.join(out, "metrics.json"), metrics)
    return metrics
