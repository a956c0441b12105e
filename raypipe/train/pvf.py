"""`raypipe train pvf`: the Verte-X pVF classifier (papers/004, Methods 4-5) on Ray Train.

EfficientNet-B4 (`raypipe.models.pvf`) with one logit for a prevalent vertebral fracture on a lateral
radiograph resized to 1024 x 512 with the aspect kept (zero padded), CLAHE and normalisation
(`raypipe.preprocess.pvf.pvf_input`). BCE-with-logits, Adam, early stopping on the validation AUROC;
the best checkpoint scores the validation and test studies into ``predictions.parquet`` (label =
the prevalent fracture), ``metrics.json`` (AUROC with its bootstrap CI and the threshold metrics, via
`raypipe.evaluate.evaluate_frame`), Grad-CAM PNGs of a few held-out images in ``gradcam/``, and
``model.pt`` + ``model_meta.json`` (builder, kwargs, task "pvf", preprocessing) + ``config.yaml``,
the same layout as `raypipe.train.ct`. ``--data`` is a manifest (radiographs read on the fly by Ray
Data) or a folder of `raypipe preprocess xray` shards with one-channel full images. Each worker decodes its
training radiographs once, in the first epoch, and keeps the classifier inputs in memory as float16
(`raypipe.data.memory`; `cache_train: false` streams and decodes them every epoch instead).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator
from torch import nn

from raypipe import storage
from raypipe.config import ScaleRange
from raypipe.data.memory import MemoryLoader, cache_rows
from raypipe.losses import masked_bce
from raypipe.metrics import auroc_or_nan
from raypipe.models.pretrained import check_pretrained
from raypipe.preprocess.pvf import PVFPreprocess
from raypipe.train.common import autocast
from raypipe.train.config import InputConfig, RayRunConfig
from raypipe.train.fold import UNUSED_ROLE, FoldTask
from raypipe.train.loop import CHECKPOINT_SCORE, WorkerTask, run_worker_loop

log = logging.getLogger(__name__)


_PVF = PVFPreprocess()  # the one place the pVF input defaults live


class PVFTrainConfig(InputConfig, RayRunConfig):
    """One pVF classifier run; defaults follow Verte-X (EfficientNet-B4, 1024 x 512, CLAHE)."""

    model: str = Field("pvf_efficientnet_b4", description="registry name: pvf_efficientnet_b4 or pvf_tiny")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    display_name: str = "pvf"
    pretrained: Literal["imagenet", "none"] = Field("imagenet", description="imagenet: load pretrained_path (required, must exist); none: random init, stated explicitly")
    pretrained_path: str | None = Field(None, description="local ImageNet EfficientNet-B4 weights (torchvision or timm layout)")
    input_size: tuple[int, int] = Field(_PVF.size, description="rows x cols after fit-and-pad")
    clip_limit: float = Field(_PVF.clip_limit, ge=0, description="CLAHE clip limit (0 disables)")
    tiles: tuple[int, int] = Field(_PVF.tiles, description="CLAHE tile grid")
    norm_mean: float = Field(_PVF.mean, description="input normalisation: (x - mean) / std")
    norm_std: float = Field(_PVF.std, gt=0, description="input normalisation: (x - mean) / std")
    label: str = Field("prevalent_fracture", description="binary target column")

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    epochs: int = Field(30, ge=1)
    pos_weight: float | None = Field(None, gt=0, description="BCE weight of positives (None: balanced from data)")
    augment: bool = Field(True, description="random similarity + flip + contrast per training image (no memorising)")
    rotation_deg: float = Field(8.0, ge=0, description="augmentation: rotation drawn from U(-r, r)")
    scale_range: ScaleRange = Field((0.9, 1.1), description="augmentation: isotropic scale range")
    translate_frac: float = Field(0.05, ge=0, description="augmentation: shift up to this fraction of each side")
    flip_prob: float = Field(0.5, ge=0, le=1, description="augmentation: left-right flip (anterior side) probability")
    contrast_jitter: float = Field(0.1, ge=0, description="augmentation: gain 1 +- j and offset +- j (input units)")
    grad_clip: float | None = Field(None, gt=0)
    freeze_batchnorm: bool = False
    monitor: str = "val_auroc"
    monitor_mode: Literal["max", "min"] = "max"
    patience: int = Field(8, ge=1)
    min_delta: float = Field(0.0, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    gradcam_images: int = Field(4, ge=0, description="held-out images with a Grad-CAM PNG")
    bn_recalibration_batches: int = Field(
        8, ge=0, description="after each epoch, recompute BatchNorm statistics over this many training batches")

    @model_validator(mode="after")
    def _check_pretrained(self) -> "PVFTrainConfig":
        check_pretrained(self.pretrained, self.pretrained_path, owner=type(self).__name__)
        return self

    @property
    def name(self) -> str:
        return self.display_name

    def preprocess(self) -> dict[str, Any]:
        """The input settings (`raypipe.preprocess.pvf.PVFPreprocess`), saved with the model for scoring."""
        return PVFPreprocess(tuple(self.input_size), self.clip_limit, tuple(self.tiles), self.norm_mean,
                             self.norm_std).to_dict()


def model_kwargs(cfg: PVFTrainConfig) -> dict[str, Any]:
    """Registry kwargs: one-channel input plus the config's overrides."""
    kw: dict[str, Any] = {"in_chans": 1, **cfg.model_kwargs}
    if cfg.pretrained_path:
        kw["pretrained_path"] = cfg.pretrained_path
    return kw


