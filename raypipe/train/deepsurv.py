"""Ray Train loop of DeepSurv on X-ray shards (papers/001), with pycox heads on the same encoder for comparison.

Reads top to bottom like a training script:

1. `XrayBatch` turns shard rows into model inputs: the preprocessed image (C x 384 x 384 float16, resized on
   the fly when `image_size` is set), clinical variables standardised with the training rows' means and
   SDs, time and event (and the interval index for the discrete-time heads).
2. `train_loop_deepsurv` runs in every Ray Train worker: stream the "train" shard, the head's loss (Cox:
   `cox_ph_loss_distributed`, so the risk sets span the global batch across workers), validation C-index
   on rank 0 broadcast to every rank, one checkpoint per epoch through `raypipe.train.common`.
3. `fit_deepsurv` on the driver: split by patient (the paper's 5:1 train/validation split of the training
   set), train, score with the best checkpoint, fit the Breslow baseline on the training rows, and write
   model.pt, model_meta.json, baseline_hazard.json, config.yaml, metrics.csv, predictions.parquet,
   metrics.json. The predictions carry S(t) for t = 1..10 years (`surv_{t}y`) and the 5-year risk.

Heads: `cox` (DeepSurv, the paper), `logistic_hazard` and `deephit` (pycox's discrete-time losses on a grid
fitted by `LabTransDiscreteTime`), `coxtime` (pycox's case-control loss; controls drawn from the risk set
within each worker's batch).
"""
from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from raypipe.train.common import (
    DeviceSetup,
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
from raypipe.train.xray_config import DeepSurvConfig

log = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25
CHECKPOINT_SCORE = "checkpoint_score"
BASELINE_FILE = "baseline_hazard.json"
_IMAGE_COLUMNS = ("image", "keypoints")


# ---------------------------------------------------------------------------------------------- batches
class XrayBatch:
    """collate_fn for `iter_torch_batches`: shard rows -> x (B, C, H, W), clinical, time_days, event, idx."""

    def __init__(self, image_size: int | None, uses_image: bool, clinical: Mapping[str, list[float]] | None,
                 cuts: Sequence[float] | None = None) -> None:
        self.image_size, self.uses_image, self.clinical = image_size, uses_image, clinical
        self.cuts = None if cuts is None else np.asarray(cuts, dtype=np.float64)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Stack one batch; missing time/event become NaN (scoring rows need none)."""
        from raypipe.train.ct import _stack, clinical_matrix

        n = len(batch["study_id"])
        out: dict[str, torch.Tensor] = {}
        if self.uses_image:
            x = torch.from_numpy(np.ascontiguousarray(_stack(batch["image"]), dtype=np.float32))
            if self.image_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            out["x"] = x
        if self.clinical and self.clinical["columns"]:
            raw = clinical_matrix(batch, self.clinical["columns"])
            z = (raw - np.asarray(self.clinical["mean"])) / np.asarray(self.clinical["sd"])
            out["clinical"] = torch.from_numpy(np.nan_to_num(z, nan=0.0).astype(np.float32))
        for name in ("time_days", "event"):
            col = batch.get(name)
            vals = np.full(n, np.nan) if col is None else pd.to_numeric(
                pd.Series(np.asarray(col, dtype=object)), errors="coerce").to_numpy(dtype=np.float64)
            out[name] = torch.from_numpy(vals.astype(np.float32))
        if self.cuts is not None and batch.get("time_days") is not None:
            out["idx"] = torch.from_numpy(duration_index(self.cuts, out["time_days"].numpy(), out["event"].numpy()))
        return out


def duration_index(cuts: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Interval index of each time on a pycox grid (`LabTransDiscreteTime` with predefined cuts)."""
    from pycox.preprocessing.label_transforms import LabTransDiscreteTime

    if np.asarray(time).size == 0:  # an empty batch (Ray Data can hand one over at the end of a shard)
        return np.zeros(0, dtype=np.int64)
    t = np.nan_to_num(np.asarray(time, dtype=np.float64), nan=float(cuts[0]))
    e = np.nan_to_num(np.asarray(event, dtype=np.float64), nan=0.0)
    lab = LabTransDiscreteTime(np.asarray(cuts, dtype=np.float64))
    # pycox's binning fails on a batch without events; each row's index depends only on its own (t, e) and
    # the cuts, so one appended event row (dropped again) keeps all-censored batches working
    t, e = np.append(t, float(cuts[-1])), np.append(e, 1.0)
    with warnings.catch_warnings():  # "cuts already defined": intended, the grid comes from the training rows
        warnings.simplefilter("ignore", UserWarning)
        lab.fit(t, e)
    idx, _ = lab.transform(t, e)
    return np.asarray(idx, dtype=np.int64)[:-1]


# ---------------------------------------------------------------------------------------------- model
def model_kwargs(cfg: DeepSurvConfig, n_clinical: int, in_chans: int) -> dict[str, Any]:
    """Builder kwargs: the config's model_kwargs plus what the data decides (channels, clinical inputs)."""
    kw: dict[str, Any] = {**cfg.model_kwargs, "n_clinical": n_clinical}
    if cfg.uses_image:
        kw.setdefault("in_chans", in_chans)
        if cfg.pretrained_path:
            kw["pretrained_path"] = cfg.pretrained_path
    else:
        kw["backbone"] = None
        for key in ("in_chans", "width", "pretrained_path"):
            kw.pop(key, None)
    return kw


def builder_name(cfg: DeepSurvConfig) -> str:
    """Registry builder of the network (`deepsurv`/`deepsurv_tiny` for the Cox head)."""
    if cfg.head == "cox":
        return cfg.model
    return "deepsurv_coxtime" if cfg.head == "coxtime" else "deepsurv_discrete"


def build(cfg: DeepSurvConfig, n_clinical: int, in_chans: int) -> nn.Module:
    """The network of this config's head over the registry DeepSurv preset."""
    from raypipe.models.survival_heads import build_head_model

    return build_head_model(cfg.head, cfg.model, model_kwargs(cfg, n_clinical, in_chans), cfg.num_durations)


def _inputs(batch: Mapping[str, torch.Tensor], setup: DeviceSetup) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Image and clinical tensors on the worker's device (None when the variant has none)."""
    x = batch.get("x")
    c = batch.get("clinical")
    return (x.to(setup.device, non_blocking=True) if x is not None else None,
            c.to(setup.device) if c is not None else None)


def _std_log_time(t: torch.Tensor, labels: Mapping[str, Any]) -> torch.Tensor:
    """Cox-Time's time input: standardised log-days (pycox's `LabTransCoxTime` with log_duration)."""
    return (torch.log(t.clamp_min(1.0)) - labels["logt_mean"]) / labels["logt_sd"]


def head_loss(cfg: DeepSurvConfig, model: nn.Module, batch: Mapping[str, torch.Tensor], setup: DeviceSetup,
              labels: Mapping[str, Any], distributed: bool = True, rng: np.random.Generator | None = None
              ) -> torch.Tensor:
    """The head's training loss on one batch (Cox: over the global batch when `distributed`)."""
    from pycox.models import loss as pl

    from raypipe.losses import cox_ph_loss, cox_ph_loss_distributed

    x, c = _inputs(batch, setup)
    time, event = batch["time_days"].to(setup.device), batch["event"].to(setup.device)
    if cfg.head == "coxtime":
        return _coxtime_loss(cfg, model, x, c, time, event, labels, rng or np.random.default_rng(0))
    with autocast(setup):
        out = model(x, c)
    out = out.float()
    if cfg.head == "cox":
        cox = cox_ph_loss_distributed if distributed else cox_ph_loss
        return cox(out, time, event, ties=cfg.ties)
    idx = batch["idx"].to(setup.device)
    if cfg.head == "logistic_hazard":
        return pl.nll_logistic_hazard(out, idx, event)
    from pycox.models.data import pair_rank_mat

    rank = torch.from_numpy(pair_rank_mat(idx.cpu().numpy(), event.cpu().numpy())).to(setup.device)
    nll = pl.nll_pmf(out, idx, event)
    ranking = pl.rank_loss_deephit_single(out, idx, event, rank, torch.tensor(cfg.deephit_sigma))
    return cfg.deephit_alpha * nll + (1 - cfg.deephit_alpha) * ranking


def _coxtime_loss(cfg: DeepSurvConfig, model: nn.Module, x: torch.Tensor | None, c: torch.Tensor | None,
                  time: torch.Tensor, event: torch.Tensor, labels: Mapping[str, Any],
                  rng: np.random.Generator) -> torch.Tensor:
    """pycox's case-control loss: each event vs one control drawn from its risk set in this batch."""
    from pycox.models.loss import cox_cc_loss

    t = time.cpu().numpy()
    cases, controls = [], []
    for i in np.flatnonzero(event.cpu().numpy() > 0):
        pool = np.flatnonzero((t >= t[i]) & (np.arange(len(t)) != i))
        if len(pool):
            cases.append(i)
            controls.append(int(rng.choice(pool)))
    if not cases:  # still run the network so DDP sees every parameter
        x0 = None if x is None else x[:1]
        c0 = None if c is None else c[:1]
        return model(x0, c0, torch.zeros(1, device=time.device)).sum() * 0.0
    ci, ki = torch.as_tensor(cases), torch.as_tensor(controls)
    both = torch.cat([ci, ki])
    tt = _std_log_time(time[ci], labels)
    g = model(None if x is None else x[both], None if c is None else c[both], torch.cat([tt, tt])).float()
    return cox_cc_loss(g[: len(cases)], (g[len(cases):],), cfg.coxtime_shrink)


# ---------------------------------------------------------------------------------------------- scores
@torch.no_grad()
def raw_outputs(cfg: DeepSurvConfig, model: nn.Module, batch: Mapping[str, torch.Tensor], setup: DeviceSetup,
                labels: Mapping[str, Any]) -> np.ndarray:
    """Network output per row: log-risk (Cox), logits (discrete heads) or g at the horizon (Cox-Time)."""
    net = unwrap(model)
    x, c = _inputs(batch, setup)
    with autocast(setup):
        if cfg.head == "coxtime":
            n = (x if x is not None else c).shape[0]
            horizon = torch.full((n,), cfg.horizon_years * DAYS_PER_YEAR, device=setup.device)
            out = net(x, c, _std_log_time(horizon, labels))
        else:
            out = net(x, c)
    return out.float().cpu().numpy()


def risk_score(cfg: DeepSurvConfig, outputs: np.ndarray, labels: Mapping[str, Any]) -> np.ndarray:
    """A score that grows with risk, for the validation C-index: log-risk, or risk at the horizon."""
    if cfg.head in ("cox", "coxtime"):
        return np.asarray(outputs, dtype=np.float64)
    from raypipe.models.survival_heads import discrete_survival, step_at

    surv = discrete_survival(cfg.head, outputs)
    return 1.0 - step_at(labels["cuts"], surv, [cfg.horizon_years * DAYS_PER_YEAR])[:, 0]


# ---------------------------------------------------------------------------------------------- worker loop
def train_loop_deepsurv(loop_config: dict) -> None:
    """Ray Train worker loop: stream, step, validate on rank 0, checkpoint, early stop."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = DeepSurvConfig.model_validate(loop_config["config"])
    clinical = loop_config.get("clinical")
    labels = loop_config["labels"]
    n_clinical = len(clinical["columns"]) if clinical else 0
    rank, n_workers = world_rank(), world_size()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    setup = select_device(cfg.amp)
    model = to_device_model(build(cfg, n_clinical, loop_config["in_chans"]), setup)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if labels.get("init_bias") is not None:  # start at the training rows' marginal curve (replaced on resume)
        with torch.no_grad():
            unwrap(model).net.out.bias.copy_(torch.as_tensor(labels["init_bias"], dtype=torch.float32))
    state = resume(model, optimizer)
    state.extra = {"clinical": clinical or {}}
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    batch = per_worker_batch(cfg.batch_size, n_workers)
    cuts = labels.get("cuts")
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.should_stop(cfg.patience):
            break
        seed_everything(cfg.seed * 100_003 + epoch * 1_009 + rank)
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        model.train()
        if cfg.freeze_batchnorm:
            freeze_batchnorm(model)
        collate = XrayBatch(cfg.image_size, cfg.uses_image, clinical, cuts)
        total, count, steps = 0.0, 0, 0
        for b in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=batch, collate_fn=collate, device="cpu",
            local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=cfg.seed + epoch,
        ):
            if n_workers == 1 and int(b["time_days"].shape[0]) <= 1:
                continue  # a 0/1-row tail: no risk set, and BatchNorm cannot train on it (DDP ranks must all step)
            loss = head_loss(cfg, model, b, setup, labels, distributed=True, rng=rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            n = int(b["time_days"].shape[0])
            total, count, steps = total + float(loss.detach()) * n, count + n, steps + 1
        train_loss = all_reduce_mean(total / max(count, 1), float(count))

        metrics = _validate(cfg, model, setup, clinical, labels) if rank == 0 else None
        if dist.is_available() and dist.is_initialized() and n_workers > 1:
            holder = [metrics]
            dist.broadcast_object_list(holder, src=0)
            metrics = holder[0]
        state.epoch = epoch
        row = {"epoch": epoch, "train_loss": train_loss, "steps": steps, **metrics}
        improved = state.update(metrics.get(cfg.monitor, float("nan")), cfg.monitor_mode, cfg.min_delta)
        row.update(best_epoch=state.best_epoch, improved=int(improved))
        state.history.append(row)
        if rank == 0:
            log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
        score = score_for_ranking(metrics.get(cfg.monitor), cfg.monitor_mode)
        report_epoch({**row, CHECKPOINT_SCORE: score if cfg.monitor_mode == "max" else -score},
                     model, optimizer, state, loop_config.get("metrics_csv"))
        if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch:
            break


@torch.no_grad()
def _validate(cfg: DeepSurvConfig, model: nn.Module, setup: DeviceSetup, clinical: Mapping[str, Any] | None,
              labels: Mapping[str, Any]) -> dict[str, float]:
    """Loss (per batch) and Harrell's C over the whole validation set, on rank 0."""
    import ray.train

    from raypipe.train.ct import _harrell

    model.eval()
    collate = XrayBatch(cfg.image_size, cfg.uses_image, clinical, labels.get("cuts"))
    outs, times, events = [], [], []
    total, count = 0.0, 0
    for b in ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=cfg.eval_batch_size, collate_fn=collate, device="cpu"
    ):
        out = raw_outputs(cfg, model, b, setup, labels)
        if cfg.head != "coxtime":
            loss = head_loss(cfg, unwrap(model), b, setup, labels, distributed=False)
            n = int(b["time_days"].shape[0])
            total, count = total + float(loss) * n, count + n
        outs.append(out)
        times.append(b["time_days"].numpy())
        events.append(b["event"].numpy())
    if not outs:
        return {"val_loss": float("nan"), "val_c_index": float("nan")}
    score = risk_score(cfg, np.concatenate(outs), labels)
    c = _harrell(np.concatenate(times).astype(float), np.concatenate(events).astype(float), score)
    return {"val_loss": total / count if count else float("nan"), "val_c_index": c}


