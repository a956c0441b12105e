"""Hyperparameter search on Ray Tune: Optuna TPE proposes, ASHA stops weak trials early (`raypipe tune MODEL`).

A search spec is a YAML file (e.g. `jobs/configs/xray_deepsurv_search.yaml`):

```yaml
config: xray_deepsurv_tiny.yaml   # base training config, relative to this file (or `base:` inline mapping)
metric: val_c_index               # reported by the training loop every epoch
mode: max
space:                            # dotted config keys -> distributions
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  model_kwargs.dropout: {type: uniform, low: 0.0, high: 0.5}
  model_kwargs.hidden_sizes: {type: choice, values: [[16], [32, 32]]}
asha: {grace_period: 2, reduction_factor: 2}   # max_t defaults to the base config's epochs
max_concurrent_trials: 1          # trials at once (default 1); never sized from the cluster at submit time
trial_cpus: 0.25
trial_resources: {}               # optional custom resources per trial (e.g. a node-type label)
```
Concurrency is the spec's `max_concurrent_trials`; GPUs are the base config's `use_gpu` / `gpus_per_worker`
(`raypipe tune --gpus N` / `--cpu` override them), requested even before the cluster has GPU nodes; each
worker's CPU share is the CPUs left after Ray Data's divided over the concurrent trials
(`raypipe.cluster.trial_resources`). Models: `deepsurv` (X-ray), `cnn-rnn` and
`multitask` (CT; e.g. `jobs/configs/ct_search.yaml`).
Each trial is a function (Ray Train V2: never `Tuner(trainer)`) that merges its sample into the base config
and calls the model's fit function, which builds and fits its own TorchTrainer with Tune's
`TuneReportCallback`, so every epoch's validation metric reaches Optuna and ASHA. Trials write
`OUT/trials/<trial_id>/` (a full run folder when not stopped early); the search writes `OUT/results.csv`
(one row per trial: status complete/stopped/error, sampled values, last and best metric) and `OUT/best_config.yaml` (the base config with
the best trial's values, ready for `raypipe train`) and `OUT/report.md` (the table as a report section).
Rerunning with the same OUT restores the experiment (`Tuner.restore`): finished trials are not run again
(each trial start is appended to `OUT/trials/<trial_id>/attempts.log`, its node to `trial.json`).
Searchable models are the `raypipe.tasks` entries with `tune=True`. The objective is the trial's
validation metric (its own patient split): rows of a held-out `test` split never enter it.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
from pydantic import BaseModel, Field

from raypipe.config import StrictModel

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotations only: tracking imports Ray Train
    from raypipe.tracking import Tracking

EXPERIMENT_NAME = "tune"
JSON_PREFIX = "json:"  # choice values that are not scalars travel through Optuna as JSON strings


class Distribution(StrictModel):
    """One searched value: `loguniform`/`uniform` (low, high), `int` (low, high) or `choice` (values)."""

    type: str = Field(..., pattern="^(loguniform|uniform|int|choice)$")
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None


class AshaSettings(StrictModel):
    """ASHA's successive halving: epochs before the first cut, the fraction kept, the longest run."""

    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the base config's epochs (caps them when smaller)")


class SearchSpec(StrictModel):
    """A search-spec YAML file (see the module docstring)."""

    config: str | None = Field(None, description="base training config, relative to the spec file")
    base: dict[str, Any] = Field(default_factory=dict, description="inline base config (applied after `config`)")
    metric: str = "val_c_index"
    mode: str = Field("max", pattern="^(max|min)$")
    space: dict[str, Distribution]
    asha: AshaSettings = Field(default_factory=AshaSettings)
    seed: int = 0
    max_concurrent_trials: int = Field(1, ge=1, description="trials at once (each asks for its workers' CPUs/GPUs)")
    trial_cpus: float = Field(0.25, gt=0, description="CPUs of a trial's driver function (Train workers ask for theirs)")
    trial_resources: dict[str, float] = Field(default_factory=dict, description="extra custom resources per trial")
    workers_per_trial: int | None = Field(None, ge=1, description="Ray Train workers per trial; default: config's")
    max_failures: int = Field(1, ge=0, description="Tune retries per trial (FailureConfig)")