def build(cfg: PVFTrainConfig) -> nn.Module:
    """The registered classifier of this config."""
    from raypipe.models.registry import build_model

    return build_model(cfg.model, **model_kwargs(cfg))


# ---------------------------------------------------------------------------------------------- data
class PVFInputs:
    """Ray Data map_batches: manifest rows (image_path) or shard rows (image) -> classifier input `x`."""

    def __init__(self, preprocess: Mapping[str, Any], label: str) -> None:
        self.p, self.label = dict(preprocess), label

    def _pixels(self, row: Mapping[str, Any]) -> np.ndarray:
        from raypipe.io.radiograph import read_radiograph

        if "image" in row and row["image"] is not None:
            img = np.asarray(row["image"], dtype=np.float32)
            if img.ndim == 3 and img.shape[0] != 1:
                raise ValueError(f"study {row.get('study_id')}: pvf needs one-channel full images, got {img.shape}")
            return img.reshape(img.shape[-2:])
        return read_radiograph(row["image_path"]).pixels

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        rows = batch.to_dict("records")
        prepare = PVFPreprocess.from_dict(self.p)
        x = [prepare(self._pixels(r)) for r in rows]
        y = pd.to_numeric(batch[self.label], errors="coerce").to_numpy(dtype=np.float32) \
            if self.label in batch.columns else np.full(len(rows), np.nan, np.float32)
        return {"study_id": batch["study_id"].astype(str).to_numpy(), "x": np.stack(x).astype(np.float32), "y": y}


def read_table(data: str) -> tuple[pd.DataFrame, str]:
    """Studies with their metadata and the data kind ("manifest" or "shards")."""
    if storage.is_dir(data) and not storage.is_file(storage.join(data, "manifest.csv")):
        from raypipe.data.xray_pipeline import load_xray_shards

        meta = load_xray_shards(data, backend="ray").drop_columns(["image"]).to_pandas()
        return meta.assign(study_id=meta["study_id"].astype(str)), "shards"
    from raypipe.io.manifest import load_manifest

    path = storage.join(data, "manifest.csv") if storage.is_dir(data) else data
    table = load_manifest(path)
    return table[table["modality"] == "XR"].reset_index(drop=True), "manifest"


def dataset_for(data: str, kind: str, table: pd.DataFrame, ids: list[str], cfg: PVFTrainConfig) -> Any:
    """Ray dataset of classifier inputs for the studies `ids`."""
    import ray.data

    fn = PVFInputs(cfg.preprocess(), cfg.label)
    if kind == "manifest":
        cols = [c for c in ("study_id", "image_path", cfg.label) if c in table.columns]
        sub = table[table["study_id"].isin(ids)][cols].reset_index(drop=True)
        return ray.data.from_pandas(sub).map_batches(fn, batch_format="pandas", batch_size=8)
    from raypipe.data.subsets import subset_studies
    from raypipe.data.xray_pipeline import load_xray_shards

    ds = load_xray_shards(data, backend="ray").select_columns(["study_id", "image", cfg.label])
    return subset_studies(ds, ids).map_batches(fn, batch_format="pandas", batch_size=8)


