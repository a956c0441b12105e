"""Ray Train loop of DeepSurv on X-ray shards (papers/001), with pycox heads on the same encoder for comparison.

Reads top to bottom like a training script:

1. `XrayBatch` turns shard rows into model inputs: the preprocessed image (C x 384 x 384 float16, resized on
   the fly when `image_size` is set), clinical variables standardised with the training rows' means and
   SDs, time and event (and the interval index for the discrete-time heads).
2. `train_loop_deepsurv` runs in every Ray Train worker: the "train" shard read once into memory (images
   float16, resized once when `image_size` is set; `cache_train: false` streams it every epoch) and served
   in shuffled, prefetched batches; the head's loss (Cox: `cox_ph_loss_distributed`, so the risk sets span
   the global batch across workers); validation split over the ranks and gathered (every rank gets the
   metrics one worker would compute); checkpoints through `raypipe.train.common`.
3. `fit_deepsurv` on the driver: split by patient (the paper's 5:1 train/validation split of the training
   set), train, score with the best checkpoint, fit the Breslow baseline on the training rows, and write
   model.pt, model_meta.json, baseline_hazard.json, config.yaml, metrics.csv, predictions.parquet,
   metrics.json. The predictions carry S(t) for t = 1..10 years (`surv_{t}y`) and the 5-year risk.

Heads: `cox` (DeepSurv, the paper), `logistic_hazard` and `deephit` (pycox's discrete-time losses on a grid
fitted by `LabTransDiscreteTime`), `coxtime` (pycox's case-control loss; controls drawn from the risk set
within each worker's batch).
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from raypipe.clinical import ClinicalEncoder
from raypipe.data.collate import StudyMoves, clinical_tensor, float_column, stack_cells, study_keys
from raypipe.data.memory import CachedRows, MemoryLoader, cache_rows
from raypipe.metrics import c_index_or_nan
from raypipe.train.common import DeviceSetup, autocast, gather_shares, select_device, share_of, unwrap
from raypipe.train.fold import FoldTask
from raypipe.train.loop import CHECKPOINT_SCORE, WorkerTask, run_worker_loop
from raypipe.train.xray_config import DeepSurvConfig

log = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25
BASELINE_FILE = "baseline_hazard.json"
_IMAGE_COLUMNS = ("image", "keypoints")


# ---------------------------------------------------------------------------------------------- batches
class XrayBatch:
    """collate_fn for `iter_torch_batches`: shard rows -> x (B, C, H, W), clinical, time_days, event, idx.

    `dtype` float32 feeds a model directly; float16 keeps the shards' precision until the training device.
    `moves` (training only) flips/shifts each study's L1-L5 channels together for `epoch` (`StudyMoves`).
    """

    def __init__(self, image_size: int | None, uses_image: bool, clinical: ClinicalEncoder | None,
                 cuts: Sequence[float] | None = None, dtype: Any = np.float32, moves: StudyMoves | None = None,
                 epoch: int = 0) -> None:
        self.image_size, self.uses_image, self.clinical = image_size, uses_image, clinical
        self.cuts = None if cuts is None else np.asarray(cuts, dtype=np.float64)
        self.dtype = np.dtype(dtype)
        self.moves, self.epoch = moves, epoch

    def images(self, arr: np.ndarray) -> np.ndarray:
        """A batch's images (B, C, H, W) in this collate's dtype, resized to `image_size` when set."""
        if self.image_size and tuple(arr.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)),
                              size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
            return x.numpy().astype(self.dtype, copy=False)
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def tabular(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The non-image inputs: clinical, time_days, event (NaN when missing) and the interval index."""
        n = len(batch["study_id"])
        out: dict[str, torch.Tensor] = {}
        clinical = clinical_tensor(batch, self.clinical)
        if clinical is not None:
            out["clinical"] = clinical
        for name in ("time_days", "event"):
            out[name] = float_column(batch, name, n)
        if self.cuts is not None and batch.get("time_days") is not None:
            out["idx"] = torch.from_numpy(duration_index(self.cuts, out["time_days"].numpy(), out["event"].numpy()))
        return out

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Stack one batch; missing time/event become NaN (scoring rows need none)."""
        out: dict[str, torch.Tensor] = {}
        if self.uses_image:
            x = self.images(stack_cells(batch["image"]))
            if self.moves:
                x = self.moves.apply(np.array(x), study_keys(batch["study_id"]), self.epoch)  # never the caller's rows
            out["x"] = torch.from_numpy(x)
        return out | self.tabular(batch)


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
    return (x.to(setup.device, non_blocking=True).float() if x is not None else None,
            c.to(setup.device, non_blocking=True) if c is not None else None)


def _std_log_time(t: torch.Tensor, labels: Mapping[str, Any]) -> torch.Tensor:
    """Cox-Time's time input: standardised log-days (pycox's `LabTransCoxTime` with log_duration)."""
    return (torch.log(t.clamp_min(1.0)) - labels["logt_mean"]) / labels["logt_sd"]


def head_loss(cfg: DeepSurvConfig, model: nn.Module, batch: Mapping[str, torch.Tensor], setup: DeviceSetup,
              labels: Mapping[str, Any], distributed: bool = True, rng: np.random.Generator | None = None
              ) -> torch.Tensor:
    """The head's training loss on one batch (Cox: over the global batch when `distributed`)."""
    x, c = _inputs(batch, setup)
    time, event = batch["time_days"].to(setup.device), batch["event"].to(setup.device)
    if cfg.head == "coxtime":
        return _coxtime_loss(cfg, model, x, c, time, event, labels, rng or np.random.default_rng(0))
    with autocast(setup):
        out = model(x, c)
    idx = batch["idx"].to(setup.device) if cfg.head in ("logistic_hazard", "deephit") else None
    return output_loss(cfg, out.float(), time, event, idx, distributed)