# ---------------------------------------------------------------------------------------------- models
def searchable(name: str) -> Any:
    """The `raypipe.tasks` entry of a searchable task; KeyError naming the ones that are."""
    from raypipe.tasks import get_task, tune_names

    task = get_task(name)
    if not task.tune:
        raise KeyError(f"no search for model {name!r}; searchable: {', '.join(tune_names())}")
    return task


# ---------------------------------------------------------------------------------------------- spec
def load_search_spec(path: str | os.PathLike) -> tuple[SearchSpec, dict[str, Any]]:
    """The spec and its base config mapping (the `config` file, then `base` on top)."""
    from raypipe import storage
    from raypipe.config import parse_config, read_yaml

    raw = read_yaml(path)
    spec = parse_config(SearchSpec, raw, str(path))
    base: dict[str, Any] = {}
    if spec.config:
        base = read_yaml(storage.resolve(spec.config, storage.parent(path)))  # relative to the spec, local or URI
    return spec, _merge(base, spec.base)


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, `b` wins."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def param_space(spec: SearchSpec) -> dict[str, Any]:
    """Nested Tune search space from the dotted keys (non-scalar choices encoded as JSON strings)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, d in spec.space.items():
        if d.type == "choice":
            if not d.values:
                raise ValueError(f"search space {key}: choice needs values")
            dist = tune.choice([v if isinstance(v, (str, int, float, bool)) or v is None
                                else JSON_PREFIX + json.dumps(v) for v in d.values])
        elif d.low is None or d.high is None:
            raise ValueError(f"search space {key}: {d.type} needs low and high")
        elif d.type == "loguniform":
            dist = tune.loguniform(d.low, d.high)
        elif d.type == "uniform":
            dist = tune.uniform(d.low, d.high)
        else:
            dist = tune.randint(int(d.low), int(d.high) + 1)
        cur = space
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = dist
    return space


def decode(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled values with JSON-encoded choices turned back into lists/mappings."""
    out: dict[str, Any] = {}
    for k, v in sample.items():
        if isinstance(v, Mapping):
            out[k] = decode(v)
        elif isinstance(v, str) and v.startswith(JSON_PREFIX):
            out[k] = json.loads(v[len(JSON_PREFIX):])
        else:
            out[k] = v
    return out


def trial_config(config_class: type[BaseModel], base: Mapping[str, Any], sample: Mapping[str, Any],
                 run_name: str = "train") -> BaseModel:
    """The base config with one trial's values merged in, validated."""
    from raypipe.config import parse_config

    return parse_config(config_class, _merge(_merge(base, decode(sample)), {"run_name": run_name}), "<trial>")


# ---------------------------------------------------------------------------------------------- trials
@dataclass(frozen=True)
class SearchTask:
    """What every trial needs, shipped once through the object store."""

    model: str
    base: dict[str, Any]
    data_dir: str
    out_dir: str
    worker_resources: dict[str, float] | None = None


def search_trial(sample: dict[str, Any], task: SearchTask) -> None:
    """The Tune trainable: merge the sample into the base config and fit (the callback reports epochs)."""
    import time

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypipe import storage
    from raypipe.cluster import node_id

    entry = searchable(task.model)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(entry.config_class(), task.base, sample)
    if task.worker_resources:  # the trial plan's share of the cluster, for this trial's Train workers
        cfg = cfg.model_copy(update={"resources_per_worker": {**task.worker_resources, **cfg.resources_per_worker}})
    out = storage.join(task.out_dir, "trials", trial_id)
    storage.makedirs(out)
    attempts = storage.join(out, "attempts.log")
    previous = storage.read_bytes(attempts).decode() if storage.exists(attempts) else ""
    storage.atomic_write_text(attempts, previous + f"{time.time():.3f}\n")
    storage.atomic_write_json(storage.join(out, "trial.json"), {"trial_id": trial_id, "node_id": node_id(),
                                                                "config": decode(sample)})
    entry.fit_function()(cfg, task.data_dir, out, callbacks=[TuneReportCallback()])


