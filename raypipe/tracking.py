"""Experiment tracking in MLflow for `train`, `cv` and `tune`, through Ray's MLflow integration.

Where runs go: the server in `MLFLOW_TRACKING_URI` when set; otherwise, when the user asks (`--mlflow`), a
local store `OUT/mlruns/` (SQLite database + artifacts folder; MLflow 3 refuses plain-file stores); otherwise
nowhere, and every call here is a no-op. The experiment is `MLFLOW_EXPERIMENT_NAME` or `raypipe`.

How a command uses it:
- driver: `tracking = resolve_tracking(out, run_name, config, enabled=args.mlflow)` before fitting;
- Tune (`cv`, `tune`): `tune.RunConfig(callbacks=tracking_callbacks(tracking))`: one MLflow run per trial
  (Ray's `MLflowLoggerCallback`), the trial's config as params, every reported result as metrics;
- Ray Train (`train`): `tracking` travels in the loop config; each worker calls `start_worker_run(tracking)`
  once (Ray's `setup_mlflow`: rank 0 opens the run with the config as params) and `log_epoch(metrics, epoch)`
  per epoch (a no-op on other ranks and when tracking is off);
- driver, after `metrics.json` / `report.html` are written: `log_final(tracking, metrics_path, report_path)`
  logs the final metrics and both files as artifacts to the train run (or, for `cv`/`tune`, to a summary run
  holding the resolved config) and marks it finished.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe import storage

DEFAULT_EXPERIMENT = "raypipe"
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a parameter value
_BATCH = 100  # MLflow's limit on params per log_batch call


@dataclass(frozen=True)
class Tracking:
    """Where one raypipe run is tracked: picklable, so it can travel to Ray workers in a loop config."""

    tracking_uri: str
    experiment_name: str
    run_name: str
    params: dict[str, str] = field(default_factory=dict)

    def tags(self, role: str) -> dict[str, str]:
        """MLflow tags that tie a run to this raypipe run; role is train, trial or summary."""
        return {"raypipe.run": self.run_name, "raypipe.role": role}


def resolve_tracking(out_dir: str | os.PathLike, run_name: str, config: Any = None, enabled: bool = False,
                     env: Mapping[str, str] | None = None) -> Tracking | None:
    """The run's tracking target (None when off); creates the experiment so that workers only join it."""
    e = os.environ if env is None else env
    uri = e.get("MLFLOW_TRACKING_URI") or None
    if uri is None and not enabled:
        return None
    if not run_name or not run_name.strip():
        raise ValueError("run_name must be a non-empty name for the MLflow run")
    artifacts = None
    if uri is None:
        if storage.is_uri(out_dir):
            raise ValueError(f"--mlflow without MLFLOW_TRACKING_URI keeps a local mlruns/ under --out, but --out is "
                             f"{str(out_dir)!r}: set MLFLOW_TRACKING_URI to a tracking server the cluster reaches")
        root = Path(storage.local_path(out_dir)).absolute() / "mlruns"
        root.mkdir(parents=True, exist_ok=True)
        uri, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()
    tracking = Tracking(uri, e.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT, run_name, flatten_params(config))
    _ensure_experiment(tracking, artifacts)
    return tracking


def flatten_params(config: Any) -> dict[str, str]:
    """A (pydantic or mapping) config as flat MLflow params: dotted keys, JSON for lists, values cut to MLflow's limit."""
    if config is None:
        return {}
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or a pydantic model, got {type(config).__name__}")
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[metric_key(prefix)] = text[:_PARAM_VALUE_MAX]

    walk("", config)
    return out