def output_loss(cfg: DeepSurvConfig, out: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                idx: torch.Tensor | None, distributed: bool = True) -> torch.Tensor:
    """The loss of the Cox or discrete-time heads from the network's outputs (not Cox-Time: it samples controls)."""
    from pycox.models import loss as pl

    from raypipe.losses import cox_ph_loss, cox_ph_loss_distributed

    if cfg.head == "cox":
        cox = cox_ph_loss_distributed if distributed else cox_ph_loss
        return cox(out, time, event, ties=cfg.ties)
    if cfg.head == "logistic_hazard":
        return pl.nll_logistic_hazard(out, idx, event)
    from pycox.models.data import pair_rank_mat

    rank = torch.from_numpy(pair_rank_mat(idx.cpu().numpy(), event.cpu().numpy())).to(out.device)
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
    return output_tensor(cfg, model, batch, setup, labels).cpu().numpy()


@torch.no_grad()
def output_tensor(cfg: DeepSurvConfig, model: nn.Module, batch: Mapping[str, torch.Tensor], setup: DeviceSetup,
                  labels: Mapping[str, Any]) -> torch.Tensor:
    """`raw_outputs` as a float32 tensor on the worker's device."""
    net = unwrap(model)
    x, c = _inputs(batch, setup)
    with autocast(setup):
        if cfg.head == "coxtime":
            n = (x if x is not None else c).shape[0]
            horizon = torch.full((n,), cfg.horizon_years * DAYS_PER_YEAR, device=setup.device)
            out = net(x, c, _std_log_time(horizon, labels))
        else:
            out = net(x, c)
    return out.float()


def risk_score(cfg: DeepSurvConfig, outputs: np.ndarray, labels: Mapping[str, Any]) -> np.ndarray:
    """A score that grows with risk, for the validation C-index: log-risk, or risk at the horizon."""
    if cfg.head in ("cox", "coxtime"):
        return np.asarray(outputs, dtype=np.float64)
    from raypipe.models.survival_heads import discrete_survival, step_at

    surv = discrete_survival(cfg.head, outputs)
    return 1.0 - step_at(labels["cuts"], surv, [cfg.horizon_years * DAYS_PER_YEAR])[:, 0]