def run_search(model: str, spec: SearchSpec, base: Mapping[str, Any], trials: int, data_dir: str,
               out_dir: str, tracking: Tracking | None = None) -> Any:
    """Optuna TPE + ASHA over `spec.space`, `trials` trials; returns the Tune ResultGrid.

    `tracking`: one MLflow run per trial with its per-epoch metrics.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    import ray

    from raypipe import storage
    from raypipe.cluster import trial_resources
    from raypipe.ray_utils import describe_devices, require_gpus
    from raypipe.tracking import tracking_callbacks

    entry = searchable(model)
    base = dict(base)
    if spec.asha.max_t and "epochs" in base and spec.asha.max_t < int(base["epochs"]):
        log.info("search: asha.max_t=%d caps the base config's %s epochs", spec.asha.max_t, base["epochs"])
        base["epochs"] = spec.asha.max_t
    base_cfg = entry.config_class().model_validate(base)
    workers = spec.workers_per_trial or int(getattr(base_cfg, "num_workers", 1) or 1)
    use_gpu, gpus = bool(getattr(base_cfg, "use_gpu", False)), float(getattr(base_cfg, "gpus_per_worker", 1.0))
    plan = trial_resources(ray.cluster_resources(), workers, trials, spec.max_concurrent_trials, use_gpu=use_gpu,
                           gpus_per_worker=gpus, trial_cpus=spec.trial_cpus)
    log.info("%s", describe_devices(workers, use_gpu, gpus, what="search trials train"))
    require_gpus(workers * gpus if use_gpu else 0, f"raypipe tune {model}")
    log.info("search: %d trial(s), %d at once, trial driver %.2f CPU %s, %d worker(s) per trial with %s", trials,
             plan.max_concurrent, plan.trial_cpus, spec.trial_resources or "", workers, plan.worker_resources)
    task = SearchTask(model=model, base=base, data_dir=data_dir, out_dir=out_dir,
                      worker_resources=plan.worker_resources)
    trainable = tune.with_resources(tune.with_parameters(search_trial, task=task),
                                    {"CPU": plan.trial_cpus, **spec.trial_resources})
    path = storage.join(out_dir, "ray_results", EXPERIMENT_NAME)
    if tune.Tuner.can_restore(path):
        log.info("restoring the search in %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        max_t = spec.asha.max_t or int(getattr(base_cfg, "epochs", 10))
        # ASHA stops a trial the moment it reports iteration max_t, before the trial scores its best checkpoint
        # and writes predictions; one past the last epoch lets trials that survive every rung end on their own.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t + 1,
                                  grace_period=min(spec.asha.grace_period, max_t),
                                  reduction_factor=spec.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=trials,
                                        search_alg=OptunaSearch(seed=spec.seed), scheduler=scheduler,
                                        max_concurrent_trials=plan.max_concurrent, reuse_actors=False),
            run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=storage.join(out_dir, "ray_results"),
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures), verbose=1,
                                      callbacks=tracking_callbacks(tracking) or None),
        )
    return tuner.fit()


def results_table(grid: Any, metric: str, mode: str, trials_dir: str | None = None) -> pd.DataFrame:
    """One row per trial: id, status, sampled values, epochs run, last and best metric (+ node, starts)."""
    rows = []
    for r in grid:
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        values = hist[metric].dropna() if metric in hist.columns else pd.Series(dtype=float)
        flat = pd.json_normalize(decode(r.config), sep=".").iloc[0].to_dict() if r.config else {}
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id", os.path.basename(str(r.path))),
            "status": _trial_status(r, trials_dir),
            **{f"config.{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flat.items()},
            "epochs": int(len(hist)),
            f"last_{metric}": float(values.iloc[-1]) if len(values) else float("nan"),
            f"best_{metric}": float(values.max() if mode == "max" else values.min()) if len(values) else float("nan"),
        })
    table = pd.DataFrame(rows)
    if len(table) and trials_dir:
        table = _with_trial_nodes(table, trials_dir)
        table = table.sort_values(f"best_{metric}", ascending=(mode == "min"), na_position="last")
    return table.reset_index(drop=True)


def _trial_status(result: Any, trials_dir: str | None) -> str:
    """"error", "complete" (ran to the end and wrote its predictions) or "stopped" (pruned early by ASHA)."""
    from raypipe import storage

    if result.error is not None:
        return "error"
    if trials_dir is None:
        return "complete"
    trial_id = (result.metrics or {}).get("trial_id", os.path.basename(str(result.path)))
    done = storage.exists(storage.join(trials_dir, str(trial_id), "predictions.parquet"))
    return "complete" if done else "stopped"


def _with_trial_nodes(table: pd.DataFrame, trials_dir: str) -> pd.DataFrame:
    """Add each trial's node id and start count (from TRIALS/<id>/trial.json and attempts.log)."""
    from raypipe import storage

    nodes, starts = [], []
    for trial_id in table["trial_id"].astype(str):
        folder = storage.join(trials_dir, trial_id)
        info = (json.loads(storage.read_bytes(storage.join(folder, "trial.json")).decode())
                if storage.exists(storage.join(folder, "trial.json")) else {})
        log_file = storage.join(folder, "attempts.log")
        nodes.append(info.get("node_id", ""))
        starts.append(len(storage.read_bytes(log_file).decode().split()) if storage.exists(log_file) else 0)
    return table.assign(node_id=nodes, starts=starts)