def metric_key(name: str) -> str:
    """A metric or param name MLflow accepts ('td_auroc@365' -> 'td_auroc_at_365'; other odd characters -> '_')."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(name).replace("@", "_at_"))


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a (nested) metrics mapping with MLflow-safe keys; text, None, NaN and bools left out."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = metric_key(f"{prefix}{k}")
        if isinstance(v, Mapping):
            out.update(numeric_metrics(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
            item = v.item()
            if isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(float(item)):
                out[key] = float(item)
    return out


def tracking_callbacks(tracking: Tracking | None) -> list:
    """Callbacks for `tune.RunConfig(callbacks=...)`: one MLflow run per trial (none when tracking is off)."""
    if tracking is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking.tracking_uri, experiment_name=tracking.experiment_name,
                                 tags=tracking.tags("trial"))]


def start_worker_run(tracking: Tracking | None) -> None:
    """In a Ray Train worker: rank 0 opens the run (config as params) that `log_epoch` then writes to."""
    if tracking is None:
        return
    from ray.air.integrations.mlflow import setup_mlflow

    setup_mlflow(tracking.params, tracking_uri=tracking.tracking_uri, experiment_name=tracking.experiment_name,
                 run_name=tracking.run_name, tags=tracking.tags("train"), rank_zero_only=True)


def log_epoch(metrics: Mapping[str, Any], step: int) -> None:
    """Log one epoch's numeric metrics at `step` to this process's open run; a no-op when none is open."""
    mlflow = sys.modules.get("mlflow")  # only imported once start_worker_run opened a run
    if mlflow is None or mlflow.active_run() is None:
        return
    values = numeric_metrics(metrics)
    if values:
        mlflow.log_metrics(values, step=int(step))


def end_worker_run(failed: bool = False) -> None:
    """Close this worker's open run (FINISHED or FAILED); `log_final` may still add to it afterwards."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED" if failed else "FINISHED")


def final_metrics(metrics: Mapping[str, Any], source: str = "metrics.json") -> dict[str, float]:
    """The evaluation schema (`models` -> NAME -> METRIC -> value/ci_low/ci_high, `comparisons`) as flat metrics."""
    models = metrics.get("models")
    if not isinstance(models, Mapping):
        raise ValueError(f"{source}: no 'models' object (expected the metrics.json schema of `raypipe evaluate`)")
    out: dict[str, float] = {}
    for name, per_metric in models.items():
        for metric, stat in (per_metric or {}).items():
            stats = stat if isinstance(stat, Mapping) else {"value": stat}
            for part in ("value", "ci_low", "ci_high"):
                v = stats.get(part)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    suffix = "" if part == "value" else f"/{part}"
                    out[metric_key(f"{name}/{metric}{suffix}")] = float(v)
    for c in metrics.get("comparisons") or []:
        p = c.get("p_value")
        if isinstance(p, (int, float)) and math.isfinite(float(p)):
            out[metric_key(f"p_value/{c.get('a')}_vs_{c.get('b')}/{c.get('metric')}")] = float(p)
    return out


def log_final(tracking: Tracking | None, metrics_path: str | os.PathLike,
              report_path: str | os.PathLike | None = None,
              artifacts: Iterable[str | os.PathLike] = ()) -> str | None:
    """Log final metrics and the files (local or URIs) to the train run, else a new summary run; returns its id."""
    if tracking is None:
        return None
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    metrics = final_metrics(json.loads(storage.read_bytes(metrics_path)), str(metrics_path))
    client = MlflowClient(tracking.tracking_uri)
    exp = client.get_experiment_by_name(tracking.experiment_name)
    if exp is None:
        raise RuntimeError(f"MLflow experiment {tracking.experiment_name!r} is gone from {tracking.tracking_uri}")
    found = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.`raypipe.run` = '{_quote(tracking.run_name)}' "
                                             "and tags.`raypipe.role` = 'train'")
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(exp.experiment_id, run_name=tracking.run_name,
                                   tags=tracking.tags("summary")).info.run_id
        params = [Param(k, v) for k, v in tracking.params.items()]
        for i in range(0, len(params), _BATCH):
            client.log_batch(run_id, params=params[i:i + _BATCH])
    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[i:i + 1000], tags=[RunTag("raypipe.final", "true")] if i == 0 else [])
    for path in [metrics_path, *([report_path] if report_path is not None else []), *artifacts]:
        with storage.localize(path) as local:  # URIs fetched to a temp dir for the upload
            if not Path(local).is_file():
                raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
            client.log_artifact(run_id, local)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _ensure_experiment(tracking: Tracking, artifact_location: str | None) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri)
    if client.get_experiment_by_name(tracking.experiment_name) is None:
        try:
            client.create_experiment(tracking.experiment_name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another run: fine if it exists now
            if client.get_experiment_by_name(tracking.experiment_name) is None:
                raise


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
