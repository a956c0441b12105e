"""Ray Train loop of the L1-L5 keypoint model (papers/001: HRNet-W32 heatmaps of the vertebral-body centres).

Reads top to bottom like a training script:

1. `KeypointBatch` reads each radiograph from the manifest on the fly (cached per worker process after the
   first read): min-max, zero padding to a square, resize to `input_size` (`preprocess.augment.square_input`);
   when training, a random rotation / scale / flip / shift moves image and keypoints together
   (`random_affine`, seeded by seed, epoch and study); targets are Gaussian heatmaps at stride 4.
2. `train_loop_keypoints` in every Ray Train worker: spatial-softmax cross-entropy on the heatmaps by default
   (`heatmap_kind: gaussian` for HRNet's MSE), Adam with the learning rate decaying from
   `lr` (1e-3) to `lr_min` (1e-5), OKS-based AP on the validation radiographs by rank 0 every epoch (decoded
   keypoints mapped back to original pixels), checkpoints and early stopping through `train.common`.
3. `fit_keypoints` on the driver: split the manifest's training patients (val_fraction), train, score the
   validation and test radiographs with the best checkpoint, write model.pt, model_meta.json, config.yaml,
   metrics.csv, metrics.json (`oks_ap`, `mean_error_px` with bootstrap CIs) and keypoint_predictions.parquet.

OKS here: one instance (the lumbar spine) per image; its area is that of the keypoints' bounding box grown
by one mean centre spacing in each direction (`spine_area`), and every centre has sigma `oks_sigma`.
"""
from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from raypipe.models.keypoints import heatmap_loss
from raypipe.data.collate import study_rng
from raypipe.train.common import autocast, unwrap
from raypipe.train.loop import CHECKPOINT_SCORE, WorkerTask, run_worker_loop
from raypipe.train.xray_config import KeypointTrainConfig

log = logging.getLogger(__name__)

STRIDE = 4
_CACHE: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}


# ---------------------------------------------------------------------------------------------- data
def spine_area(keypoints: np.ndarray) -> float:
    """OKS area of the spine instance: keypoints' bounding box grown by one mean spacing (px^2)."""
    p = np.asarray(keypoints, dtype=np.float64)
    s = float(np.mean(np.linalg.norm(np.diff(p, axis=0), axis=1)))
    return float((np.ptp(p[:, 0]) + s) * (np.ptp(p[:, 1]) + s))