def train_loader(cfg: PVFTrainConfig, shard: Any, batch_size: int) -> MemoryLoader:
    """Read this worker's training inputs once (float16, after CLAHE and resizing) and serve shuffled, prefetched
    batches from memory: every later epoch (and the BatchNorm recalibration) skips decoding the radiographs."""
    rows = cache_rows(shard.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=cfg.prefetch_batches),
                      "x", False, lambda b: {"y": torch.from_numpy(np.array(b["y"], np.float32))},
                      lambda x: x.astype(np.float16))
    log.info("training rows cached in memory: %d radiographs, %.1f MiB", len(rows), rows.nbytes / 2**20)
    return MemoryLoader(rows, batch_size, None, shuffle=True, seed=cfg.seed, prefetch=cfg.prefetch_batches)


def cached_batches(loader: MemoryLoader, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, None]]:
    """(x float16, y, None) batches of one epoch from memory, shaped as `input_batches` yields them; `x` lives in a
    reused (pinned on CUDA) buffer: copy or move it before asking for more than `prefetch + 2` further batches."""
    for b in loader.epoch(epoch):
        yield b["x"], b["y"], None


def input_batches(ds_or_shard: Any, batch_size: int, seed: int | None = None) -> Any:
    """(x, y, study ids) torch batches of a `dataset_for` dataset or its Ray Train shard; locally shuffled with `seed`."""
    kw = {"local_shuffle_buffer_size": 64, "local_shuffle_seed": seed} if seed is not None else {}
    for b in ds_or_shard.iter_batches(batch_size=batch_size, batch_format="numpy", **kw):
        x, y = (torch.from_numpy(np.require(b[k], np.float32, ["W"])) for k in ("x", "y"))  # writable: no torch warning
        yield x, y, [str(s) for s in b["study_id"]]