# ---------------------------------------------------------------------------------------------- worker loop
class DeepSurvWorkerTask(WorkerTask):
    """Hooks of the shared worker loop for DeepSurv and the pycox heads."""

    distributed_validation = True

    def __init__(self, cfg: DeepSurvConfig, loop_config: Mapping[str, Any]) -> None:
        super().__init__(cfg, loop_config)
        self.clinical = ClinicalEncoder.from_dict(loop_config.get("clinical"))
        self.labels = loop_config["labels"]
        self.rng = np.random.default_rng(cfg.seed)
        self.loader: MemoryLoader | None = None
        self.val: XrayValidationRows | None = None

    def build_model(self) -> nn.Module:
        return build(self.cfg, len(self.clinical.columns), self.loop_config["in_chans"])

    def init_model(self, model: nn.Module) -> None:
        if self.labels.get("init_bias") is not None:  # start at the training rows' marginal curve
            with torch.no_grad():
                unwrap(model).net.out.bias.copy_(torch.as_tensor(self.labels["init_bias"], dtype=torch.float32))

    def extra_state(self) -> dict[str, Any]:
        return {"clinical": self.clinical.to_dict()}

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        self.rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
        return {}

    def train_batches(self, epoch: int, batch_size: int) -> Any:
        import ray.train

        cfg = self.cfg
        moves = StudyMoves(cfg.augment_flip, cfg.augment_shift, cfg.seed)
        shard = ray.train.get_dataset_shard("train")
        if not cfg.cache_train:
            collate = XrayBatch(cfg.image_size, cfg.uses_image, self.clinical, self.labels.get("cuts"),
                                dtype=np.float16, moves=moves, epoch=epoch)
            return stream_batches(cfg, shard, epoch, batch_size, collate, pin=self.setup.device.type == "cuda")
        if self.loader is None:
            collate = XrayBatch(cfg.image_size, cfg.uses_image, self.clinical, self.labels.get("cuts"), dtype=np.float16)
            self.loader = train_loader(cfg, shard, batch_size, collate, moves)
        return self.loader.epoch(epoch)

    def train_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int] | None:
        n = int(batch["time_days"].shape[0])
        if self.world == 1 and n <= 1:
            return None  # a 0/1-row tail: no risk set, and BatchNorm cannot train on it (DDP ranks must all step)
        return head_loss(self.cfg, model, batch, self.setup, self.labels, distributed=True, rng=self.rng), n

    def validate(self, model: nn.Module) -> dict[str, float]:
        import ray.train

        if self.val is None:
            collate = XrayBatch(self.cfg.image_size, self.cfg.uses_image, self.clinical, self.labels.get("cuts"),
                                dtype=np.float16)
            shard = ray.train.get_dataset_shard("val")
            self.val = xray_validation_rows(shard.iter_batches(batch_size=64, batch_format="numpy"), collate)
        return validate_shares(self.cfg, model, self.setup, self.val, self.labels)


def stream_batches(cfg: DeepSurvConfig, shard: Any, epoch: int, batch_size: int, collate: XrayBatch,
                   pin: bool = False) -> Any:
    """One epoch streamed through Ray Data (`cache_train: false`), float16 images."""
    return shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=collate, device="cpu", prefetch_batches=cfg.prefetch_batches,
        pin_memory=pin, local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=cfg.seed + epoch,
    )


def train_loader(cfg: DeepSurvConfig, shard: Any, batch_size: int, collate: XrayBatch,
                 moves: StudyMoves | None = None) -> MemoryLoader:
    """Read this worker's training rows once into memory and serve shuffled, prefetched batches from there."""
    rows = read_rows(shard.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=cfg.prefetch_batches),
                     collate)
    log.info("training rows cached in memory: %d studies, %.1f MiB", len(rows), rows.nbytes / 2**20)
    return MemoryLoader(rows, batch_size, None, shuffle=cfg.shuffle_buffer > 0, seed=cfg.seed,
                        prefetch=cfg.prefetch_batches, moves=moves)


