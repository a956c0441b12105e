"""`raypipe train MODEL`: load the task's config, train on Ray, then the task's after-train step.

Shared by the CLI, the demo and `ray job submit` entrypoints, so a model trains the same way everywhere.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def require_data(kind: str, data: str) -> None:
    """Fail before starting Ray when --data cannot be what the task reads (e.g. a folder without shards)."""
    from raypipe.data.shards import shard_files

    if kind.endswith("shards") and not kind.startswith("manifest") and not shard_files(data):
        raise FileNotFoundError(f"no preprocessed shards in {data}: run `raypipe preprocess` into it first")


def train_task(name: str, config_path: str | None, data: str, out: str | None = None,
               overrides: Mapping[str, Any] | None = None, mlflow: bool = False) -> str:
    """Train task `name` (`raypipe.tasks`) on `data`; returns the run folder (default runs/<model name>).

    GPUs as the config asks (`use_gpu`, `gpus_per_worker`; a local Ray without them fails fast). With
    `mlflow` (or MLFLOW_TRACKING_URI set) the run is tracked: params, per-epoch metrics, final metrics,
    metrics.json and a report.html rendered from its predictions (`raypipe.tracking`).
    """
    from raypipe.config import load_config
    from raypipe.ray_utils import describe_devices, init_ray, require_gpus
    from raypipe.tasks import get_task, resolve
    from raypipe.tracking import log_run_outputs, mark_failed, resolve_tracking, run_name_for, train_callbacks

    task = get_task(name)
    cfg = load_config(task.config_class(), config_path, dict(overrides or {}))
    require_data(task.data, data)
    out = out or os.path.join("runs", cfg.name)
    log.info("%s", describe_devices(cfg.num_workers, cfg.use_gpu, cfg.gpus_per_worker))
    tracking = resolve_tracking(out, run_name_for("train", cfg.name, out), cfg, enabled=mlflow)
    init_ray()
    require_gpus(cfg.num_workers * cfg.gpus_per_worker if cfg.use_gpu else 0, f"raypipe train {name}")
    try:
        task.fit_function()(cfg, data, out, callbacks=train_callbacks(tracking))
    except BaseException:
        try:  # never hide the fit's own error behind a tracking one
            mark_failed(tracking)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not mark the MLflow run failed: %s", exc)
        raise
    if task.after_train:
        try:  # extra figures (e.g. Grad-CAM) must not fail a finished run
            resolve(task.after_train)(out, data)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s skipped: %s", task.after_train, exc)
    if tracking is not None:
        from raypipe import storage

        run_id = log_run_outputs(tracking, out, n_boot=min(int(getattr(cfg, "n_boot", 200)), 200),
                                 seed=int(getattr(cfg, "seed", 0)),
                                 artifacts=[storage.join(out, "metrics.csv"), storage.join(out, "config.yaml")])
        log.info("MLflow run %s at %s (experiment %s)", run_id, tracking.tracking_uri, tracking.experiment_name)
    log.info("run written to %s", out)
    return out
