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
max_concurrent_trials: 1
trial_cpus: 0.25
```
Each trial is a function (Ray Train V2: never `Tuner(trainer)`) that merges its sample into the base config
and calls the model's fit function, which builds and fits its own TorchTrainer with Tune's
`TuneReportCallback`, so every epoch's validation metric reaches Optuna and ASHA. Trials write
`OUT/trials/<trial_id>/` (a full run folder when not stopped early); the search writes `OUT/results.csv`
(one row per trial: sampled values, last and best metric) and `OUT/best_config.yaml` (the base config with
the best trial's values, ready for `raypipe train`). Rerunning with the same OUT restores the experiment
(`Tuner.restore`). `cv_cli` is `raypipe.tune.cv.cv_cli` with the X-ray models registered.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field

from raypipe.config import StrictModel

log = logging.getLogger(__name__)

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
    max_t: int | None = Field(None, ge=1, description="default: the base config's epochs")


class SearchSpec(StrictModel):
    """A search-spec YAML file (see the module docstring)."""

    config: str | None = Field(None, description="base training config, relative to the spec file")
    base: dict[str, Any] = Field(default_factory=dict, description="inline base config (applied after `config`)")
    metric: str = "val_c_index"
    mode: str = Field("max", pattern="^(max|min)$")
    space: dict[str, Distribution]
    asha: AshaSettings = Field(default_factory=AshaSettings)
    seed: int = 0
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.25, gt=0, description="CPUs of a trial's driver function (Train workers ask for theirs)")


# ---------------------------------------------------------------------------------------------- models
TuneFit = Callable[[BaseModel, str, str, Sequence[Any]], Any]


@dataclass(frozen=True)
class TuneModel:
    """A model `raypipe tune` can search: its config class and fit(config, data, out, callbacks)."""

    config_class: type[BaseModel]
    fit: TuneFit


def _fit_deepsurv(config: BaseModel, data: str, out: str, callbacks: Sequence[Any]) -> Any:
    """DeepSurv fit with Tune's report callback."""
    from raypipe.train.deepsurv import fit_deepsurv

    return fit_deepsurv(config, data, out, callbacks=callbacks)


def tune_models() -> dict[str, TuneModel]:
    """`raypipe tune` model names (imports deferred)."""
    from raypipe.train.xray_config import DeepSurvConfig

    return {"deepsurv": TuneModel(DeepSurvConfig, _fit_deepsurv)}


def register_xray_cv_models() -> None:
    """Make `raypipe cv deepsurv` known to `raypipe.tune.cv` (its registry of fold-fit functions)."""
    from raypipe.train.deepsurv import fit_deepsurv_fold
    from raypipe.train.xray_config import DeepSurvConfig
    from raypipe.tune.cv import CV_MODELS, CVModel, register_cv_model

    if "deepsurv" not in CV_MODELS:
        register_cv_model("deepsurv", CVModel(DeepSurvConfig, fit_deepsurv_fold, label="event"))


def cv_cli(model: str, config: str | None, folds: int | None, data: str | None, out: str | None) -> int:
    """`raypipe cv MODEL ...` for every registered model, the X-ray DeepSurv included."""
    from raypipe.tune import cv

    register_xray_cv_models()
    return cv.cv_cli(model, config, folds, data, out)


# ---------------------------------------------------------------------------------------------- spec
def load_search_spec(path: str | os.PathLike) -> tuple[SearchSpec, dict[str, Any]]:
    """The spec and its base config mapping (the `config` file, then `base` on top)."""
    from raypipe.config import parse_config, read_yaml

    raw = read_yaml(path)
    spec = parse_config(SearchSpec, raw, str(path))
    base: dict[str, Any] = {}
    if spec.config:
        base_path = Path(spec.config)
        if not base_path.is_absolute():
            base_path = Path(path).resolve().parent / base_path
        base = read_yaml(base_path)
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


def search_trial(sample: dict[str, Any], task: SearchTask) -> None:
    """The Tune trainable: merge the sample into the base config and fit (the callback reports epochs)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypipe import storage

    entry = tune_models()[task.model]
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(entry.config_class, task.base, sample)
    out = storage.join(task.out_dir, "trials", trial_id)
    entry.fit(cfg, task.data_dir, out, [TuneReportCallback()])


def run_search(model: str, spec: SearchSpec, base: Mapping[str, Any], trials: int, data_dir: str,
               out_dir: str) -> Any:
    """Optuna TPE + ASHA over `spec.space`, `trials` trials; returns the Tune ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from raypipe import storage

    entry = tune_models()[model]
    base_cfg = entry.config_class.model_validate(dict(base))
    task = SearchTask(model=model, base=dict(base), data_dir=data_dir, out_dir=out_dir)
    trainable = tune.with_resources(tune.with_parameters(search_trial, task=task), {"CPU": spec.trial_cpus})
    path = storage.join(out_dir, "ray_results", EXPERIMENT_NAME)
    if tune.Tuner.can_restore(path):
        log.info("restoring the search in %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        max_t = spec.asha.max_t or int(getattr(base_cfg, "epochs", 10))
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=min(spec.asha.grace_period, max_t),
                                  reduction_factor=spec.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=trials,
                                        search_alg=OptunaSearch(seed=spec.seed), scheduler=scheduler,
                                        max_concurrent_trials=spec.max_concurrent_trials, reuse_actors=False),
            run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=storage.join(out_dir, "ray_results"),
                                      verbose=0),
        )
    return tuner.fit()


def results_table(grid: Any, metric: str, mode: str) -> pd.DataFrame:
    """One row per trial: id, status, sampled values (`config/...`), epochs run, last and best metric."""
    rows = []
    for r in grid:
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        values = hist[metric].dropna() if metric in hist.columns else pd.Series(dtype=float)
        flat = pd.json_normalize(decode(r.config), sep=".").iloc[0].to_dict() if r.config else {}
        rows.append({
            "trial_id": (r.metrics or {}).get("trial_id", os.path.basename(str(r.path))),
            "status": "error" if r.error is not None else "ok",
            **{f"config.{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in flat.items()},
            "epochs": int(len(hist)),
            f"last_{metric}": float(values.iloc[-1]) if len(values) else float("nan"),
            f"best_{metric}": float(values.max() if mode == "max" else values.min()) if len(values) else float("nan"),
        })
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"best_{metric}", ascending=(mode == "min"), na_position="last")
    return table.reset_index(drop=True)


def tune_cli(model: str, config: str | None, trials: int, data: str | None, out: str | None) -> int:
    """`raypipe tune MODEL --config SPEC --trials N --data DIR --out DIR`: search, write the table and best config."""
    import yaml

    from raypipe import storage
    from raypipe.ray_utils import init_ray

    if not data or not config:
        raise SystemExit(f"raypipe tune {model}: --config (a search spec YAML) and --data are required")
    if model not in tune_models():
        raise SystemExit(f"raypipe tune: no search for model {model!r}; known: {', '.join(sorted(tune_models()))}")
    spec, base = load_search_spec(config)
    out = out or os.path.join("runs", f"tune_{model}")
    out = str(out) if storage.is_uri(out) else os.path.abspath(out)
    data = str(data) if storage.is_uri(data) else os.path.abspath(data)
    storage.makedirs(out)
    init_ray()
    grid = run_search(model, spec, base, trials, data, out)
    table = results_table(grid, spec.metric, spec.mode)
    storage.atomic_write_text(storage.join(out, "results.csv"), table.to_csv(index=False))
    ok = [r for r in grid if r.error is None and r.metrics and spec.metric in r.metrics]
    if not ok:
        raise RuntimeError(f"no trial reported {spec.metric}; see {storage.join(out, 'ray_results', EXPERIMENT_NAME)}")
    best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="all", filter_nan_and_inf=True)
    best_cfg = trial_config(tune_models()[model].config_class, base, best.config)
    storage.atomic_write_text(storage.join(out, "best_config.yaml"),
                              yaml.safe_dump(best_cfg.model_dump(mode="json", exclude={"run_name"}), sort_keys=False))
    log.info("best trial: %s", json.dumps(decode(best.config)))
    print(table.to_string(index=False))  # the command's output, not a log line
    print(f"best config: {storage.join(out, 'best_config.yaml')}")
    return 0