# ---------------------------------------------------------------------------------------------- driver
def split_roles(meta: pd.DataFrame, cfg: DeepSurvConfig) -> pd.Series:
    """Train/val(/test) role per study by patient: the paper's 5:1 split, stratified on the event."""
    from raypipe.train.ct import split_by_patient

    spec = SimpleNamespace(label="event", seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    return split_by_patient(meta, spec)


def label_transform(cfg: DeepSurvConfig, time: np.ndarray, event: np.ndarray) -> dict[str, Any]:
    """What the head needs from the training labels: pycox's grid (discrete) or log-time scaling (Cox-Time)."""
    if cfg.head in ("logistic_hazard", "deephit"):
        from pycox.preprocessing.label_transforms import LabTransDiscreteTime

        from raypipe.models.survival_heads import marginal_logits

        lab = LabTransDiscreteTime(cfg.num_durations)
        lab.fit(np.asarray(time, dtype=np.float64), np.asarray(event, dtype=np.float64))
        cuts = np.asarray(lab.cuts, dtype=np.float64)
        idx = duration_index(cuts, np.asarray(time, dtype=np.float64), np.asarray(event, dtype=np.float64))
        bias = marginal_logits(cfg.head, idx, np.asarray(event, dtype=np.float64), len(cuts))
        return {"cuts": [float(c) for c in cuts], "init_bias": [float(b) for b in bias]}
    if cfg.head == "coxtime":
        lt = np.log(np.clip(np.asarray(time, dtype=np.float64), 1.0, None))
        return {"logt_mean": float(lt.mean()), "logt_sd": float(lt.std() or 1.0)}
    return {}


def _image_channels(ds: Any) -> int:
    """Channels of the shards' images (patches: 5; full images: 1)."""
    row = ds.select_columns(["image"]).take(1)
    if not row:
        raise ValueError("X-ray shards are empty")
    return int(np.asarray(row[0]["image"]).shape[0])


def fit_deepsurv(config: DeepSurvConfig, data_dir: str, out_dir: str, roles: pd.Series | None = None,
                 fold: int = -1, callbacks: Sequence[Any] = (), monitor_split: str = "val") -> Any:
    """Train DeepSurv (or a pycox head) on the X-ray shards in `data_dir`; write the run files into `out_dir`.

    `roles` (indexed by study_id: train / val / test / ...) replaces the patient split, as k-fold CV does;
    early stopping watches the `monitor_split` rows; every role but `train` (and `unused`) is scored.
    `fold` is written to the predictions; `callbacks` go to the Ray Train run (e.g. Tune's report
    callback). Rerunning with the same `out_dir` resumes. Returns the Ray Train `Result`.
    """
    from raypipe import storage
    from raypipe.data.xray_pipeline import load_xray_shards
    from raypipe.train.common import make_trainer
    from raypipe.train.ct import _read_meta, _subset, clinical_standardisation

    cfg = config
    out = str(out_dir) if storage.is_uri(out_dir) else os.path.abspath(out_dir)
    storage.makedirs(out)
    storage_path = cfg.storage_path or storage.join(out, "ray_results")
    shards = load_xray_shards(data_dir, backend="ray")
    names = shards.schema().names
    missing = [c for c in ("patient_id", "study_id", "time_days", "event", *cfg.clinical) if c not in names]
    if cfg.uses_image and "image" not in names:
        missing.append("image")
    if missing:
        raise ValueError(f"X-ray shards in {data_dir} lack column(s) {missing} (have: {names})")
    meta = _read_meta(shards, [c for c in names if c not in _IMAGE_COLUMNS])
    meta["study_id"] = meta["study_id"].astype(str)
    if roles is None:
        role = split_roles(meta, cfg)
    else:
        role = meta["study_id"].map(roles.astype(str).to_dict()).fillna("unused")
    train_mask = (role == "train").to_numpy()
    train_ids = meta.loc[train_mask, "study_id"].tolist()
    val_ids = meta.loc[(role == monitor_split).to_numpy(), "study_id"].tolist()
    if not train_ids or not val_ids:
        raise ValueError(f"need training and {monitor_split!r} studies, got {len(train_ids)} and {len(val_ids)}")
    log.info("%s: %d train, %d val, %s other studies", cfg.name, len(train_ids), len(val_ids),
             dict(role[~role.isin(["train", "val"])].value_counts()))
    clinical = clinical_standardisation(meta.loc[train_mask], cfg.clinical) if cfg.clinical else None
    tr = meta.loc[train_mask]
    labels = label_transform(cfg, tr["time_days"].to_numpy(float), tr["event"].to_numpy(float))
    in_chans = _image_channels(shards) if cfg.uses_image else 0
    columns = ["patient_id", "study_id", "time_days", "event", *cfg.clinical, *(["image"] if cfg.uses_image else [])]
    ds = shards.select_columns(list(dict.fromkeys(columns)))

    run_dir = storage.join(storage_path, cfg.run_name)
    loop_config = {"config": cfg.model_dump(mode="json"), "clinical": clinical, "labels": labels,
                   "in_chans": in_chans, "metrics_csv": storage.join(run_dir, "metrics.csv")}
    trainer = make_trainer(
        train_loop_deepsurv, loop_config, {"train": _subset(ds, train_ids), "val": _subset(ds, val_ids)},
        num_workers=cfg.num_workers, storage_path=storage_path, name=cfg.run_name, max_failures=cfg.max_failures,
        num_to_keep=cfg.num_to_keep, score_attribute=CHECKPOINT_SCORE, score_order="max", use_gpu=cfg.use_gpu,
    )
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), *callbacks]
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    write_outputs(cfg, result, ds, meta, role, clinical, labels, in_chans, out, fold, data_dir)
    return result


