"""Ray Train loops for the CT branch: the attention CNN-RNN (papers/000) and the multitask model (papers/002).

The file reads top to bottom like a training script:

1. `SliceBatch` turns a batch of shard rows (ragged S x H x W slice stacks) into model inputs: 14
   equidistant slices per study with a random start when training (seeded by seed, epoch and study, so
   the result does not depend on which worker sees the study), centred when evaluating; clinical
   variables standardised with the training split's means and SDs.
2. `train_loop_cnn_rnn` / `train_loop_multitask` run in every Ray Train worker: stream the "train" shard
   (per-worker batch = global batch / workers), DDP through `prepare_model`, one checkpoint per epoch,
   validation on the full validation set by rank 0 (broadcast to all ranks so early stopping agrees).
3. `fit_ct` on the driver: read the shards, split by patient, train, then score the validation and test
   rows with the best checkpoint and write predictions.parquet, metrics.json, config.yaml, metrics.csv,
   model.pt and model_meta.json.

Loss of the CNN-RNN: the paper's "cross-entropy" over two classes equals binary cross-entropy on one
logit (softmax over [0, z] is sigmoid(z)), so the model has one output and uses BCE-with-logits.
Multitask loss: BCE on the prevalent fracture + Cox partial likelihood over the global batch (gathered
across workers) + BCE per horizon where the horizon label is known (event before it, or follow-up past it).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from raypipe.train.common import (
    DeviceSetup,
    TrainState,
    all_reduce_mean,
    autocast,
    best_checkpoint,
    freeze_batchnorm,
    per_worker_batch,
    read_checkpoint,
    report_epoch,
    resume,
    score_for_ranking,
    seed_everything,
    select_device,
    to_device_model,
    unwrap,
    world_rank,
    world_size,
)
from raypipe.train.config import CTTrainConfig, MultitaskConfig

log = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25
VALIDATION_SPLITS = ("val", "valid", "validation")
CHECKPOINT_SCORE = "checkpoint_score"  # finite copy of the monitored metric that Ray ranks checkpoints by


# ---------------------------------------------------------------------------------------------- batches
def _stack(value: Any) -> np.ndarray:
    """A numeric array from a shard cell: a tensor cell, or nested lists/object arrays of slices."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    return np.stack([_stack(v) for v in value])