def read_rows(batches: Iterable[Mapping[str, Any]], collate: XrayBatch) -> CachedRows:
    """Drain numpy batches into memory: images (float16, resized once when asked) and the tabular inputs."""
    return cache_rows(batches, "image" if collate.uses_image else None, False, collate.tabular, collate.images)


class XrayValidationRows:
    """Validation rows as this rank scores them: all rows' labels (sorted by study id), this rank's share of inputs."""

    def __init__(self, n: int, targets: Mapping[str, np.ndarray], share: CachedRows) -> None:
        self.n, self.targets, self.share = n, dict(targets), share


def xray_validation_rows(batches: Iterable[Mapping[str, Any]], collate: XrayBatch) -> XrayValidationRows:
    """Read the (unsplit) validation rows once; keep every row's labels and this rank's round-robin share."""
    rows = read_rows(batches, collate)
    order = np.argsort(rows.study_ids.astype(str), kind="stable")
    share = rows.take(order[share_of(len(order))])
    targets = {k: v[order] for k, v in rows.tabular.items() if k in ("time_days", "event", "idx")}
    return XrayValidationRows(len(order), targets, share)


def train_loop_deepsurv(loop_config: dict) -> None:
    """Ray Train worker loop of DeepSurv (the shared skeleton, `raypipe.train.loop`)."""
    run_worker_loop(DeepSurvWorkerTask(DeepSurvConfig.model_validate(loop_config["config"]), loop_config))


def _output_width(cfg: DeepSurvConfig) -> int:
    """Outputs per row: one (Cox, Cox-Time) or one per interval of the grid (discrete heads)."""
    return cfg.num_durations if cfg.head in ("logistic_hazard", "deephit") else 1


@torch.no_grad()
def validate_shares(cfg: DeepSurvConfig, model: nn.Module, setup: DeviceSetup, val: XrayValidationRows,
              labels: Mapping[str, Any]) -> dict[str, float]:
    """Loss (per batch of `eval_batch_size`) and Harrell's C over the whole validation set.

    Each rank scores its share; the outputs are gathered in study-id order and every rank computes the
    metrics from all of them, so they do not depend on the number of workers.
    """
    net = unwrap(model)
    net.eval()
    share, bs = val.share, cfg.eval_batch_size
    parts = [torch.zeros((0, _output_width(cfg)), device=setup.device)]
    for i in range(0, len(share), bs):
        b: dict[str, torch.Tensor] = {k: torch.from_numpy(v[i:i + bs]) for k, v in share.tabular.items()}
        if share.images is not None:
            b["x"] = torch.from_numpy(share.images[i:i + bs])
        out = output_tensor(cfg, net, b, setup, labels)
        parts.append(out.reshape(out.shape[0], -1))
    flat = gather_shares(torch.cat(parts), val.n, setup.device)
    return xray_validation_metrics(cfg, flat, {k: torch.from_numpy(v) for k, v in val.targets.items()}, labels)


def xray_validation_metrics(cfg: DeepSurvConfig, flat: torch.Tensor, targets: Mapping[str, torch.Tensor],
                            labels: Mapping[str, Any]) -> dict[str, float]:
    """Validation loss and Harrell's C from all rows' outputs (n, width) and labels (CPU, the same row order)."""
    n, bs = int(flat.shape[0]), cfg.eval_batch_size
    if n == 0:
        return {"val_loss": float("nan"), "val_c_index": float("nan")}
    out = flat[:, 0] if flat.shape[1] == 1 and cfg.head in ("cox", "coxtime") else flat
    total = 0.0
    if cfg.head != "coxtime":
        for i in range(0, n, bs):
            idx = targets["idx"][i:i + bs] if "idx" in targets else None
            loss = output_loss(cfg, out[i:i + bs], targets["time_days"][i:i + bs], targets["event"][i:i + bs], idx,
                               distributed=False)
            total += float(loss) * int(min(bs, n - i))
    score = risk_score(cfg, out.numpy(), labels)
    c = c_index_or_nan(targets["time_days"].numpy().astype(float), targets["event"].numpy().astype(float), score)
    return {"val_loss": total / n if cfg.head != "coxtime" else float("nan"), "val_c_index": c}


