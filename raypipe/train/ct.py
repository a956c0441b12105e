"""Ray Train for the CT branch: the attention CNN-RNN (papers/000) and the multitask model (papers/002).

The file reads top to bottom like a training script:

1. The model, its loss and its validation metrics (batches come from `raypipe.data.collate.SliceBatch`:
   14 equidistant slices per study with a random start when training, centred when evaluating; clinical
   variables standardised by the one `raypipe.clinical.ClinicalEncoder` fitted on the training rows).
2. `CTWorkerTask`: the hooks of the shared worker loop (`raypipe.train.loop.run_worker_loop`): the "train"
   shard read once into memory (`raypipe.data.memory`; `cache_train: false` streams it every epoch) and
   sampled per epoch in vectorised batches, float16 until the device; one step; validation split over the
   ranks (each scores its round-robin share of the validation rows, sorted by study id, once sampled) and
   gathered, so every rank computes the same metrics as one worker would.
3. `fit_ct` on the driver: read the shards, split by patient, train, then score every non-training row
   with the best checkpoint and write the run files (`raypipe.train.outputs`). In cross-validation
   (`fold_patients`) the fold's training patients are split again into `train` and `tune`: early stopping
   and the best checkpoint are chosen on `tune`; the held-out fold (`val`) is only scored, once, at the end.

Loss of the CNN-RNN: the paper's "cross-entropy" over two classes equals binary cross-entropy on one
logit (softmax over [0, z] is sigmoid(z)), so the model has one output and uses BCE-with-logits.
Multitask loss: BCE on the prevalent fracture + Cox partial likelihood over the global batch (gathered
across workers) + BCE per horizon where the horizon label is known (event before it, or follow-up past it).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from raypipe.clinical import ClinicalEncoder
from raypipe.data.collate import SliceBatch, StudyMoves, gather_slices, tabular_tensors
from raypipe.data.memory import CachedRows, MemoryLoader, SliceSampling, cache_rows
from raypipe.losses import horizon_labels, masked_bce
from raypipe.metrics import auroc_or_nan, c_index_or_nan
from raypipe.train.common import DeviceSetup, autocast, gather_shares, share_of, unwrap
from raypipe.train.config import CTTrainConfig, MultitaskConfig
from raypipe.train.fold import FoldTask
from raypipe.train.loop import CHECKPOINT_SCORE, WorkerTask, run_worker_loop

log = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25


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
    """Model outputs for a collated batch (float16 images become float32 on the device), under autocast on CUDA."""
    x = batch["x"].to(setup.device, non_blocking=True).float()
    clinical = batch.get("clinical")
    with autocast(setup):
        return model(x, clinical.to(setup.device, non_blocking=True) if clinical is not None else None)


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


def target_columns(cfg: CTTrainConfig) -> list[str]:
    """Columns the loss and validation need."""
    if isinstance(cfg, MultitaskConfig):
        return [cfg.label, cfg.prevalent_label, "time_days", "event"]
    return [cfg.label]


# ---------------------------------------------------------------------------------------------- worker loop
class CTWorkerTask(WorkerTask):
    """Hooks of the shared worker loop for the CNN-RNN and the multitask model."""

    distributed_validation = True

    def __init__(self, cfg: CTTrainConfig, loop_config: Mapping[str, Any]) -> None:
        super().__init__(cfg, loop_config)
        self.clinical = ClinicalEncoder.from_dict(loop_config.get("clinical"))
        self.targets = target_columns(cfg)
        self.loader: MemoryLoader | None = None
        self.val: ValidationRows | None = None

    def build_model(self) -> nn.Module:
        return build(self.cfg, len(self.clinical.columns))

    def extra_state(self) -> dict[str, Any]:
        return {"clinical": self.clinical.to_dict()}

    def train_batches(self, epoch: int, batch_size: int) -> Any:
        import ray.train

        cfg = self.cfg
        shard = ray.train.get_dataset_shard("train")
        if not cfg.cache_train:
            return stream_batches(cfg, shard, epoch, batch_size, self.clinical, self.targets,
                                  pin=self.setup.device.type == "cuda")
        if self.loader is None:
            self.loader = train_loader(cfg, shard, batch_size, self.clinical, self.targets)
        return self.loader.epoch(epoch)

    def train_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        out = _forward(model, batch, self.setup)
        return _loss(self.cfg, out, batch, self.setup.device), int(batch["x"].shape[0])

    def validate(self, model: nn.Module) -> dict[str, float]:
        import ray.train

        if self.val is None:
            shard = ray.train.get_dataset_shard("val")
            self.val = validation_rows(self.cfg, shard.iter_batches(batch_size=256, batch_format="numpy"),
                                       self.clinical)
        return validate_shares(self.cfg, model, self.setup, self.val)


def stream_batches(cfg: CTTrainConfig, shard: Any, epoch: int, batch_size: int, clinical: ClinicalEncoder | None,
                   targets: Sequence[str], pin: bool = False) -> Any:
    """One epoch streamed through Ray Data (`cache_train: false`): vectorised sampling in the collate, float16."""
    collate = SliceBatch(cfg.input, cfg.n_slices, True, cfg.seed, epoch, clinical, targets, dtype=np.float16,
                         moves=study_moves(cfg))
    return shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=collate, device="cpu", prefetch_batches=cfg.prefetch_batches,
        pin_memory=pin, local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=cfg.seed + epoch,
    )


def train_loader(cfg: CTTrainConfig, shard: Any, batch_size: int, clinical: ClinicalEncoder | None,
                 targets: Sequence[str]) -> MemoryLoader:
    """Read this worker's training rows once (packed float16 volumes) and serve sampled batches from memory."""
    rows = cache_rows(shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=cfg.prefetch_batches),
                      cfg.input, True, lambda b: tabular_tensors(b, clinical, targets, len(b["study_id"])))
    log.info("training rows cached in memory: %d studies, %.1f MiB", len(rows), rows.nbytes / 2**20)
    return MemoryLoader(rows, batch_size, SliceSampling(cfg.n_slices, True, cfg.seed), shuffle=cfg.shuffle_buffer > 0,
                        seed=cfg.seed, prefetch=cfg.prefetch_batches, moves=study_moves(cfg))