def write_outputs(cfg: DeepSurvConfig, result: Any, ds: Any, meta: pd.DataFrame, role: pd.Series,
                  clinical: Mapping[str, Any] | None, labels: Mapping[str, Any], in_chans: int, out: str,
                  fold: int = -1, data_dir: str | None = None) -> dict[str, Any]:
    """Best checkpoint -> model.pt, model_meta.json, baseline_hazard.json, predictions, metrics; returns metrics."""
    from raypipe import storage
    from raypipe.config import config_hash, dump_config
    from raypipe.evaluate import evaluate_frame
    from raypipe.predictions import validate_predictions, write_predictions
    from raypipe.train.common import metrics_csv_text
    from raypipe.train.ct import _subset

    best = best_checkpoint(result, CHECKPOINT_SCORE, "max")
    if best is None:
        raise RuntimeError("training reported no checkpoint")
    payload = read_checkpoint(best)
    latest = read_checkpoint(result.checkpoint) if result.checkpoint is not None else payload
    n_clinical = len(clinical["columns"]) if clinical else 0
    model = build(cfg, n_clinical, in_chans)
    model.load_state_dict(payload["model"])
    model.eval()

    scored_mask = (role != "unused").to_numpy()
    outputs = score_dataset(cfg, model, _subset(ds, meta.loc[scored_mask, "study_id"].tolist()), clinical, labels)
    rows = meta.loc[scored_mask].assign(split=role[scored_mask].to_numpy()).merge(outputs, on="study_id")
    train_rows = rows[rows["split"] == "train"]
    baseline = fit_baseline(cfg, model, train_rows, ds, clinical, labels)
    frame = prediction_frame(cfg, rows[rows["split"] != "train"], baseline, labels, fold, model)

    dump_config(cfg, storage.join(out, "config.yaml"))
    shard_config = storage.join(data_dir, "config.yaml") if data_dir else None
    if shard_config and storage.exists(shard_config):  # the radiograph preprocessing, for publish and scoring
        storage.atomic_write_bytes(storage.join(out, "preprocess.yaml"), storage.read_bytes(shard_config))
    storage.atomic_write_text(storage.join(out, "metrics.csv"), metrics_csv_text(latest["state"]["history"]))
    buf = io.BytesIO()
    torch.save(payload["model"], buf)
    storage.atomic_write_bytes(storage.join(out, "model.pt"), buf.getvalue())
    storage.atomic_write_json(storage.join(out, BASELINE_FILE), baseline)
    state = payload["state"]
    meta_json = {
        "builder": builder_name(cfg), "kwargs": head_kwargs(cfg, n_clinical, in_chans), "task": "xray_survival",
        "head": cfg.head, "display_name": cfg.name, "variant": cfg.variant, "clinical_model": cfg.clinical_model,
        "clinical": clinical or {"columns": [], "mean": [], "sd": []}, "in_chans": in_chans,
        "image_size": cfg.image_size, "labels": dict(labels), "baseline_file": BASELINE_FILE,
        "score_kind": "log_risk" if cfg.head == "cox" else "probability",
        "survival_years": list(cfg.survival_years), "horizon_years": cfg.horizon_years,
        "best_epoch": state["best_epoch"], "monitor": cfg.monitor, "best_value": state["best_value"],
        "epochs_run": latest["state"]["epoch"], "config_hash": config_hash(cfg),
    }
    if baseline["kind"] == "breslow":  # what raypipe.scoring.xray reads to give S(t) and the 5-year risk
        meta_json["baseline_hazard"] = baseline
    storage.atomic_write_json(storage.join(out, "model_meta.json"), meta_json)
    valid = validate_predictions(frame)
    metrics = evaluate_frame(valid, reference_model=cfg.name, n_boot=cfg.n_boot, seed=cfg.seed).metrics
    write_predictions(frame, storage.join(out, "predictions.parquet"),
                      {"model": cfg.name, "config_hash": config_hash(cfg), "best_epoch": state["best_epoch"]})
    storage.atomic_write_json(storage.join(out, "metrics.json"), metrics)
    log.info("wrote %s (best epoch %d, %s %s)", out, state["best_epoch"], cfg.monitor, state["best_value"])
    return metrics