def load_study(image_path: str, keypoints_path: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(square input, its keypoints, original->input matrix, original keypoints), cached: reads happen once."""
    key = (image_path, size)
    if key not in _CACHE:
        from raypipe.io.keypoints import read_keypoints
        from raypipe.io.radiograph import read_radiograph
        from raypipe.preprocess.augment import square_input

        kp = np.asarray(read_keypoints(keypoints_path).xy, dtype=np.float64)
        sq = square_input(read_radiograph(image_path).pixels, size, kp)
        _CACHE[key] = (sq.image, sq.keypoints, sq.matrix, kp)
    return _CACHE[key]


class KeypointBatch:
    """collate_fn: manifest rows -> x (B, 1, S, S), heatmap targets (B, 5, S/4, S/4), keypoints, matrices."""

    def __init__(self, cfg: KeypointTrainConfig, train: bool, epoch: int) -> None:
        self.cfg, self.train, self.epoch = cfg, train, epoch

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Load, augment (training only) and render one batch."""
        from raypipe.models.keypoints import render_heatmaps
        from raypipe.preprocess.augment import augment, random_affine

        cfg, size = self.cfg, self.cfg.input_size
        xs, kps, mats, gts = [], [], [], []
        for img_path, kp_path, study in zip(batch["image_path"], batch["keypoints_path"], batch["study_id"]):
            img, kp, mat, gt = load_study(str(img_path), str(kp_path), size)
            if self.train:
                rng = study_rng(cfg.seed, self.epoch, str(study))
                m = random_affine(size, rng, cfg.rotation_deg, tuple(cfg.scale_range), cfg.flip_prob, cfg.translate_frac)
                img, kp = augment(img, kp, m)
            xs.append(img)
            kps.append(kp)
            mats.append(mat)
            gts.append(gt)
        kp_t = torch.from_numpy(np.stack(kps).astype(np.float32))
        return {
            "x": torch.from_numpy(np.stack(xs)[:, None].astype(np.float32)),
            "target": render_heatmaps(kp_t, (size // STRIDE, size // STRIDE), cfg.heatmap_sigma, stride=STRIDE),
            "keypoints": kp_t,
            "matrix": torch.from_numpy(np.stack(mats)),
            "gt": torch.from_numpy(np.stack(gts)),
        }


def learning_rate(cfg: KeypointTrainConfig, epoch: int) -> float:
    """Learning rate of a 1-based epoch: cosine or 10x steps from `lr` down to `lr_min` at the last epoch."""
    frac = (epoch - 1) / max(1, cfg.epochs - 1)
    if cfg.lr_schedule == "cosine":
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))
    steps = max(1, round(math.log10(cfg.lr / cfg.lr_min)))
    segment = min(steps, math.floor(frac * (steps + 1)))
    return max(cfg.lr_min, cfg.lr * 10.0 ** (-segment))


# ---------------------------------------------------------------------------------------------- model
def build(cfg: KeypointTrainConfig) -> nn.Module:
    """The registered keypoint model for this config."""
    from raypipe.models.registry import build_model

    return build_model(cfg.model, **model_kwargs(cfg))


def model_kwargs(cfg: KeypointTrainConfig) -> dict[str, Any]:
    """Registry kwargs: the config's model_kwargs, one input channel, the local pretrained weights if any."""
    kw: dict[str, Any] = {"in_chans": 1, **cfg.model_kwargs, "heatmap_kind": cfg.heatmap_kind}
    if cfg.pretrained_path:
        kw["pretrained_path"] = cfg.pretrained_path
    return kw


@torch.no_grad()
def predict_batch(model: nn.Module, b: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (B, 5, 2) in original pixels and their mean confidence (B,) for one collated batch."""
    from raypipe.preprocess.augment import to_original

    net = unwrap(model)
    coords, conf = net.decode(net(b["x"]).float().cpu())
    orig = np.stack([to_original(c.numpy(), m.numpy()) for c, m in zip(coords, b["matrix"])])
    return orig, conf.mean(dim=1).numpy()


def keypoint_metrics(pred: np.ndarray, gt: np.ndarray, scores: np.ndarray, sigma: float) -> dict[str, float]:
    """OKS-AP and mean keypoint error (original pixels) over a set of radiographs."""
    from raypipe.models.keypoints import oks_ap

    areas = np.array([spine_area(g) for g in gt])
    ap = oks_ap(pred, gt, areas, np.full(gt.shape[1], sigma), scores=scores)
    return {"oks_ap": ap, "mean_error_px": float(np.linalg.norm(pred - gt, axis=-1).mean())}


# ---------------------------------------------------------------------------------------------- worker loop
class KeypointWorkerTask(WorkerTask):
    """Hooks of the shared worker loop for the keypoint model: heatmap loss, decaying Adam, OKS-AP."""

    def build_model(self) -> nn.Module:
        return build(self.cfg)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        lr = learning_rate(self.cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return {"lr": lr}

    def train_batches(self, epoch: int, batch_size: int) -> Any:
        import ray.train

        cfg = self.cfg
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=batch_size, collate_fn=KeypointBatch(cfg, True, epoch), device="cpu",
            local_shuffle_buffer_size=64, local_shuffle_seed=cfg.seed + epoch,
        )
        for i, b in enumerate(batches):
            if cfg.steps_per_epoch and i >= cfg.steps_per_epoch:
                break
            yield b

    def train_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        with autocast(self.setup):
            heat = model(batch["x"].to(self.setup.device))
        return heatmap_loss(heat, batch["target"].to(self.setup.device), self.cfg.heatmap_kind), int(batch["x"].shape[0])

    def validate(self, model: nn.Module) -> dict[str, float]:
        return _validate(self.cfg, model)


def train_loop_keypoints(loop_config: dict) -> None:
    """Ray Train worker loop of the keypoint model (the shared skeleton, `raypipe.train.loop`)."""
    run_worker_loop(KeypointWorkerTask(KeypointTrainConfig.model_validate(loop_config["config"]), loop_config))


@torch.no_grad()
def _validate(cfg: KeypointTrainConfig, model: nn.Module) -> dict[str, float]:
    """Heatmap loss, OKS-AP and mean error over every validation radiograph (rank 0)."""
    import ray.train

    model.eval()
    preds, gts, scores = [], [], []
    total, count = 0.0, 0
    for b in ray.train.get_dataset_shard("val").iter_torch_batches(
        batch_size=cfg.eval_batch_size, collate_fn=KeypointBatch(cfg, False, 0), device="cpu"
    ):
        heat = unwrap(model)(b["x"]).float()
        total += float(heatmap_loss(heat, b["target"], cfg.heatmap_kind)) * len(heat)
        count += len(heat)
        p, s = predict_batch(model, b)
        preds.append(p)
        scores.append(s)
        gts.append(b["gt"].numpy())
    if not preds:
        return {"val_loss": float("nan"), "val_oks_ap": float("nan")}
    m = keypoint_metrics(np.concatenate(preds), np.concatenate(gts), np.concatenate(scores), cfg.oks_sigma)
    return {"val_loss": total / count, "val_oks_ap": m["oks_ap"], "val_mean_error_px": m["mean_error_px"]}


# ---------------------------------------------------------------------------------------------- driver
def keypoint_rows(manifest: str) -> pd.DataFrame:
    """XR rows of a manifest (a file, or a folder holding manifest.csv) that have keypoints, with absolute paths."""
    from raypipe.data.xray_pipeline import read_xray_manifest

    if not str(manifest).endswith((".csv", ".parquet")):
        manifest = os.path.join(manifest, "manifest.csv")
    table = read_xray_manifest(manifest)
    if "keypoints_path" not in table.columns:
        raise ValueError(f"manifest {manifest} has no keypoints_path column")
    rows = table[table["keypoints_path"].notna() & (table["keypoints_path"].astype(str) != "")].copy()
    if rows.empty:
        raise ValueError(f"manifest {manifest} has no XR rows with keypoints")
    rows["study_id"] = rows["study_id"].astype(str)
    return rows.reset_index(drop=True)


def fit_keypoints(config: KeypointTrainConfig, manifest: str, out_dir: str, callbacks: Sequence[Any] = ()) -> Any:
    """Train the keypoint model on a manifest's radiographs; write the run folder. Returns the Ray Result."""
    import ray
    from raypipe import storage
    from raypipe.data.splits import split_by_patient
    from raypipe.train.common import make_trainer

    cfg = config
    out = str(out_dir) if storage.is_uri(out_dir) else os.path.abspath(out_dir)
    storage.makedirs(out)
    storage_path = cfg.storage_path or storage.join(out, "ray_results")
    rows = keypoint_rows(manifest)
    role = split_by_patient(rows, "event", cfg.seed, cfg.val_fraction)
    cols = ["patient_id", "study_id", "image_path", "keypoints_path"]
    train = rows.loc[(role == "train").to_numpy(), cols]
    val = rows.loc[(role == "val").to_numpy(), cols]
    log.info("keypoints: %d train, %d val, %d other radiographs", len(train), len(val), int((~role.isin(["train", "val"])).sum()))
    run_dir = storage.join(storage_path, cfg.run_name)
    trainer = make_trainer(
        train_loop_keypoints, {"config": cfg.model_dump(mode="json"), "metrics_csv": storage.join(run_dir, "metrics.csv")},
        {"train": ray.data.from_pandas(train), "val": ray.data.from_pandas(val)},
        run=cfg, storage_path=storage_path, callbacks=callbacks, score_attribute=CHECKPOINT_SCORE,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    _write_outputs(cfg, result, rows.assign(split=role.to_numpy()), out)
    return result


def _write_outputs(cfg: KeypointTrainConfig, result: Any, rows: pd.DataFrame, out: str) -> None:
    """Best checkpoint -> model.pt, model_meta.json, keypoint_predictions.parquet, metrics.json/csv, config.yaml."""
    from raypipe import storage
    from raypipe.artifact import RunArtifact
    from raypipe.config import config_hash
    from raypipe.metrics import bootstrap_ci
    from raypipe.models.keypoints import KEYPOINT_NAMES
    from raypipe.train.outputs import best_and_latest, selection_fields, write_run_files

    payload, latest = best_and_latest(result)
    model = build(cfg)
    model.load_state_dict(payload["model"])
    model.eval()
    scored = rows[rows["split"] != "train"].reset_index(drop=True)
    collate = KeypointBatch(cfg, False, 0)
    preds, scores, gts = [], [], []
    for start in range(0, len(scored), cfg.eval_batch_size):
        part = scored.iloc[start:start + cfg.eval_batch_size]
        b = collate({k: part[k].to_numpy() for k in ("image_path", "keypoints_path", "study_id")})
        p, s = predict_batch(model, b)
        preds.append(p)
        scores.append(s)
        gts.append(b["gt"].numpy())
    pred, score, gt = np.concatenate(preds), np.concatenate(scores), np.concatenate(gts)
    frame = scored[["patient_id", "study_id", "split"]].copy()
    for j, level in enumerate(KEYPOINT_NAMES):
        frame[f"{level}_x"], frame[f"{level}_y"] = pred[:, j, 0], pred[:, j, 1]
        frame[f"{level}_x_true"], frame[f"{level}_y_true"] = gt[:, j, 0], gt[:, j, 1]
    frame["confidence"] = score
    frame["error_px"] = np.linalg.norm(pred - gt, axis=-1).mean(axis=1)

    held = "test" if (frame["split"] == "test").any() else "val"
    sel = (frame["split"] == held).to_numpy()
    entries: dict[str, Any] = {}
    for key in ("oks_ap", "mean_error_px"):
        def stat(idx: np.ndarray, key: str = key) -> float:
            return keypoint_metrics(pred[sel][idx], gt[sel][idx], score[sel][idx], cfg.oks_sigma)[key]
        idx = np.arange(int(sel.sum()))
        entries[key] = bootstrap_ci(stat, (idx,), np.zeros(len(idx)), n_boot=min(cfg.n_boot, 200),
                                    seed=cfg.seed).to_dict()
    metrics = {"models": {cfg.name: entries}, "comparisons": [], "split": held}

    artifact = RunArtifact(
        builder=cfg.model, kwargs=model_kwargs(cfg), task="xray_keypoints", train_task="keypoints",
        display_name=cfg.name, preprocess={"input_size": cfg.input_size, "intensity": "min-max, zero padded square"},
        labels=list(KEYPOINT_NAMES), config_hash=config_hash(cfg), **selection_fields(cfg, payload, latest),
        input_size=cfg.input_size, stride=STRIDE, keypoints=list(KEYPOINT_NAMES), oks_sigma=cfg.oks_sigma,
    )
    write_run_files(out, cfg, payload["model"], latest["state"]["history"], artifact)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    storage.atomic_write_bytes(storage.join(out, "keypoint_predictions.parquet"), buf.getvalue())
    storage.atomic_write_json(storage.join(out, "metrics.json"), metrics)
    log.info("wrote %s: %s OKS-AP %.3f, mean error %.2f px", out, held, entries["oks_ap"]["value"],
             entries["mean_error_px"]["value"])


__all__: Sequence[str] = ("KeypointBatch", "fit_keypoints", "spine_area", "train_loop_keypoints")