def clinical_matrix(columns: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
    """Raw clinical variables as float64 (n, len(names)): sex F=1/M=0, booleans 0/1, missing NaN."""
    cols = []
    for name in names:
        v = pd.Series(np.asarray(columns[name], dtype=object))
        if name == "sex":
            num = v.map(lambda s: {"F": 1.0, "M": 0.0}.get(str(s).strip().upper()[:1], np.nan) if s is not None else np.nan)
        else:
            num = pd.to_numeric(v.map(lambda s: float(s) if isinstance(s, (bool, np.bool_)) else s), errors="coerce")
        cols.append(num.to_numpy(dtype=np.float64))
    return np.stack(cols, axis=1) if cols else np.zeros((len(next(iter(columns.values()), [])), 0))


def clinical_standardisation(frame: pd.DataFrame, names: Sequence[str]) -> dict[str, list[float]]:
    """Means and SDs of the clinical variables on the training rows (missing values ignored)."""
    x = clinical_matrix({n: frame[n].to_numpy() for n in names}, names)
    mean = np.nanmean(x, axis=0) if len(x) else np.zeros(len(names))
    sd = np.nanstd(x, axis=0) if len(x) else np.ones(len(names))
    mean = np.where(np.isfinite(mean), mean, 0.0)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    return {"columns": list(names), "mean": mean.tolist(), "sd": sd.tolist()}


class SliceBatch:
    """collate_fn for `iter_torch_batches`: shard rows -> x (B, n, 1, H, W) float32, clinical, targets."""

    def __init__(self, image: str, n_slices: int, train: bool, seed: int, epoch: int,
                 clinical: Mapping[str, list[float]] | None, targets: Sequence[str]) -> None:
        self.image, self.n_slices, self.train, self.seed, self.epoch = image, n_slices, train, seed, epoch
        self.clinical = clinical
        self.targets = tuple(targets)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Sample and stack one batch (slice indices from `raypipe.preprocess.ct.sample_slices`)."""
        from raypipe.data.sampling import study_rng
        from raypipe.preprocess.ct import sample_slices

        images = []
        for i, cell in enumerate(batch[self.image]):
            vol = _stack(cell)
            rng = study_rng(self.seed, self.epoch, batch["study_id"][i]) if self.train else None
            images.append(vol[sample_slices(vol.shape[0], self.n_slices, rng)].astype(np.float32))
        out = {"x": torch.from_numpy(np.stack(images)[:, :, None])}
        if self.clinical and self.clinical["columns"]:
            raw = clinical_matrix(batch, self.clinical["columns"])
            z = (raw - np.asarray(self.clinical["mean"])) / np.asarray(self.clinical["sd"])
            out["clinical"] = torch.from_numpy(np.nan_to_num(z, nan=0.0).astype(np.float32))
        for name in self.targets:
            col = batch.get(name)
            vals = np.full(len(images), np.nan) if col is None else pd.to_numeric(
                pd.Series(np.asarray(col, dtype=object)), errors="coerce").to_numpy(dtype=np.float64)
            out[name] = torch.from_numpy(vals.astype(np.float32))
        return out


def horizon_labels(time: torch.Tensor, event: torch.Tensor, horizons_days: Sequence[float]) -> torch.Tensor:
    """(B, H) labels: 1 event by h, 0 followed past h, NaN when censored before h (unknown)."""
    t, e = time[:, None], event[:, None]
    h = torch.as_tensor(list(horizons_days), dtype=time.dtype, device=time.device)[None]
    y = torch.full(t.shape[:1] + h.shape[1:], float("nan"), dtype=time.dtype, device=time.device)
    y = torch.where((e > 0.5) & (t <= h), torch.ones_like(y), y)
    return torch.where(t > h, torch.zeros_like(y), y)


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over known targets; zero (with a graph, so DDP sees every parameter) when none."""
    known = torch.isfinite(target)
    per = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(target, nan=0.0), reduction="none")
    return (per * known).sum() / known.sum().clamp(min=1)


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC over the rows with a known label; NaN when one class is missing."""
    from raypipe.metrics.binary import auroc

    keep = np.isfinite(y) & np.isfinite(score)
    if keep.sum() < 2 or len(np.unique(y[keep])) < 2:
        return float("nan")
    return auroc(y[keep].astype(int), score[keep])


def _harrell(time: np.ndarray, event: np.ndarray, score: np.ndarray) -> float:
    """Harrell's C (NaN without events)."""
    from raypipe.metrics.survival import c_index

    keep = np.isfinite(time) & np.isfinite(event) & (time > 0)
    if keep.sum() < 2 or event[keep].sum() == 0:
        return float("nan")
    return c_index(time[keep], event[keep].astype(bool), score[keep]).value


# ---------------------------------------------------------------------------------------------- model
def model_kwargs(cfg: CTTrainConfig, n_clinical: int) -> dict[str, Any]:
    """Registry kwargs for this run: the config's model_kwargs plus what the data decides."""
    kw: dict[str, Any] = {"in_chans": 1, **cfg.model_kwargs, "n_clinical": n_clinical}
    if cfg.pretrained_path:
        kw["pretrained_path"] = cfg.pretrained_path
    if isinstance(cfg, MultitaskConfig):
        kw["horizons_years"] = list(cfg.horizons_years)
    return kw


def build(cfg: CTTrainConfig, n_clinical: int) -> nn.Module:
    """The registered model for this config (`raypipe.models.registry.build_model`)."""
    from raypipe.models.registry import build_model

    return build_model(cfg.model, **model_kwargs(cfg, n_clinical))