def head_kwargs(cfg: DeepSurvConfig, n_clinical: int, in_chans: int) -> dict[str, Any]:
    """Kwargs of `builder_name(cfg)`: the DeepSurv kwargs, plus base/grid size for the pycox heads."""
    kw = model_kwargs(cfg, n_clinical, in_chans)
    if cfg.head in ("logistic_hazard", "deephit"):
        return {**kw, "base": cfg.model, "num_durations": cfg.num_durations}
    if cfg.head == "coxtime":
        return {**kw, "base": cfg.model}
    return kw


@torch.no_grad()
def score_dataset(cfg: DeepSurvConfig, model: nn.Module, ds: Any, clinical: Mapping[str, Any] | None,
                  labels: Mapping[str, Any]) -> pd.DataFrame:
    """Network outputs for every row of `ds` on the driver, keyed by study_id (column `out`, arrays)."""
    setup = select_device(False, torch.device("cpu"))
    collate = XrayBatch(cfg.image_size, cfg.uses_image, clinical, None)
    parts = []
    for batch in ds.iter_batches(batch_size=cfg.eval_batch_size, batch_format="numpy"):
        b = collate(batch)
        out = raw_outputs(cfg, model, b, setup, labels)
        part = pd.DataFrame({"study_id": np.asarray(batch["study_id"]).astype(str)})
        part["out"] = list(out) if out.ndim > 1 else out
        if cfg.head == "coxtime":  # keep the inputs of g: Cox-Time evaluates g(x, t) at many times
            net = unwrap(model)
            feats = net.features(b.get("x"))
            part["feat"] = list(feats.numpy()) if feats is not None else [None] * len(part)
            clin = b.get("clinical")
            part["clin"] = list(clin.numpy()) if clin is not None else [None] * len(part)
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"study_id": [], "out": []})