# ---------------------------------------------------------------------------------------------- driver
def split_roles(meta: pd.DataFrame, cfg: DeepSurvConfig) -> pd.Series:
    """Train/val(/test) role per study by patient: the paper's 5:1 split, stratified on the event."""
    from raypipe.data.splits import split_by_patient

    return split_by_patient(meta, "event", cfg.seed, cfg.val_fraction, cfg.test_fraction)


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
    from raypipe.data.subsets import small_columns, subset_studies
    from raypipe.train.common import make_trainer

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
    meta = small_columns(shards, [c for c in names if c not in _IMAGE_COLUMNS])
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
    tr = meta.loc[train_mask]
    clinical = ClinicalEncoder()
    if cfg.clinical:
        clinical = ClinicalEncoder.fit({c: tr[c].to_numpy() for c in cfg.clinical}, cfg.clinical,
                                       row_ids=tr["study_id"].tolist())
    labels = label_transform(cfg, tr["time_days"].to_numpy(float), tr["event"].to_numpy(float))
    in_chans = _image_channels(shards) if cfg.uses_image else 0
    columns = ["patient_id", "study_id", "time_days", "event", *cfg.clinical, *(["image"] if cfg.uses_image else [])]
    ds = shards.select_columns(list(dict.fromkeys(columns)))

    run_dir = storage.join(storage_path, cfg.run_name)
    loop_config = {"config": cfg.model_dump(mode="json"), "clinical": clinical.to_dict(), "labels": labels,
                   "in_chans": in_chans, "metrics_csv": storage.join(run_dir, "metrics.csv")}
    trainer = make_trainer(
        train_loop_deepsurv, loop_config,
        {"train": subset_studies(ds, train_ids), "val": subset_studies(ds, val_ids)},
        run=cfg, storage_path=storage_path, callbacks=callbacks, score_attribute=CHECKPOINT_SCORE,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    write_outputs(cfg, result, ds, meta, role, clinical, labels, in_chans, out, fold, data_dir)
    return result


def write_outputs(cfg: DeepSurvConfig, result: Any, ds: Any, meta: pd.DataFrame, role: pd.Series,
                  clinical: ClinicalEncoder, labels: Mapping[str, Any], in_chans: int, out: str,
                  fold: int = -1, data_dir: str | None = None) -> dict[str, Any]:
    """Best checkpoint -> the run files + baseline_hazard.json, every non-training row scored; returns metrics."""
    from raypipe import storage
    from raypipe.artifact import RunArtifact
    from raypipe.config import config_hash
    from raypipe.data.subsets import subset_studies
    from raypipe.train.outputs import best_and_latest, selection_fields, write_run_files, write_scored

    payload, latest = best_and_latest(result)
    n_clinical = len(clinical.columns)
    model = build(cfg, n_clinical, in_chans)
    model.load_state_dict(payload["model"])
    model.eval()

    scored_mask = (role != "unused").to_numpy()
    outputs = score_dataset(cfg, model, subset_studies(ds, meta.loc[scored_mask, "study_id"].tolist()), clinical,
                            labels)
    rows = meta.loc[scored_mask].assign(split=role[scored_mask].to_numpy()).merge(outputs, on="study_id")
    train_rows = rows[rows["split"] == "train"]
    baseline = fit_baseline(cfg, model, train_rows, ds, clinical, labels)
    frame = prediction_frame(cfg, rows[rows["split"] != "train"], baseline, labels, fold, model)

    shard_config = storage.join(data_dir, "config.yaml") if data_dir else None
    preprocess: dict[str, Any] = {"image_size": cfg.image_size, "in_chans": in_chans}
    if shard_config and storage.exists(shard_config):  # the radiograph preprocessing, for publish and scoring
        storage.atomic_write_bytes(storage.join(out, "preprocess.yaml"), storage.read_bytes(shard_config))
        preprocess["shards_config"] = "preprocess.yaml"
    storage.atomic_write_json(storage.join(out, BASELINE_FILE), baseline)
    selection = selection_fields(cfg, payload, latest)
    artifact = RunArtifact(
        builder=builder_name(cfg), kwargs=head_kwargs(cfg, n_clinical, in_chans), task="xray_survival",
        train_task="deepsurv", display_name=cfg.name, clinical=clinical.to_dict(), preprocess=preprocess,
        labels=["time_days", "event"], score_kind="log_risk" if cfg.head == "cox" else "probability",
        config_hash=config_hash(cfg), **selection,
        head=cfg.head, variant=cfg.variant, clinical_model=cfg.clinical_model, in_chans=in_chans,
        image_size=cfg.image_size, labels_transform=dict(labels), baseline_file=BASELINE_FILE,
        survival_years=list(cfg.survival_years), horizon_years=cfg.horizon_years,
        **({"baseline_hazard": baseline} if baseline["kind"] == "breslow" else {}),
    )
    write_run_files(out, cfg, payload["model"], latest["state"]["history"], artifact)
    metrics = write_scored(out, frame, cfg, selection["best_epoch"])
    log.info("wrote %s (best epoch %s, %s %s)", out, selection["best_epoch"], cfg.monitor, selection["best_value"])
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
def score_dataset(cfg: DeepSurvConfig, model: nn.Module, ds: Any, clinical: ClinicalEncoder | None,
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
def fit_deepsurv_fold(task: FoldTask) -> dict[str, float]:
    """Fold-fit (`raypipe.tune.cv`): DeepSurv on the fold's training patients, split 5:1 by patient into
    train and `tune` (early stopping, checkpoint); the held-out fold is scored once as split `val`."""
    from raypipe.data.splits import TUNE_ROLE
    from raypipe.data.subsets import shard_meta
    from raypipe.train.fold import fold_config, fold_roles, fold_summary

    cfg = fold_config(task.config, task.fold)
    meta = shard_meta(task.data_dir)
    roles = fold_roles(meta, task, "event", cfg.seed, cfg.val_fraction)
    fit_deepsurv(cfg, task.data_dir, task.out_dir, roles=roles, fold=task.fold, callbacks=task.callbacks,
                 monitor_split=TUNE_ROLE)
    add_coxph_baselines(task.out_dir, meta.assign(split=roles.to_numpy()), task.fold)  # `unused` rows: neither side
    return fold_summary(task.out_dir)


def add_coxph_baselines(out_dir: str, frame: pd.DataFrame, fold: int) -> None:
    """Append CoxPH on clinical models 1-3 (papers/001), fitted on the fold's training patients, to the fold's
    predictions (the same held-out rows DeepSurv scored), so the CV report has the paper's C-index table."""
    from raypipe import storage
    from raypipe.baselines.coxph import fit_clinical_baselines
    from raypipe.data.splits import TUNE_ROLE
    from raypipe.predictions import read_prediction_metadata, read_predictions, write_predictions

    path = storage.join(out_dir, "predictions.parquet")
    meta = read_prediction_metadata(path)
    preds = read_predictions(path).drop(columns=["source_file"], errors="ignore")
    preds.attrs = {}
    scored = frame[frame["split"].isin(["train", TUNE_ROLE, *preds["split"].unique()])]
    try:
        extra = fit_clinical_baselines(scored, train_splits=("train", TUNE_ROLE), fold=fold)
    except (ValueError, KeyError) as exc:  # e.g. shards without the clinical columns of models 1-3
        log.warning("CoxPH baselines skipped in fold %d: %s", fold, exc)
        return
    extra = extra[extra["split"] != TUNE_ROLE]
    write_predictions(pd.concat([preds, extra], ignore_index=True), path,
                      {k: v for k, v in meta.items() if k not in ("created", "rows", "models")})


__all__ = ["DeepSurvConfig", "XrayBatch", "fit_deepsurv", "head_loss", "prediction_frame",
           "train_loop_deepsurv", "write_outputs"]