def _forward(model: nn.Module, batch: Mapping[str, torch.Tensor], setup: DeviceSetup) -> Any:
    """Model outputs for a collated batch, under autocast on CUDA."""
    x = batch["x"].to(setup.device, non_blocking=True)
    clinical = batch.get("clinical")
    with autocast(setup):
        return model(x, clinical.to(setup.device) if clinical is not None else None)


def _loss(cfg: CTTrainConfig, out: Any, batch: Mapping[str, torch.Tensor], device: torch.device,
          distributed: bool = True) -> torch.Tensor:
    """Training loss: BCE for the CNN-RNN; weighted BCE + Cox + horizon BCE for the multitask model.

    `distributed` gathers the Cox risk sets over all workers (every rank must call it); validation on
    rank 0 alone passes False.
    """
    if not isinstance(cfg, MultitaskConfig):
        return masked_bce(out, batch[cfg.label].to(device))
    from raypipe.losses import cox_ph_loss, cox_ph_loss_distributed

    cox = cox_ph_loss_distributed if distributed else cox_ph_loss
    time, event = batch["time_days"].to(device), batch["event"].to(device)
    loss = cfg.prevalent_weight * masked_bce(out["prevalent_logit"], batch[cfg.prevalent_label].to(device))
    loss = loss + cfg.cox_weight * cox(out["log_risk"].float(), time, event, ties=cfg.cox_ties)
    horizons = [h * DAYS_PER_YEAR for h in cfg.horizons_years]
    return loss + cfg.horizon_weight * masked_bce(out["risk_logits"], horizon_labels(time, event, horizons))


def _targets(cfg: CTTrainConfig) -> list[str]:
    """Columns the loss and validation need."""
    if isinstance(cfg, MultitaskConfig):
        return [cfg.label, cfg.prevalent_label, "time_days", "event"]
    return [cfg.label]


# ---------------------------------------------------------------------------------------------- worker loop
def _config_from(loop_config: Mapping[str, Any]) -> CTTrainConfig:
    """The typed config shipped to the workers as JSON."""
    cls = MultitaskConfig if loop_config.get("multitask") else CTTrainConfig
    return cls.model_validate(loop_config["config"])


def train_loop_cnn_rnn(loop_config: dict) -> None:
    """Ray Train worker loop of the single-task CNN-RNN (BCE on `label`)."""
    _train_loop({**loop_config, "multitask": False})


def train_loop_multitask(loop_config: dict) -> None:
    """Ray Train worker loop of the multitask model (prevalent BCE + Cox + horizon BCE)."""
    _train_loop({**loop_config, "multitask": True})