# ---------------------------------------------------------------------------------------------- worker loop
def weighted_bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Class-weighted BCE-with-logits over the known labels (few positives: weight them up)."""
    known = torch.isfinite(y)
    yy = torch.nan_to_num(y)
    weight = torch.where(yy > 0.5, pos_weight, torch.ones_like(yy)) * known
    per = nn.functional.binary_cross_entropy_with_logits(logits.float(), yy, reduction="none")
    return (per * weight).sum() / weight.sum().clamp(min=1e-6)


@torch.no_grad()
def augment_batch(x: torch.Tensor, cfg: PVFTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random similarity (rotate, scale, shift, flip) and contrast per image; padding keeps its input value.

    Works in the normalised input space on whole batches (``grid_sample``), so the classifier never sees
    the same pixels twice and has to learn vertebral shape rather than memorise studies.
    """
    n = x.shape[0]
    rows, cols = x.shape[-2:]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    angle = torch.deg2rad(u(-cfg.rotation_deg, cfg.rotation_deg))
    scale = u(*cfg.scale_range)
    flip = torch.where(torch.rand(n, generator=generator) < cfg.flip_prob, -1.0, 1.0)
    shift = torch.stack([u(-cfg.translate_frac, cfg.translate_frac), u(-cfg.translate_frac, cfg.translate_frac)], 1) * 2
    aspect = rows / cols  # normalised grid coordinates: rotate in pixel units, not in the unit square
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin * aspect
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip / aspect, cos
    theta[:, :, 2] = shift
    fill = -cfg.norm_mean / cfg.norm_std  # value of the zero padding after normalisation
    grid = nn.functional.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    out = nn.functional.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    j = cfg.contrast_jitter
    gain = u(1 - j, 1 + j).to(x.device).view(n, 1, 1, 1)
    offset = u(-j, j).to(x.device).view(n, 1, 1, 1)
    return out * gain + offset


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Any, max_batches: int) -> int:
    """Recompute BatchNorm running statistics as plain averages over a few training batches.

    Why: torchvision's EfficientNet uses BN momentum 0.01, so after a few hundred steps the running
    statistics still sit near their initial values (mean 0, var 1) and eval-mode activations shrink
    block after block until every image gets the same score; averaging over fresh batches fixes that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    n = 0
    for x in batches:
        if n >= max_batches:
            break
        model(x)
        n += 1
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    model.train(was_training)
    return n


class PVFWorkerTask(WorkerTask):
    """Hooks of the shared worker loop for the pVF classifier: weighted BCE, batch augmentation, BN recalibration."""

    #: EfficientNet's depthwise convolutions: a 256 x 192 training step of the tiny net takes ~230 ms in
    #: channels_last on 2 CPU cores against ~300 ms contiguous (the CT and DeepSurv ResNets are slower with it)
    cpu_channels_last = True

    def __init__(self, cfg: PVFTrainConfig, loop_config: Mapping[str, Any]) -> None:
        super().__init__(cfg, loop_config)
        self.generator = torch.Generator()
        self.pos_weight: torch.Tensor | None = None
        self.loader: MemoryLoader | None = None
        self.val: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def build_model(self) -> nn.Module:
        self.pos_weight = torch.tensor(float(self.loop_config["pos_weight"]), device=self.setup.device)
        return build(self.cfg)

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        self.generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch * 1_009 + self.rank)
        return {}

    def train_batches(self, epoch: int, batch_size: int) -> Any:
        import ray.train

        if not self.cfg.cache_train:
            return input_batches(ray.train.get_dataset_shard("train"), batch_size, self.cfg.seed + epoch)
        if self.loader is None:
            self.loader = train_loader(self.cfg, ray.train.get_dataset_shard("train"), batch_size)
        return cached_batches(self.loader, epoch)

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        x, y, _ = batch
        # to the device first (float16 from the cache: half the bytes), then convert and augment there
        x = x.to(self.setup.device, non_blocking=x.is_pinned()).float()
        y = y.to(self.setup.device)
        if self.cfg.augment:
            x = augment_batch(x, self.cfg, self.generator)
        if self.setup.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.setup):
            out = model(x)
        return self.loss(out, y), len(y)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Class-weighted BCE of the logits (the age regressor overrides this with its regression loss)."""
        return weighted_bce(out, y, self.pos_weight)

    def end_epoch(self, model: nn.Module, epoch: int, batch_size: int) -> None:
        import ray.train

        if not self.cfg.bn_recalibration_batches:
            return
        batches = cached_batches(self.loader, epoch) if self.loader is not None \
            else input_batches(ray.train.get_dataset_shard("train"), batch_size)
        try:
            recalibrate_batchnorm(model, (x.to(self.setup.device).float() for x, _, _ in batches),
                                  self.cfg.bn_recalibration_batches)
        finally:
            batches.close()  # stops the prefetch thread of a cached epoch that was not drained

    def validation_batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) validation batches: read once and kept in memory as float16 when `cache_train`, else streamed from
        the materialised dataset every epoch (one Ray Data pass, and one progress bar in the log, per epoch)."""
        import ray.train

        if self.val is not None:
            return self.val
        streamed = input_batches(ray.train.get_dataset_shard("val"), self.cfg.eval_batch_size)
        if not self.cfg.cache_train:
            return ((x, y) for x, y, _ in streamed)
        self.val = [(x.half(), y) for x, y, _ in streamed]
        return self.val

    def validate(self, model: nn.Module) -> dict[str, float]:
        return _validate(model, self.setup, self.validation_batches())


def train_loop_pvf(loop_config: dict) -> None:
    """Ray Train worker loop of the pVF classifier (the shared skeleton, `raypipe.train.loop`)."""
    run_worker_loop(PVFWorkerTask(PVFTrainConfig.model_validate(loop_config["config"]), loop_config))


@torch.no_grad()
def _validate(model: nn.Module, setup: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Validation BCE and AUROC over the whole validation set."""
    model.eval()
    logits, labels, total, n = [], [], 0.0, 0
    for x, y in batches:
        with autocast(setup):
            out = model(x.to(setup.device).float()).float().cpu()
        total, n = total + float(masked_bce(out, y)) * len(y), n + len(y)
        logits.append(out.numpy())
        labels.append(y.numpy())
    if not logits:
        return {"val_loss": float("nan"), "val_auroc": float("nan")}
    return {"val_loss": total / max(n, 1), "val_auroc": auroc_or_nan(np.concatenate(labels), np.concatenate(logits))}


# ---------------------------------------------------------------------------------------------- driver
def study_table(data: str) -> pd.DataFrame:
    """One row per radiograph of `data` (manifest or shard folder) with its metadata: what `raypipe cv pvf` folds."""
    return read_table(data)[0]


