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
               overrides: Mapping[str, Any] | None = None) -> str:
    """Train task `name` (`raypipe.tasks`) on `data`; returns the run folder (default runs/<model name>)."""
    from raypipe.config import load_config
    from raypipe.ray_utils import init_ray
    from raypipe.tasks import get_task, resolve

    task = get_task(name)
    cfg = load_config(task.config_class(), config_path, dict(overrides or {}))
    require_data(task.data, data)
    out = out or os.path.join("runs", cfg.name)
    init_ray()
    task.fit_function()(cfg, data, out)
    if task.after_train:
        try:  # extra figures (e.g. Grad-CAM) must not fail a finished run
            resolve(task.after_train)(out, data)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s skipped: %s", task.after_train, exc)
    log.info("run written to %s", out)
    return out