def results_markdown(table: pd.DataFrame, metric: str, mode: str) -> str:
    """The results table as a Markdown report section (best trial first)."""
    cols = [c for c in table.columns if c not in ("node_id",)]
    lines = [f"## Hyperparameter search ({len(table)} trials, {mode} {metric})", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row[c] for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tune_cli(model: str, config: str, trials: int, data: str, out: str | None,
             overrides: Mapping[str, Any] | None = None, mlflow: bool = False) -> int:
    """`raypipe tune MODEL --config SPEC --trials N --data DIR --out DIR`: search, write the table and best config.

    `overrides` (`--set key=value`, `--gpus N`, `--cpu`) change the base training config before the search;
    `mlflow` (or MLFLOW_TRACKING_URI) tracks every trial, then a summary run with the results and best config.
    """
    import yaml

    from raypipe import storage
    from raypipe.config import set_dotted
    from raypipe.ray_utils import init_ray
    from raypipe.tracking import log_final, log_run_outputs, resolve_tracking, run_name_for

    if not data or not config:
        raise SystemExit(f"raypipe tune {model}: --config (a search spec YAML) and --data are required")
    try:
        entry = searchable(model)
    except KeyError as exc:
        raise SystemExit(f"raypipe tune: {exc.args[0]}") from None
    spec, base = load_search_spec(config)
    for key, value in (overrides or {}).items():
        set_dotted(base, key, value)
    out = out or os.path.join("runs", f"tune_{model}")
    out = str(out) if storage.is_uri(out) else os.path.abspath(out)
    data = str(data) if storage.is_uri(data) else os.path.abspath(data)
    storage.makedirs(out)
    tracking = resolve_tracking(out, run_name_for("tune", model, out), {**base, "search": spec.model_dump(mode="json")},
                                enabled=mlflow)
    init_ray()
    grid = run_search(model, spec, base, trials, data, out, tracking)
    table = results_table(grid, spec.metric, spec.mode, storage.join(out, "trials"))
    storage.atomic_write_text(storage.join(out, "results.csv"), table.to_csv(index=False))
    storage.atomic_write_text(storage.join(out, "report.md"), results_markdown(table, spec.metric, spec.mode))
    ok = [r for r in grid if r.error is None and r.metrics and spec.metric in r.metrics]
    if not ok:
        raise RuntimeError(f"no trial reported {spec.metric}; see {storage.join(out, 'ray_results', EXPERIMENT_NAME)}")
    best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="all", filter_nan_and_inf=True)
    best_cfg = trial_config(entry.config_class(), base, best.config)
    storage.atomic_write_text(storage.join(out, "best_config.yaml"),
                              yaml.safe_dump(best_cfg.model_dump(mode="json", exclude={"run_name"}), sort_keys=False))
    log.info("best trial: %s", json.dumps(decode(best.config)))
    if tracking is not None:  # the best trial's outputs (when it ran to the end) and the search's tables
        best_id = str((best.metrics or {}).get("trial_id", os.path.basename(str(best.path))))
        tables = [storage.join(out, n) for n in ("results.csv", "report.md", "best_config.yaml")]
        best_value = {f"best_{spec.metric}": float(best.metrics[spec.metric])}
        best_dir = storage.join(out, "trials", best_id)
        if storage.exists(storage.join(best_dir, "metrics.json")):
            log_run_outputs(tracking, best_dir, seed=spec.seed, artifacts=tables, extra_metrics=best_value)
        else:
            log_final(tracking, None, None, tables, extra_metrics=best_value)
    print(table.to_string(index=False))  # the command's output, not a log line
    print(f"best config: {storage.join(out, 'best_config.yaml')}")
    return 0