def _train_loop(loop_config: dict) -> None:
    """Shared epoch loop: stream, step, validate on rank 0, checkpoint, early stop."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = _config_from(loop_config)
    clinical = loop_config.get("clinical")
    n_clinical = len(clinical["columns"]) if clinical else 0
    rank, n_workers = world_rank(), world_size()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    setup = select_device(cfg.amp)

    model = build(cfg, n_clinical)
    if cfg.sync_batchnorm and setup.device.type == "cuda" and n_workers > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device_model(model, setup)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = resume(model, optimizer)
    state.extra = {"clinical": clinical or {}}
    model = ray.train.torch.prepare_model(model, move_to_device=False)

    batch = per_worker_batch(cfg.batch_size, n_workers)
    targets = _targets(cfg)
    if state.should_stop(cfg.patience):
        log.info("early stopping had already ended this run at epoch %d", state.epoch)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.should_stop(cfg.patience):
            break
        seed_everything(cfg.seed * 100_003 + epoch * 1_009 + rank)
        model.train()
        if cfg.freeze_batchnorm:
            freeze_batchnorm(model)
        collate = SliceBatch(cfg.input, cfg.n_slices, True, cfg.seed, epoch, clinical, targets)
        shard = ray.train.get_dataset_shard("train")
        total, count, steps = 0.0, 0, 0
        for b in shard.iter_torch_batches(
            batch_size=batch, collate_fn=collate, device="cpu",
            local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=cfg.seed + epoch,
        ):
            out = _forward(model, b, setup)
            loss = _loss(cfg, out, b, setup.device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            n = int(b["x"].shape[0])
            total, count, steps = total + float(loss.detach()) * n, count + n, steps + 1
        train_loss = all_reduce_mean(total / max(count, 1), float(count))

        metrics = _validate(cfg, model, setup, clinical) if rank == 0 else None
        if dist.is_available() and dist.is_initialized() and n_workers > 1:
            holder = [metrics]
            dist.broadcast_object_list(holder, src=0)
            metrics = holder[0]
        state.epoch = epoch
        row = {"epoch": epoch, "train_loss": train_loss, "train_samples": all_reduce_mean(count, 1.0) * n_workers,
               "steps": steps, **metrics}
        improved = state.update(metrics.get(cfg.monitor, float("nan")), cfg.monitor_mode, cfg.min_delta)
        row.update(best_epoch=state.best_epoch, improved=int(improved))
        state.history.append(row)
        if rank == 0:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
        report = {**row, CHECKPOINT_SCORE: score_for_ranking(metrics.get(cfg.monitor), cfg.monitor_mode)}
        if cfg.monitor_mode == "min":
            report[CHECKPOINT_SCORE] = -report[CHECKPOINT_SCORE]
        report_epoch(report, model, optimizer, state, loop_config.get("metrics_csv"))
        if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch:
            log.info("stop_after_epoch %d reached: ending this run (rerun to resume)", epoch)
            break


@torch.no_grad()
def _validate(cfg: CTTrainConfig, model: nn.Module, setup: DeviceSetup,
              clinical: Mapping[str, list[float]] | None) -> dict[str, float]:
    """Loss and AUROC (plus C-index for the multitask model) over the whole validation set."""
    import ray.train

    model.eval()
    collate = SliceBatch(cfg.input, cfg.n_slices, False, cfg.seed, 0, clinical, _targets(cfg))
    outs: list[dict[str, np.ndarray]] = []
    total, count = 0.0, 0
    for b in ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=cfg.eval_batch_size, collate_fn=collate, device="cpu"
    ):
        out = _forward(unwrap(model), b, setup)
        n = int(b["x"].shape[0])
        if isinstance(cfg, MultitaskConfig):
            loss = _loss(cfg, out, b, setup.device, distributed=False)  # Cox term: per validation batch
            outs.append({k: v.float().cpu().numpy() for k, v in out.items() if k != "attention"}
                        | {k: b[k].numpy() for k in _targets(cfg)})
        else:
            loss = masked_bce(out, b[cfg.label].to(setup.device))
            outs.append({"logit": out.float().cpu().numpy(), cfg.label: b[cfg.label].numpy()})
        total, count = total + float(loss) * n, count + n
    if not outs:
        return {"val_loss": float("nan"), "val_auroc": float("nan")}
    cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    metrics = {"val_loss": total / max(count, 1)}
    if not isinstance(cfg, MultitaskConfig):
        metrics["val_auroc"] = _auroc(cat[cfg.label], cat["logit"])
        return metrics
    metrics["val_c_index"] = _harrell(cat["time_days"], cat["event"], cat["log_risk"])
    metrics["val_prevalent_auroc"] = _auroc(cat[cfg.prevalent_label], cat["prevalent_logit"])
    hy = horizon_labels(torch.from_numpy(cat["time_days"]), torch.from_numpy(cat["event"]),
                        [h * DAYS_PER_YEAR for h in cfg.horizons_years]).numpy()
    for j, h in enumerate(cfg.horizons_years):
        metrics[f"val_auroc_{h:g}y"] = _auroc(hy[:, j], cat["risk_logits"][:, j])
    label_h = _label_horizon(cfg.label)
    metrics["val_auroc"] = (metrics.get(f"val_auroc_{label_h:g}y") if label_h in cfg.horizons_years
                            else _auroc(cat[cfg.label], cat["log_risk"]))
    return metrics


def _label_horizon(label: str) -> float | None:
    """5.0 for `fracture_5y` (None for other label names)."""
    import re

    m = re.fullmatch(r"fracture_(\d+(?:\.\d+)?)y", label)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- driver
def split_by_patient(meta: pd.DataFrame, cfg: CTTrainConfig) -> pd.Series:
    """Role per study (train / val / test / any other manifest split), assigned by patient, seeded.

    A `split` column is honoured: its `train` patients are divided into train and val (unless val rows
    are given), every other split is kept as is and scored at the end. Without one, patients are drawn
    into val/test by `val_fraction`/`test_fraction`, stratified on whether a patient has a positive label.
    """
    split = meta["split"].astype("string").str.lower() if "split" in meta.columns else None
    role = pd.Series("train", index=meta.index, dtype="object")
    pool = meta.index
    if split is not None and split.notna().any():
        role[:] = split.fillna("train").replace({"valid": "val", "validation": "val", "training": "train"}).to_numpy()
        pool = meta.index[role == "train"]
        if (role == "val").any():
            return role
    sub = meta.loc[pool]
    lab = pd.to_numeric(sub.get(cfg.label, pd.Series(0, index=sub.index)), errors="coerce").fillna(0)
    by_patient = lab.groupby(sub["patient_id"].astype(str)).max().sort_index()
    rng = np.random.default_rng(cfg.seed)
    val_p: list[str] = []
    test_p: list[str] = []
    frac_val = cfg.val_fraction
    frac_test = cfg.test_fraction if split is None or not split.notna().any() else 0.0
    for _, group in by_patient.groupby(by_patient > 0):
        ids = group.index.to_numpy()
        rng.shuffle(ids)
        n_test = int(round(len(ids) * frac_test))
        n_val = max(1, int(round(len(ids) * frac_val))) if len(ids) > 1 else 0
        test_p += list(ids[:n_test])
        val_p += list(ids[n_test:n_test + n_val])
    pid = meta.loc[pool, "patient_id"].astype(str)
    role.loc[pool[pid.isin(val_p).to_numpy()]] = "val"
    role.loc[pool[pid.isin(test_p).to_numpy()]] = "test"
    return role


def roles_from_fold(meta: pd.DataFrame, fold_patients: Mapping[str, Sequence[str]]) -> pd.Series:
    """Role per study from a role -> patient ids mapping (a CV fold); "" for patients in no role."""
    seen: dict[str, str] = {}
    for name, ids in fold_patients.items():
        for pid in map(str, ids):
            if seen.setdefault(pid, name) != name:
                raise ValueError(f"patient in both {seen[pid]!r} and {name!r} roles of the fold")
    if not fold_patients.get("train") or not fold_patients.get("val"):
        raise ValueError("fold_patients needs non-empty 'train' and 'val' patient lists")
    return meta["patient_id"].astype(str).map(seen).fillna("").astype("object")


def _keep_studies(batch: Any, ids: Sequence[str]) -> Any:
    """Ray Data map_batches filter: rows whose study_id is in `ids`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = pc.cast(batch.column("study_id"), pa.string())
    return batch.filter(pc.is_in(col, value_set=pa.array(list(ids), pa.string())))


