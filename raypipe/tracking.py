"""Experiment tracking in MLflow for `train`, `cv` and `tune` (`--mlflow`, or `MLFLOW_TRACKING_URI` set).

Where runs go: the server in `MLFLOW_TRACKING_URI` when set; otherwise, when the user asks (`--mlflow`), a
local store `OUT/mlruns/` (SQLite database + artifacts folder; MLflow 3 refuses plain-file stores); otherwise
nowhere, and every call here is a no-op. The experiment is `MLFLOW_EXPERIMENT_NAME` or `raypipe`. The client
is `mlflow-skinny` (the `tracking` extra); a server runs from its own environment (README "Run on a cluster").

How a command uses it:
- driver: `tracking = resolve_tracking(out, run_name, config, enabled=args.mlflow)` before fitting;
- Ray Train (`train`): `fit(..., callbacks=train_callbacks(tracking))`: `TrainTracker` runs in the Train
  controller and opens one MLflow run (the config as params) that gets rank 0's reported metrics every epoch;
- Tune (`cv`, `tune`): `tune.RunConfig(callbacks=tracking_callbacks(tracking))`: one MLflow run per trial
  (Ray's `MLflowLoggerCallback`), the trial's config as params, every reported result (each epoch) as metrics;
- driver, after `metrics.json` / `report.html` are written: `log_final(tracking, metrics_path, report_path)`
  logs the final metrics and the files as artifacts to the train run (or, for `cv`/`tune`, to a summary run
  holding the resolved config) and marks it finished; `mark_failed` marks it failed when the fit raised.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train import UserCallback

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


def train_callbacks(tracking: Tracking | None) -> list:
    """Ray Train callbacks for a task's `fit(..., callbacks=...)`: the per-epoch MLflow run (none when off)."""
    return [] if tracking is None else [TrainTracker(tracking)]


class TrainTracker(UserCallback):
    """Ray Train callback (runs in the Train controller): one MLflow run, the config as params, rank 0's metrics."""

    def __init__(self, tracking: Tracking) -> None:
        self.tracking = tracking
        self.run_id: str | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Log what the workers reported; a tracking server that fails is logged, never fails the training."""
        if not metrics:
            return
        try:
            self._log(metrics[0])
        except Exception as exc:  # noqa: BLE001  (hours of training outweigh one lost metric row)
            logging.getLogger(__name__).warning("MLflow: epoch metrics not logged to %s: %s",
                                                self.tracking.tracking_uri, exc)

    def _log(self, row: Mapping[str, Any]) -> None:
        """Open the run on first use, then log one reported row (every rank reports the same; rank 0's is given)."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking.tracking_uri)
        if self.run_id is None:
            self.run_id = _create_run(client, self.tracking, "train")
        step = int(row["epoch"]) if isinstance(row.get("epoch"), (int, float)) else int(row.get("training_iteration", 0))
        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in numeric_metrics(row).items()]
        for i in range(0, len(values), 1000):
            client.log_batch(self.run_id, metrics=values[i:i + 1000])

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        """Tag the run with the workers' errors (Ray may still retry them from a checkpoint)."""
        if self.run_id is None or not worker_exceptions:
            return
        from mlflow.tracking import MlflowClient

        text = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(worker_exceptions.items()))
        MlflowClient(self.tracking.tracking_uri).set_tag(self.run_id, "raypipe.worker_error", text[:5000])


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


def log_final(tracking: Tracking | None, metrics_path: str | os.PathLike | None,
              report_path: str | os.PathLike | None = None,
              artifacts: Iterable[str | os.PathLike] = (), extra_metrics: Mapping[str, float] | None = None) -> str | None:
    """Log final metrics and the files (local or URIs) to the train run, else a new summary run; returns its id.

    `metrics_path` is a metrics.json of the evaluation schema (None: only `extra_metrics`, e.g. a search's
    best value); every path given must exist.
    """
    if tracking is None:
        return None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    metrics = final_metrics(json.loads(storage.read_bytes(metrics_path)), str(metrics_path)) if metrics_path else {}
    metrics.update(numeric_metrics(extra_metrics or {}))
    client = MlflowClient(tracking.tracking_uri)
    run_id = _train_run(client, tracking) or _create_run(client, tracking, "summary")
    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, 0) for k, v in metrics.items()]
    client.set_tag(run_id, "raypipe.final", "true")
    for i in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[i:i + 1000])
    paths = [*([metrics_path] if metrics_path else []), *([report_path] if report_path is not None else []), *artifacts]
    for path in paths:
        with storage.localize(path) as local:  # URIs fetched to a temp dir for the upload
            if not Path(local).is_file():
                raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
            client.log_artifact(run_id, local)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def mark_failed(tracking: Tracking | None) -> None:
    """Mark the run's MLflow train run FAILED (after the fit raised); a no-op when off or none was opened."""
    if tracking is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri)
    run_id = _train_run(client, tracking)
    if run_id is not None:
        client.set_terminated(run_id, "FAILED")


def _experiment_id(client: Any, tracking: Tracking) -> str:
    exp = client.get_experiment_by_name(tracking.experiment_name)
    if exp is None:
        raise RuntimeError(f"MLflow experiment {tracking.experiment_name!r} is gone from {tracking.tracking_uri}")
    return exp.experiment_id


def _train_run(client: Any, tracking: Tracking) -> str | None:
    """The latest MLflow run that `TrainTracker` opened for this raypipe run, if any."""
    found = client.search_runs([_experiment_id(client, tracking)], max_results=1,
                               order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.`raypipe.run` = '{_quote(tracking.run_name)}' "
                                             "and tags.`raypipe.role` = 'train'")
    return found[0].info.run_id if found else None


def _create_run(client: Any, tracking: Tracking, role: str) -> str:
    """A new MLflow run for this raypipe run with the config as params; returns its id."""
    from mlflow.entities import Param

    run_id = client.create_run(_experiment_id(client, tracking), run_name=tracking.run_name,
                               tags=tracking.tags(role)).info.run_id
    params = [Param(k, v) for k, v in tracking.params.items()]
    for i in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[i:i + _BATCH])
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


def run_name_for(command: str, model: str, out: str | os.PathLike) -> str:
    """The MLflow run name (and `raypipe.run` tag) of one command's OUT: e.g. "train cnn_rnn_bone /runs/ct"."""
    where = str(out) if storage.is_uri(out) else str(Path(storage.local_path(out)).absolute())
    return f"{command} {model} {where}"


def log_run_outputs(tracking: Tracking | None, out: str, n_boot: int = 200, seed: int = 0,
                    artifacts: Iterable[str] = (), extra_metrics: Mapping[str, float] | None = None) -> str | None:
    """After a run: OUT/metrics.json, a report.html rendered from OUT/predictions.parquet (into OUT/report/),
    the existing `artifacts` and `extra_metrics` go to the run (see `log_final`); None when tracking is off."""
    if tracking is None:
        return None
    metrics, predictions = storage.join(out, "metrics.json"), storage.join(out, "predictions.parquet")
    report = None
    if storage.exists(predictions):
        from raypipe.evaluate import evaluate

        evaluate([predictions], storage.join(out, "report"), n_boot=n_boot, seed=seed)
        report = storage.join(out, "report", "report.html")
    files = [a for a in artifacts if storage.exists(a)]
    return log_final(tracking, metrics if storage.exists(metrics) else None, report, files, extra_metrics)
