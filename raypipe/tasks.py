"""The task registry: every model task declared once, as data. The CLI, cv, tune, jobs and publish read it.

One `Task` per trainable model. Functions and classes are named by import path ("module:attribute") and
resolved only when used, so importing this module imports nothing else of raypipe (no work at import
time, no import cycles) and `raypipe --help` stays fast. Adding an entry to `TASKS` is enough for the
task to appear in `raypipe train`, and in `raypipe cv` / `raypipe tune` when it declares a fold-fit /
search support.

Contracts of the named functions:
- `fit(config, data, out, callbacks=())`: train with Ray Train on `data` (shards or a manifest), write
  the run folder (`raypipe.train.outputs`: model.pt, model_meta.json, predictions, metrics) into `out`.
- `fold_fit(task: raypipe.train.fold.FoldTask) -> dict[str, float]`: one cross-validation fold; model
  selection on an inner split of the fold's training patients only; writes the fold's run folder.
- `study_meta(data) -> DataFrame`: one row per study of `data` (patient_id, study_id, site, split, labels),
  what `raypipe cv` assigns folds from; default: the shards' scalar columns.
- `after_train(out, data)` (optional): extra outputs of a finished `raypipe train` run (e.g. Grad-CAM).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

DataKind = Literal["ct-shards", "xray-shards", "manifest", "manifest-or-xray-shards"]


def resolve(path: str) -> Any:
    """The object an import path "package.module:attribute" names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Task:
    """One model task: its names, config class, fit functions and what `cv` / `tune` may do with it."""

    name: str  # the CLI name: `raypipe train NAME`
    summary: str  # one line for --help
    config: str  # import path of the pydantic config class (a `raypipe.train.config.RayRunConfig`)
    fit: str  # import path of fit(config, data, out, callbacks=())
    data: DataKind  # what --data must be
    fold_fit: str | None = None  # import path of the fold-fit function; None: no `raypipe cv`
    tune: bool = False  # `raypipe tune` can search it (its fit reports a validation metric every epoch)
    stratify: str | None = None  # CV stratification label when the config names none
    gradcam: str | None = None  # import path of a Grad-CAM writer for CV galleries
    after_train: str | None = None  # import path of after_train(out, data)
    paper_configs: tuple[str, ...] = ()  # jobs/configs files with the papers' settings
    tiny_config: str | None = None  # jobs/configs file that trains in minutes on 2 CPU cores
    study_meta: str = "raypipe.data.subsets:shard_meta"  # import path of study_meta(data), read by `raypipe cv`

    @property
    def cv(self) -> bool:
        """Whether `raypipe cv` supports the task."""
        return self.fold_fit is not None

    def config_class(self) -> type:
        """The task's config class (imported on demand)."""
        return resolve(self.config)

    def fit_function(self) -> Any:
        """The task's fit function (imported on demand)."""
        return resolve(self.fit)

    def fold_fit_function(self) -> Any:
        """The task's fold-fit function; a clear error when the task has no cross-validation."""
        if self.fold_fit is None:
            raise KeyError(f"task {self.name!r} has no cross-validation")
        return resolve(self.fold_fit)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cnn-rnn", "CT attention CNN-RNN (papers/000): 5-year vertebral fracture from 14 T12-L4 slices",
             "raypipe.train.config:CTTrainConfig", "raypipe.train.ct:fit_ct", "ct-shards",
             fold_fit="raypipe.train.ct:fit_ct_fold", tune=True, stratify="fracture_5y",
             gradcam="raypipe.explain.ct_gallery:write_run_gradcam",
             after_train="raypipe.explain.ct_gallery:write_train_gallery",
             paper_configs=("ct_bone_only.yaml", "ct_bone_muscle.yaml"), tiny_config="ct_tiny.yaml"),
        Task("multitask", "CT multitask model (papers/002): prevalent fracture + Cox + horizon heads",
             "raypipe.train.config:MultitaskConfig", "raypipe.train.ct:fit_ct", "ct-shards",
             fold_fit="raypipe.train.ct:fit_ct_fold", tune=True, stratify="fracture_5y",
             gradcam="raypipe.explain.ct_gallery:write_run_gradcam",
             after_train="raypipe.explain.ct_gallery:write_train_gallery",
             paper_configs=("ct_multitask.yaml",), tiny_config="ct_multitask_tiny.yaml"),
        Task("keypoints", "X-ray L1-L5 keypoints (HRNet-W32 heatmaps, papers/001)",
             "raypipe.train.xray_config:KeypointTrainConfig", "raypipe.train.keypoints:fit_keypoints", "manifest",
             paper_configs=("keypoints.yaml",), tiny_config="keypoints_tiny.yaml"),
        Task("deepsurv", "X-ray DeepSurv (papers/001): Cox partial likelihood CNN + clinical variables",
             "raypipe.train.xray_config:DeepSurvConfig", "raypipe.train.deepsurv:fit_deepsurv", "xray-shards",
             fold_fit="raypipe.train.deepsurv:fit_deepsurv_fold", tune=True, stratify="event",
             paper_configs=("xray_deepsurv.yaml",), tiny_config="xray_deepsurv_tiny.yaml"),
        Task("pvf", "Prevalent-fracture classifier (EfficientNet-B4, papers/004) scoring radiographs",
             "raypipe.train.pvf:PVFTrainConfig", "raypipe.train.pvf:fit_pvf", "manifest-or-xray-shards",
             fold_fit="raypipe.train.pvf:fit_pvf_fold", stratify="prevalent_fracture",
             study_meta="raypipe.train.pvf:study_table", paper_configs=("pvf.yaml",), tiny_config="pvf_tiny.yaml"),
        Task("age", "Age regressor (the pVF EfficientNet, papers/004 Methods 8): checks generated images' age",
             "raypipe.train.age:AgeRegressorConfig", "raypipe.train.age:fit_age", "manifest-or-xray-shards",
             paper_configs=("age.yaml",), tiny_config="age_tiny.yaml"),
        Task("ldm", "Diff-X latent diffusion models (papers/004): future radiographs from a prompt",
             "raypipe.train.ldm:LDMTrainConfig", "raypipe.train.ldm:fit_ldm", "manifest",
             paper_configs=("ldm.yaml",), tiny_config="ldm_tiny.yaml"),
    )
}

DATA_HELP: dict[str, str] = {
    "ct-shards": "a folder of `raypipe preprocess ct` shards",
    "xray-shards": "a folder of `raypipe preprocess xray` shards",
    "manifest": "a manifest (CSV/Parquet, or a folder holding manifest.csv)",
    "manifest-or-xray-shards": "a manifest, or a folder of `raypipe preprocess xray` shards",
}


def get_task(name: str) -> Task:
    """The registered task of a CLI name (`cnn_rnn` is read as `cnn-rnn`); KeyError lists the known ones."""
    key = name if name in TASKS else name.replace("_", "-")
    if key not in TASKS:
        raise KeyError(f"unknown model task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[key]


def train_names() -> list[str]:
    """Every task `raypipe train` accepts."""
    return list(TASKS)


def cv_names() -> list[str]:
    """Tasks with cross-validation (`raypipe cv`)."""
    return [n for n, t in TASKS.items() if t.cv]


def tune_names() -> list[str]:
    """Tasks `raypipe tune` can search."""
    return [n for n, t in TASKS.items() if t.tune]