def study_moves(cfg: Any) -> StudyMoves:
    """The config's training augmentation (`augment_flip`, `augment_shift`; both off in the paper configs)."""
    return StudyMoves(cfg.augment_flip, cfg.augment_shift, cfg.seed)


class ValidationRows:
    """The validation set as this rank scores it: every row's targets (sorted by study id) and, for this rank's
    round-robin share, the centred slices (sampled once: evaluation is deterministic) and clinical inputs."""

    def __init__(self, n: int, targets: Mapping[str, np.ndarray], share: CachedRows) -> None:
        self.n, self.targets, self.share = n, dict(targets), share


def validation_rows(cfg: CTTrainConfig, batches: Iterable[Mapping[str, Any]],
                    clinical: ClinicalEncoder | None) -> ValidationRows:
    """Read the (unsplit) validation rows once; keep targets of all and the sampled inputs of this rank's share."""
    rows = cache_rows(batches, cfg.input, True,
                      lambda b: tabular_tensors(b, clinical, target_columns(cfg), len(b["study_id"])))
    order = np.argsort(rows.study_ids.astype(str), kind="stable")
    mine = order[share_of(len(order))]
    x = gather_slices(rows.images, rows.starts, rows.counts, mine, cfg.n_slices, None) if len(rows) else None
    share = CachedRows(x, None, None, {k: v[mine] for k, v in rows.tabular.items() if k == "clinical"},
                       rows.keys[mine], rows.study_ids[mine])
    targets = {k: v[order] for k, v in rows.tabular.items() if k != "clinical"}
    return ValidationRows(len(order), targets, share)


def train_loop_cnn_rnn(loop_config: dict) -> None:
    """Ray Train worker loop of the single-task CNN-RNN (BCE on `label`)."""
    run_worker_loop(CTWorkerTask(CTTrainConfig.model_validate(loop_config["config"]), loop_config))


def train_loop_multitask(loop_config: dict) -> None:
    """Ray Train worker loop of the multitask model (prevalent BCE + Cox + horizon BCE)."""
    run_worker_loop(CTWorkerTask(MultitaskConfig.model_validate(loop_config["config"]), loop_config))