def fit_baseline(cfg: DeepSurvConfig, model: nn.Module, train_rows: pd.DataFrame, ds: Any,
                 clinical: Mapping[str, Any] | None, labels: Mapping[str, Any]) -> dict[str, Any]:
    """What turns outputs into S(t): Breslow H0 (Cox), the grid (discrete), baseline hazards (Cox-Time)."""
    from raypipe.metrics import breslow_baseline

    t = train_rows["time_days"].to_numpy(float)
    e = train_rows["event"].to_numpy(float)
    if cfg.head == "cox":
        b = breslow_baseline(t, e.astype(int), train_rows["out"].to_numpy(float))
        return {"kind": "breslow", "time": b.time.tolist(), "cumulative_hazard": b.cumulative_hazard.tolist(),
                "offset": b.offset}
    if cfg.head in ("logistic_hazard", "deephit"):
        return {"kind": cfg.head, "cuts": list(labels["cuts"])}
    from raypipe.models.survival_heads import coxtime_baseline

    event_times = np.unique(t[e > 0])
    g = coxtime_g(model, train_rows, event_times, labels)
    h0 = coxtime_baseline(g, t, e, event_times)
    return {"kind": "coxtime", "event_times": event_times.tolist(), "h0": h0.tolist(), **labels}


@torch.no_grad()
def coxtime_g(model: nn.Module, rows: pd.DataFrame, times: np.ndarray, labels: Mapping[str, Any]) -> np.ndarray:
    """g(x_i, t_j) (n_rows, n_times) from the rows' cached image features and clinical inputs."""
    net = unwrap(model)
    tt = _std_log_time(torch.as_tensor(times, dtype=torch.float32), labels)
    out = np.zeros((len(rows), len(times)))
    for r, (feat, clin) in enumerate(zip(rows["feat"], rows["clin"])):
        f = None if feat is None else torch.as_tensor(np.asarray(feat))[None].expand(len(times), -1)
        c = None if clin is None else torch.as_tensor(np.asarray(clin))[None].expand(len(times), -1)
        out[r] = net.g_from_features(f, c, tt).numpy()
    return out