def split_studies(cfg: PVFTrainConfig, data: str, roles: pd.Series | None = None, monitor_split: str = "val",
                  studies: tuple[pd.DataFrame, str] | None = None,
                  ) -> tuple[pd.DataFrame, str, pd.Series, list[str], list[str]]:
    """(table, data kind, role per study, labelled training study ids, monitored study ids) of `data`, split by
    patient, or by `roles` (study_id -> role, as k-fold CV gives them; studies it lacks are `unused`); a clear
    error when the label column is absent or a side is empty. `studies` is `read_table(data)` when the caller
    already read it (a CV fold does, to make its roles)."""
    from raypipe.data.splits import split_by_patient

    table, kind = studies if studies is not None else read_table(data)
    if cfg.label not in table.columns:
        raise ValueError(f"{data}: no {cfg.label!r} column to train on")
    if roles is None:
        role = split_by_patient(table, cfg.label, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    else:
        mapping = roles.astype(str).to_dict()
        role = pd.Series(table["study_id"].astype(str).map(mapping).fillna(UNUSED_ROLE).to_numpy(), index=table.index)
    labelled = pd.to_numeric(table[cfg.label], errors="coerce").notna()
    train_ids = table.loc[((role == "train") & labelled).to_numpy(), "study_id"].astype(str).tolist()
    val_ids = table.loc[(role == monitor_split).to_numpy(), "study_id"].astype(str).tolist()
    if not train_ids or not val_ids:
        raise ValueError(f"need training and {monitor_split!r} studies, got {len(train_ids)} and {len(val_ids)}")
    return table, kind, role, train_ids, val_ids


@dataclass(frozen=True)
class FittedRun:
    """A finished Ray Train run of a pVF-family network with the data split it was trained on."""

    result: Any
    out: str
    table: pd.DataFrame
    kind: str
    role: pd.Series
    settings: dict[str, Any]


def fit_network(cfg: PVFTrainConfig, data: str, out_dir: str, callbacks: Sequence[Any], train_loop: Callable[[dict], None],
                settings: Callable[[pd.Series], dict[str, Any]], roles: pd.Series | None = None,
                monitor_split: str = "val", studies: tuple[pd.DataFrame, str] | None = None) -> FittedRun:
    """The driver the pVF-family tasks share: split by patient (or by `roles`), build the Ray datasets, train
    `train_loop` on Ray Train with the loop settings `settings(training labels)` returns (e.g. pos_weight, the age
    scale); early stopping and the checkpoint watch the `monitor_split` rows."""
    from raypipe import storage
    from raypipe.train.common import make_trainer

    out = str(out_dir) if storage.is_uri(out_dir) else os.path.abspath(out_dir)
    storage.makedirs(out)
    storage_path = cfg.storage_path or storage.join(out, "ray_results")
    table, kind, role, train_ids, val_ids = split_studies(cfg, data, roles, monitor_split, studies)
    extra = settings(pd.to_numeric(table.set_index("study_id").loc[train_ids, cfg.label], errors="coerce"))
    log.info("%s: %d train, %d %s studies (model selection); %s", cfg.name, len(train_ids), len(val_ids), monitor_split,
             extra)
    run_dir = storage.join(storage_path, cfg.run_name)
    trainer = make_trainer(
        train_loop, {"config": cfg.model_dump(mode="json"), **extra, "metrics_csv": storage.join(run_dir, "metrics.csv")},
        {"train": dataset_for(data, kind, table, train_ids, cfg), "val": dataset_for(data, kind, table, val_ids, cfg)},
        run=cfg, storage_path=storage_path, callbacks=callbacks, score_attribute=CHECKPOINT_SCORE,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return FittedRun(result, out, table, kind, role, extra)


def fit_pvf(config: PVFTrainConfig, data: str, out_dir: str, callbacks: Sequence[Any] = (),
            roles: pd.Series | None = None, monitor_split: str = "val",
            studies: tuple[pd.DataFrame, str] | None = None) -> Any:
    """Train the pVF classifier on `data` (manifest or shard folder); write the run folder into `out_dir`.

    `roles` (study_id -> train / tune / val / external / unused) replaces the patient split, as k-fold CV does;
    the `monitor_split` rows choose the checkpoint; every role but `train` and `unused` is scored.
    """

    def class_weight(y_train: pd.Series) -> dict[str, Any]:
        n_pos = float((y_train > 0.5).sum())
        return {"pos_weight": config.pos_weight or (float(len(y_train) - n_pos) / n_pos if n_pos > 0 else 1.0),
                "train_positives": int(n_pos)}

    run = fit_network(config, data, out_dir, callbacks, train_loop_pvf, class_weight, roles, monitor_split, studies)
    _write_outputs(config, run.result, data, run.kind, run.table, run.role, run.out)
    return run.result


def fit_pvf_fold(task: FoldTask) -> dict[str, float]:
    """Fold-fit (`raypipe.tune.cv`): pVF on the fold's training patients, split again by patient into train and
    `tune` (checkpoint, early stopping; the CV's cut-off); the held-out fold is scored once as split `val`."""
    from raypipe.data.splits import TUNE_ROLE
    from raypipe.train.fold import fold_config, fold_roles, fold_summary

    cfg = fold_config(task.config, task.fold)
    studies = read_table(task.data_dir)  # read once: the fold's roles and the fit use the same table
    roles = fold_roles(studies[0], task, cfg.label, cfg.seed, cfg.val_fraction)
    fit_pvf(cfg, task.data_dir, task.out_dir, task.callbacks, roles=roles, monitor_split=TUNE_ROLE, studies=studies)
    return fold_summary(task.out_dir)


def _write_outputs(cfg: PVFTrainConfig, result: Any, data: str, kind: str, table: pd.DataFrame, role: pd.Series,
                   out: str) -> None:
    """Best checkpoint -> the run files, held-out rows scored once, Grad-CAM PNGs in gradcam/."""
    from raypipe import storage
    from raypipe.artifact import RunArtifact
    from raypipe.config import config_hash
    from raypipe.predictions import CLINICAL_COLUMNS
    from raypipe.train.outputs import best_and_latest, selection_fields, write_run_files, write_scored

    payload, latest = best_and_latest(result)
    model = build(cfg)
    model.load_state_dict(payload["model"])
    model.eval()
    selection = selection_fields(cfg, payload, latest)
    artifact = RunArtifact(builder=cfg.model, kwargs=model_kwargs(cfg), task="pvf", train_task="pvf",
                           display_name=cfg.name, preprocess=cfg.preprocess(), labels=[cfg.label],
                           score_kind="probability", config_hash=config_hash(cfg), **selection, label=cfg.label)
    write_run_files(out, cfg, payload["model"], latest["state"]["history"], artifact)

    scored = (~role.isin(["train", UNUSED_ROLE])).to_numpy()
    held = table[scored].copy()
    held["split"] = role[scored].to_numpy()
    ids = held["study_id"].astype(str).tolist()
    scores, first = _score(model, dataset_for(data, kind, table, ids, cfg), cfg)
    held["study_id"] = held["study_id"].astype(str)
    held = held.merge(scores, on="study_id", how="inner", validate="one_to_one")
    keep = ["patient_id", "study_id", "split", *[c for c in ("time_days", "event") if c in held.columns],
            *[c for c in CLINICAL_COLUMNS if c in held.columns]]
    frame = held[list(dict.fromkeys(keep))].assign(
        fold=-1, model=cfg.name, score=held["score"].to_numpy(), score_kind="probability",
        label=pd.to_numeric(held[cfg.label], errors="coerce").to_numpy())
    metrics = write_scored(out, frame, cfg, selection["best_epoch"])
    auroc = metrics["models"].get(cfg.name, {}).get("auroc", {})
    log.info("pvf held-out AUROC %s (95%% CI %s-%s)", auroc.get("value"), auroc.get("ci_low"), auroc.get("ci_high"))
    _write_gradcam(model, first, storage.join(out, "gradcam"))


@torch.no_grad()
def _score(model: nn.Module, ds: Any, cfg: PVFTrainConfig) -> tuple[pd.DataFrame, list[tuple[str, torch.Tensor]]]:
    """pVF scores keyed by study_id, plus the first few inputs for Grad-CAM."""
    rows, first = [], []
    for x, _, sids in input_batches(ds, cfg.eval_batch_size):
        rows.append(pd.DataFrame({"study_id": sids, "score": torch.sigmoid(model(x).float()).numpy()}))
        first += [(s, x[i:i + 1]) for i, s in enumerate(sids)][: max(0, cfg.gradcam_images - len(first))]
    return (pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({"study_id": [], "score": []})), first


def _write_gradcam(model: nn.Module, items: list[tuple[str, torch.Tensor]], folder: str) -> None:
    """One Grad-CAM overlay PNG per held-out study (`raypipe.explain.gradcam`)."""
    if not items:
        return
    from PIL import Image

    from raypipe.explain.gradcam import grad_cam, overlay

    import io

    for sid, x in items:
        cam = grad_cam(model, model.gradcam_layer, x)[0].numpy()
        buf = io.BytesIO()
        Image.fromarray(overlay(x[0, 0].numpy(), cam)).save(buf, format="PNG")
        storage.atomic_write_bytes(storage.join(folder, f"{sid}.png"), buf.getvalue())