def _output_width(cfg: CTTrainConfig) -> int:
    """Columns of the flattened model output: logit, or prevalent logit + log-risk + one logit per horizon."""
    return 2 + len(cfg.horizons_years) if isinstance(cfg, MultitaskConfig) else 1


def _flat_outputs(cfg: CTTrainConfig, out: Any) -> torch.Tensor:
    """Model outputs as one float32 (B, width) tensor (the layout `_output_dict` reads back)."""
    if not isinstance(cfg, MultitaskConfig):
        return out.float().reshape(-1, 1)
    return torch.cat([out["prevalent_logit"].float().reshape(-1, 1), out["log_risk"].float().reshape(-1, 1),
                      out["risk_logits"].float()], dim=1)


def _output_dict(cfg: CTTrainConfig, flat: torch.Tensor) -> Any:
    """The model's output structure from `_flat_outputs`."""
    if not isinstance(cfg, MultitaskConfig):
        return flat[:, 0]
    return {"prevalent_logit": flat[:, 0], "log_risk": flat[:, 1], "risk_logits": flat[:, 2:]}


@torch.no_grad()
def validate_shares(cfg: CTTrainConfig, model: nn.Module, setup: DeviceSetup, val: ValidationRows) -> dict[str, float]:
    """Loss and AUROC (plus C-index for the multitask model) over the whole validation set.

    Each rank scores its share; the outputs are gathered in study-id order and every rank computes the
    metrics from all of them: the loss over consecutive batches of `eval_batch_size` (the Cox term is
    per batch), so the figures do not depend on the number of workers.
    """
    net = unwrap(model)
    net.eval()
    parts = [torch.zeros((0, _output_width(cfg)), device=setup.device)]
    share, bs = val.share, cfg.eval_batch_size
    for i in range(0, len(share), bs):
        b = {"x": torch.from_numpy(share.images[i:i + bs])}
        if "clinical" in share.tabular:
            b["clinical"] = torch.from_numpy(share.tabular["clinical"][i:i + bs])
        parts.append(_flat_outputs(cfg, _forward(net, b, setup)))
    flat = gather_shares(torch.cat(parts), val.n, setup.device)
    return validation_metrics(cfg, flat, {k: torch.from_numpy(v) for k, v in val.targets.items()})