def survival_matrix(cfg: DeepSurvConfig, rows: pd.DataFrame, baseline: Mapping[str, Any], labels: Mapping[str, Any],
                    days: Sequence[float], model: nn.Module | None = None) -> np.ndarray:
    """S(t) (n_rows, len(days)) for scored rows, from the head's outputs and baseline."""
    from raypipe.metrics.survival import BreslowBaseline
    from raypipe.models.survival_heads import coxtime_survival, discrete_survival, step_at

    if baseline["kind"] == "breslow":
        b = BreslowBaseline(np.asarray(baseline["time"]), np.asarray(baseline["cumulative_hazard"]),
                            float(baseline["offset"]))
        return b.survival(rows["out"].to_numpy(float), days)
    if baseline["kind"] in ("logistic_hazard", "deephit"):
        logits = np.stack(rows["out"].to_list())
        return step_at(baseline["cuts"], discrete_survival(baseline["kind"], logits), days)
    if model is None:
        raise ValueError("Cox-Time survival needs the model to evaluate g(x, t)")
    times = np.asarray(baseline["event_times"])
    g = coxtime_g(model, rows, times, labels)
    return coxtime_survival(g, times, np.asarray(baseline["h0"]), days)


def prediction_frame(cfg: DeepSurvConfig, rows: pd.DataFrame, baseline: Mapping[str, Any],
                     labels: Mapping[str, Any], fold: int = -1, model: nn.Module | None = None) -> pd.DataFrame:
    """Rows in the prediction schema plus `risk_5y`-style horizon risk and `surv_{t}y` columns."""
    from raypipe.predictions import CLINICAL_COLUMNS, label_columns

    years = list(cfg.survival_years)
    days = [y * DAYS_PER_YEAR for y in years]
    surv = survival_matrix(cfg, rows, baseline, labels, days + [cfg.horizon_years * DAYS_PER_YEAR], model)
    keep = ["patient_id", "study_id", "split", "time_days", "event", *label_columns(list(rows.columns)),
            *[c for c in CLINICAL_COLUMNS if c in rows.columns], *[c for c in ("true_lp",) if c in rows.columns]]
    frame = rows[list(dict.fromkeys(keep))].copy().reset_index(drop=True)
    risk = np.clip(1.0 - surv[:, -1], 0.0, 1.0)
    frame["fold"] = int(fold)
    frame["model"] = cfg.name
    if cfg.head == "cox":
        frame["score"], frame["score_kind"] = rows["out"].to_numpy(float), "log_risk"
    else:
        frame["score"], frame["score_kind"] = risk, "probability"
    frame[f"risk_{cfg.horizon_years:g}y"] = risk
    for j, y in enumerate(years):
        frame[f"surv_{y:g}y"] = surv[:, j]
    return frame