def _subset(ds: Any, ids: Sequence[str]) -> Any:
    """The rows of `ds` for the given studies (the id list travels with the task)."""
    return ds.map_batches(_keep_studies, fn_kwargs={"ids": list(ids)}, batch_format="pyarrow")


def _read_meta(ds: Any, columns: Sequence[str]) -> pd.DataFrame:
    """The small per-study columns of every shard (ids, split, labels, clinical), without the images."""
    present = [c for c in columns if c in ds.schema().names]
    return ds.select_columns(present).to_pandas()


def fit_ct(config: CTTrainConfig, data_dir: str, out_dir: str,
           fold_patients: Mapping[str, Sequence[str]] | None = None) -> Any:
    """Train a CT model on the shards in `data_dir` with Ray Train; write the run's files into `out_dir`.

    Rerunning with the same `out_dir` (and `run_name`) resumes from the latest checkpoint. Returns the
    Ray Train `Result`. `fold_patients` (cross-validation, `raypipe.tune.cv`) replaces the patient split:
    role -> patient ids, with `train` and `val` required (e.g. also `external`); studies of patients not
    listed are neither trained on nor scored.
    """
    from raypipe import storage
    from raypipe.data.ct_pipeline import load_ct_shards
    from raypipe.train.common import make_trainer

    cfg = config
    multitask = isinstance(cfg, MultitaskConfig)
    out = str(out_dir) if storage.is_uri(out_dir) else os.path.abspath(out_dir)
    storage.makedirs(out)
    storage_path = cfg.storage_path or storage.join(out, "ray_results")

    shards = load_ct_shards(data_dir, backend="ray")
    schema_names = shards.schema().names
    need = ["patient_id", "study_id", cfg.input, *_targets(cfg)]
    missing = [c for c in need if c not in schema_names and c not in (getattr(cfg, "prevalent_label", None),)]
    if missing:
        raise ValueError(f"CT shards in {data_dir} lack column(s) {missing} (have: {schema_names})")
    clinical_cols = list(cfg.clinical_columns) if cfg.use_clinical else []
    absent = [c for c in clinical_cols if c not in schema_names]
    if absent:
        raise ValueError(f"clinical column(s) {absent} are not in the shards")
    extra = [c for c in schema_names if c not in (cfg.input, "bone", "bone_muscle", "slice_level", "slice_z_mm")]
    meta = _read_meta(shards, extra)
    meta["study_id"] = meta["study_id"].astype(str)
    role = split_by_patient(meta, cfg) if fold_patients is None else roles_from_fold(meta, fold_patients)
    if fold_patients is not None:
        keep = (role != "").to_numpy()
        meta, role = meta[keep].reset_index(drop=True), role[keep].reset_index(drop=True)
    train_mask = (role == "train").to_numpy()
    if not multitask:
        train_mask &= pd.to_numeric(meta[cfg.label], errors="coerce").notna().to_numpy()
    train_ids = meta.loc[train_mask, "study_id"].tolist()
    val_ids = meta.loc[(role == "val").to_numpy(), "study_id"].tolist()
    if not train_ids or not val_ids:
        raise ValueError(f"need training and validation studies, got {len(train_ids)} and {len(val_ids)}")
    log.info("studies: %d train, %d val, %s other", len(train_ids), len(val_ids),
             dict(role[~role.isin(["train", "val"])].value_counts()))
    clinical = clinical_standardisation(meta.loc[train_mask], clinical_cols) if clinical_cols else None

    columns = list(dict.fromkeys(["patient_id", "study_id", cfg.input, *[c for c in _targets(cfg) if c in schema_names],
                                  *clinical_cols]))
    ds = shards.select_columns(columns)
    run_dir = storage.join(storage_path, cfg.run_name)
    loop_config = {"config": cfg.model_dump(mode="json"), "multitask": multitask, "clinical": clinical,
                   "metrics_csv": storage.join(run_dir, "metrics.csv")}
    trainer = make_trainer(
        train_loop_multitask if multitask else train_loop_cnn_rnn, loop_config,
        {"train": _subset(ds, train_ids), "val": _subset(ds, val_ids)},
        num_workers=cfg.num_workers, storage_path=storage_path, name=cfg.run_name,
        max_failures=cfg.max_failures, num_to_keep=cfg.num_to_keep, score_attribute=CHECKPOINT_SCORE,
        score_order="max", use_gpu=cfg.use_gpu,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    _write_outputs(cfg, result, ds, meta, role, clinical, out)
    return result


def _write_outputs(cfg: CTTrainConfig, result: Any, ds: Any, meta: pd.DataFrame, role: pd.Series,
                   clinical: Mapping[str, Any] | None, out: str) -> None:
    """Best checkpoint -> model.pt, model_meta.json, predictions.parquet, metrics.json, metrics.csv, config.yaml."""
    import io

    from raypipe import storage
    from raypipe.config import config_hash, dump_config
    from raypipe.evaluate import evaluate_frame
    from raypipe.predictions import validate_predictions, write_predictions
    from raypipe.train.common import metrics_csv_text

    best = best_checkpoint(result, CHECKPOINT_SCORE, "max")
    if best is None:
        raise RuntimeError("training reported no checkpoint")
    payload = read_checkpoint(best)
    latest = read_checkpoint(result.checkpoint) if result.checkpoint is not None else payload
    history = latest["state"]["history"]
    n_clinical = len(clinical["columns"]) if clinical else 0
    model = build(cfg, n_clinical)
    model.load_state_dict(payload["model"])
    model.eval()

    dump_config(cfg, storage.join(out, "config.yaml"))
    storage.atomic_write_text(storage.join(out, "metrics.csv"), metrics_csv_text(history))
    buf = io.BytesIO()
    torch.save(payload["model"], buf)
    storage.atomic_write_bytes(storage.join(out, "model.pt"), buf.getvalue())
    state = payload["state"]
    model_meta = {
        "builder": cfg.model, "kwargs": model_kwargs(cfg, n_clinical), "display_name": cfg.name,
        "task": "ct_multitask" if isinstance(cfg, MultitaskConfig) else "ct_fracture",
        "input": cfg.input, "n_slices": cfg.n_slices, "label": cfg.label,
        "clinical": clinical or {"columns": [], "mean": [], "sd": []},
        "score_kind": "log_risk" if isinstance(cfg, MultitaskConfig) else "probability",
        "horizons_years": list(getattr(cfg, "horizons_years", [])),
        "best_epoch": state["best_epoch"], "monitor": cfg.monitor, "best_value": state["best_value"],
        "epochs_run": latest["state"]["epoch"], "config_hash": config_hash(cfg),
    }
    storage.atomic_write_json(storage.join(out, "model_meta.json"), model_meta)

    scored = meta[(role != "train").to_numpy()].copy()
    scored["split"] = role[(role != "train").to_numpy()].to_numpy()
    preds = _predict(cfg, model, _subset(ds, scored["study_id"].tolist()), clinical)
    frame = _prediction_frame(cfg, scored, preds)
    valid = validate_predictions(frame)
    metrics = evaluate_frame(valid, reference_model=cfg.name, n_boot=cfg.n_boot, seed=cfg.seed).metrics
    write_predictions(frame, storage.join(out, "predictions.parquet"),
                      {"model": cfg.name, "config_hash": config_hash(cfg), "best_epoch": state["best_epoch"]})
    storage.atomic_write_json(storage.join(out, "metrics.json"), metrics)
    log.info("wrote %s (best epoch %d, %s %.4f)", out, state["best_epoch"], cfg.monitor,
             state["best_value"] if state["best_value"] is not None else float("nan"))


@torch.no_grad()
def _predict(cfg: CTTrainConfig, model: nn.Module, ds: Any, clinical: Mapping[str, Any] | None) -> pd.DataFrame:
    """Scores for every row of `ds` on the driver (deterministic centred slices), keyed by study_id."""
    collate = SliceBatch(cfg.input, cfg.n_slices, False, cfg.seed, 0, clinical, [])
    rows: list[pd.DataFrame] = []
    for batch in ds.iter_batches(batch_size=cfg.eval_batch_size, batch_format="numpy"):
        b = collate(batch)
        out = model(b["x"], b.get("clinical"))
        part = {"study_id": np.asarray(batch["study_id"]).astype(str)}
        if isinstance(cfg, MultitaskConfig):
            part["log_risk"] = out["log_risk"].float().numpy()
            part["prevalent"] = torch.sigmoid(out["prevalent_logit"].float()).numpy()
            for j, h in enumerate(cfg.horizons_years):
                part[f"h{j}"] = torch.sigmoid(out["risk_logits"][:, j].float()).numpy()
        else:
            part["probability"] = torch.sigmoid(out.float()).numpy()
        rows.append(pd.DataFrame(part))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame({"study_id": []})


def _prediction_frame(cfg: CTTrainConfig, scored: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """Rows in the prediction schema: one model for the CNN-RNN; Cox, prevalent and horizon heads for multitask."""
    from raypipe.predictions import CLINICAL_COLUMNS, label_columns

    base = scored.merge(preds, on="study_id", how="inner", validate="one_to_one")
    keep = ["patient_id", "study_id", "split", *[c for c in ("time_days", "event") if c in base.columns],
            *label_columns(list(base.columns)), *[c for c in CLINICAL_COLUMNS if c in base.columns]]
    common = base[list(dict.fromkeys(keep))].copy()
    common["fold"] = -1
    if not isinstance(cfg, MultitaskConfig):
        return common.assign(model=cfg.name, score=base["probability"].to_numpy(), score_kind="probability")
    parts = [common.assign(model=cfg.name, score=base["log_risk"].to_numpy(), score_kind="log_risk")]
    if cfg.prevalent_label in base.columns:
        prev = common.assign(model=f"{cfg.name}-prevalent", score=base["prevalent"].to_numpy(), score_kind="probability")
        prev["label"] = pd.to_numeric(base[cfg.prevalent_label], errors="coerce").to_numpy()
        parts.append(prev)
    if {"time_days", "event"} <= set(base.columns):
        hy = horizon_labels(torch.tensor(base["time_days"].to_numpy(dtype=np.float64)),
                            torch.tensor(base["event"].to_numpy(dtype=np.float64)),
                            [h * DAYS_PER_YEAR for h in cfg.horizons_years]).numpy()
    for j, h in enumerate(cfg.horizons_years):
        part = common.assign(model=f"{cfg.name}-{h:g}y", score=base[f"h{j}"].to_numpy(), score_kind="probability")
        if {"time_days", "event"} <= set(base.columns):
            part["label"] = hy[:, j]  # the horizon's own label: event by h, followed past h, else missing
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------------------- entry points
CONFIG_CLASSES: dict[str, type[CTTrainConfig]] = {"cnn-rnn": CTTrainConfig, "cnn_rnn": CTTrainConfig,
                                                  "multitask": MultitaskConfig}


def config_class_for(model: str) -> type[CTTrainConfig]:
    """Config class of a `raypipe train MODEL` name (or a registry model name such as multitask_tiny)."""
    if model in CONFIG_CLASSES:
        return CONFIG_CLASSES[model]
    return MultitaskConfig if model.startswith("multitask") else CTTrainConfig


def train_cli(model: str, config_path: str | None, data: str | None, out: str | None) -> int:
    """`raypipe train cnn-rnn|multitask --config C --data DIR --out DIR`: load, train, write; exit code."""
    from raypipe.config import load_config
    from raypipe.ray_utils import init_ray

    if not data:
        raise SystemExit(f"raypipe train {model}: --data (a folder of CT shards) is required")
    cfg = load_config(config_class_for(model), config_path)
    out = out or os.path.join("runs", cfg.name)
    init_ray()
    fit_ct(cfg, data, out)
    try:  # Grad-CAM grids for the report's gallery (OUT/gradcam); a figure must not fail a finished run
        from raypipe.explain.ct_gallery import write_train_gallery

        write_train_gallery(out, data)
    except Exception as exc:
        log.warning("Grad-CAM gallery skipped: %s", exc)
    log.info("run written to %s", out)
    return 0