def validation_metrics(cfg: CTTrainConfig, flat: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Validation metrics from all rows' flattened outputs and targets (CPU tensors, the same row order)."""
    n, bs = int(flat.shape[0]), cfg.eval_batch_size
    if n == 0:
        return {"val_loss": float("nan"), "val_auroc": float("nan")}
    total = 0.0
    for i in range(0, n, bs):
        out = _output_dict(cfg, flat[i:i + bs])
        batch = {k: v[i:i + bs] for k, v in targets.items()}
        loss = (_loss(cfg, out, batch, flat.device, distributed=False) if isinstance(cfg, MultitaskConfig)
                else masked_bce(out, batch[cfg.label]))  # Cox term: per validation batch
        total += float(loss) * int(min(bs, n - i))
    metrics = {"val_loss": total / n}
    cat = {k: v.numpy() for k, v in targets.items()}
    if not isinstance(cfg, MultitaskConfig):
        metrics["val_auroc"] = auroc_or_nan(cat[cfg.label], flat[:, 0].numpy())
        return metrics
    out = {k: v.numpy() for k, v in _output_dict(cfg, flat).items()}
    metrics["val_c_index"] = c_index_or_nan(cat["time_days"], cat["event"], out["log_risk"])
    metrics["val_prevalent_auroc"] = auroc_or_nan(cat[cfg.prevalent_label], out["prevalent_logit"])
    hy = horizon_labels(targets["time_days"], targets["event"], [h * DAYS_PER_YEAR for h in cfg.horizons_years]).numpy()
    for j, h in enumerate(cfg.horizons_years):
        metrics[f"val_auroc_{h:g}y"] = auroc_or_nan(hy[:, j], out["risk_logits"][:, j])
    label_h = _label_horizon(cfg.label)
    metrics["val_auroc"] = (metrics.get(f"val_auroc_{label_h:g}y") if label_h in cfg.horizons_years
                            else auroc_or_nan(cat[cfg.label], out["log_risk"]))
    return metrics


def _label_horizon(label: str) -> float | None:
    """5.0 for `fracture_5y` (None for other label names)."""
    m = re.fullmatch(r"fracture_(\d+(?:\.\d+)?)y", label)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- driver
def roles_for_run(meta: pd.DataFrame, cfg: CTTrainConfig,
                  fold_patients: Mapping[str, Sequence[str]] | None) -> tuple[pd.Series, str]:
    """Role per study and the role early stopping monitors (`val` for a train run, `tune` in a CV fold)."""
    from raypipe.data.splits import TUNE_ROLE, nested_fold_roles, split_by_patient

    if fold_patients is None:
        return split_by_patient(meta, cfg.label, cfg.seed, cfg.val_fraction, cfg.test_fraction), "val"
    label = cfg.label if cfg.label in meta.columns else None
    return nested_fold_roles(meta, fold_patients, label, cfg.seed, cfg.val_fraction), TUNE_ROLE


def fit_ct(config: CTTrainConfig, data_dir: str, out_dir: str,
           fold_patients: Mapping[str, Sequence[str]] | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """Train a CT model on the shards in `data_dir` with Ray Train; write the run's files into `out_dir`.

    Rerunning with the same `out_dir` (and `run_name`) resumes from the latest checkpoint. Returns the
    Ray Train `Result`. `fold_patients` (cross-validation, `raypipe.tune.cv`) replaces the patient split:
    role -> patient ids, with `train` and `val` required (e.g. also `external`); the `train` patients are
    split again into train/`tune` for model selection; studies of patients not listed are neither trained
    on nor scored. `callbacks` are Ray Train callbacks (e.g. Tune's report callback in a sweep).
    """
    from raypipe import storage
    from raypipe.data.ct_pipeline import load_ct_shards
    from raypipe.data.subsets import small_columns, subset_studies
    from raypipe.train.common import make_trainer

    cfg = config
    multitask = isinstance(cfg, MultitaskConfig)
    out = str(out_dir) if storage.is_uri(out_dir) else os.path.abspath(out_dir)
    storage.makedirs(out)
    storage_path = cfg.storage_path or storage.join(out, "ray_results")

    shards = load_ct_shards(data_dir, backend="ray")
    schema_names = shards.schema().names
    need = ["patient_id", "study_id", cfg.input, *target_columns(cfg)]
    missing = [c for c in need if c not in schema_names and c not in (getattr(cfg, "prevalent_label", None),)]
    if missing:
        raise ValueError(f"CT shards in {data_dir} lack column(s) {missing} (have: {schema_names})")
    clinical_cols = list(cfg.clinical_columns) if cfg.use_clinical else []
    absent = [c for c in clinical_cols if c not in schema_names]
    if absent:
        raise ValueError(f"clinical column(s) {absent} are not in the shards")
    extra = [c for c in schema_names if c not in (cfg.input, "bone", "bone_muscle", "slice_level", "slice_z_mm")]
    meta = small_columns(shards, extra)
    meta["study_id"] = meta["study_id"].astype(str)
    role, monitor_role = roles_for_run(meta, cfg, fold_patients)
    if fold_patients is not None:
        keep = (role != "").to_numpy()
        meta, role = meta[keep].reset_index(drop=True), role[keep].reset_index(drop=True)
    train_mask = (role == "train").to_numpy()
    if not multitask:
        train_mask &= pd.to_numeric(meta[cfg.label], errors="coerce").notna().to_numpy()
    train_ids = meta.loc[train_mask, "study_id"].tolist()
    val_ids = meta.loc[(role == monitor_role).to_numpy(), "study_id"].tolist()
    if not train_ids or not val_ids:
        raise ValueError(f"need training and {monitor_role} studies, got {len(train_ids)} and {len(val_ids)}")
    log.info("studies: %d train, %d %s (model selection), %s scored only", len(train_ids), len(val_ids),
             monitor_role, dict(role[~role.isin(["train", monitor_role])].value_counts()))
    clinical = ClinicalEncoder()
    if clinical_cols:
        rows = meta.loc[train_mask]
        clinical = ClinicalEncoder.fit({c: rows[c].to_numpy() for c in clinical_cols}, clinical_cols,
                                       row_ids=rows["study_id"].tolist())

    columns = list(dict.fromkeys(["patient_id", "study_id", cfg.input, *[c for c in target_columns(cfg) if c in schema_names],
                                  *clinical_cols]))
    ds = shards.select_columns(columns)
    run_dir = storage.join(storage_path, cfg.run_name)
    loop_config = {"config": cfg.model_dump(mode="json"), "clinical": clinical.to_dict(),
                   "metrics_csv": storage.join(run_dir, "metrics.csv")}
    trainer = make_trainer(
        train_loop_multitask if multitask else train_loop_cnn_rnn, loop_config,
        {"train": subset_studies(ds, train_ids), "val": subset_studies(ds, val_ids)},
        run=cfg, storage_path=storage_path, callbacks=callbacks, score_attribute=CHECKPOINT_SCORE,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    _write_outputs(cfg, result, ds, meta, role, clinical, out)
    return result


def fit_ct_fold(task: FoldTask) -> dict[str, float]:
    """Fold-fit (`raypipe.tune.cv`): `fit_ct` on the fold's patients; selection on the inner `tune` split."""
    from raypipe.train.fold import fold_config, fold_summary

    cfg = fold_config(task.config, task.fold, display_name=task.config.name)
    fit_ct(cfg, task.data_dir, task.out_dir, fold_patients=task.patients, callbacks=task.callbacks)
    return fold_summary(task.out_dir)


def artifact_for(cfg: CTTrainConfig, clinical: ClinicalEncoder, selection: Mapping[str, Any]) -> Any:
    """The run artifact of a CT model (what scoring and Grad-CAM need to rebuild and feed it)."""
    from raypipe.artifact import RunArtifact
    from raypipe.config import config_hash

    multitask = isinstance(cfg, MultitaskConfig)
    labels = [cfg.label, cfg.prevalent_label] if multitask else [cfg.label]
    return RunArtifact(
        builder=cfg.model, kwargs=model_kwargs(cfg, len(clinical.columns)), display_name=cfg.name,
        task="ct_multitask" if multitask else "ct_fracture", train_task="multitask" if multitask else "cnn-rnn",
        clinical=clinical.to_dict(), labels=labels, config_hash=config_hash(cfg),
        preprocess={"input": cfg.input, "n_slices": cfg.n_slices},
        score_kind="log_risk" if multitask else "probability", **selection,
        input=cfg.input, n_slices=cfg.n_slices, label=cfg.label,
        horizons_years=list(getattr(cfg, "horizons_years", [])),
    )


def _write_outputs(cfg: CTTrainConfig, result: Any, ds: Any, meta: pd.DataFrame, role: pd.Series,
                   clinical: ClinicalEncoder, out: str) -> None:
    """Best checkpoint -> the run files, then every non-training row scored once."""
    from raypipe.data.subsets import subset_studies
    from raypipe.train.outputs import best_and_latest, selection_fields, write_run_files, write_scored

    payload, latest = best_and_latest(result)
    model = build(cfg, len(clinical.columns))
    model.load_state_dict(payload["model"])
    model.eval()
    selection = selection_fields(cfg, payload, latest)
    write_run_files(out, cfg, payload["model"], latest["state"]["history"], artifact_for(cfg, clinical, selection))

    scored = meta[(role != "train").to_numpy()].copy()
    scored["split"] = role[(role != "train").to_numpy()].to_numpy()
    preds = _predict(cfg, model, subset_studies(ds, scored["study_id"].tolist()), clinical)
    write_scored(out, _prediction_frame(cfg, scored, preds), cfg, selection["best_epoch"])
    log.info("wrote %s (best epoch %s, %s %s)", out, selection["best_epoch"], cfg.monitor, selection["best_value"])


@torch.no_grad()
def _predict(cfg: CTTrainConfig, model: nn.Module, ds: Any, clinical: ClinicalEncoder) -> pd.DataFrame:
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