# ---------------------------------------------------------------------------------------------- CV
TUNE_SPLIT = "tune"  # inner early-stopping patients of a CV fold (evaluate reads it as a validation split)


def fold_roles(meta: pd.DataFrame, patients: Mapping[str, Sequence[str]], cfg: DeepSurvConfig, fold: int) -> pd.Series:
    """Role per study_id for one CV fold: the fold's `val` / `external` patients scored, its `train`
    patients split 5:1 by patient (stratified on the event) into train and `tune` for early stopping."""
    pid = meta["patient_id"].astype(str)
    role_of = {p: r for r, ids in patients.items() for p in ids}
    inner = meta[pid.isin(set(patients.get("train", []))).to_numpy()]
    spec = SimpleNamespace(label="event", seed=cfg.seed + 7919 * (fold + 1), val_fraction=cfg.val_fraction,
                           test_fraction=0.0)
    from raypipe.train.ct import split_by_patient

    inner_role = split_by_patient(inner.drop(columns=["split"], errors="ignore"), spec)
    role_of.update({p: (TUNE_SPLIT if r == "val" else "train") for p, r in zip(inner["patient_id"].astype(str), inner_role)})
    return pd.Series(pid.map(role_of).fillna("unused").to_numpy(), index=meta["study_id"].astype(str).to_numpy())


def fit_deepsurv_fold(task: Any) -> dict[str, float]:
    """`raypipe.tune.cv` fold-fit: DeepSurv on the fold's training patients; OOF rows as split `val`."""
    from raypipe import storage
    from raypipe.tune.cv import read_shard_meta

    cfg: DeepSurvConfig = task.config
    update: dict[str, Any] = {"run_name": "train"}
    if cfg.storage_path:
        update["storage_path"] = storage.join(cfg.storage_path, f"fold_{task.fold:02d}")
    fold_cfg = DeepSurvConfig.model_validate({**cfg.model_dump(), **update})
    roles = fold_roles(read_shard_meta(task.data_dir), task.patients, fold_cfg, task.fold)
    callbacks = []
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    fit_deepsurv(fold_cfg, task.data_dir, task.out_dir, roles=roles, fold=task.fold, callbacks=callbacks,
                 monitor_split=TUNE_SPLIT)
    meta = json.loads(storage.read_bytes(storage.join(task.out_dir, "model_meta.json")).decode())
    out = {"best_epoch": float(meta["best_epoch"]), "epochs_run": float(meta["epochs_run"])}
    if meta.get("best_value") is not None:
        out[meta["monitor"]] = float(meta["best_value"])
    return out


# ---------------------------------------------------------------------------------------------- entry point
def train_cli(model: str, config_path: str | None, data: str | None, out: str | None) -> int:
    """`raypipe train deepsurv --config C --data DIR --out DIR`: load, train, write; exit code."""
    from raypipe.config import load_config
    from raypipe.ray_utils import init_ray

    if not data:
        raise SystemExit(f"raypipe train {model}: --data (a folder of X-ray shards) is required")
    cfg = load_config(DeepSurvConfig, config_path)
    out = out or os.path.join("runs", cfg.name)
    init_ray()
    fit_deepsurv(cfg, data, out)
    log.info("run written to %s", out)
    return 0


__all__ = ["DeepSurvConfig", "XrayBatch", "fit_deepsurv", "head_loss", "prediction_frame", "train_cli",
           "train_loop_deepsurv", "write_outputs"]
