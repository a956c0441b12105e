"""Trainer plumbing every Ray Train loop in raypipe shares: device/AMP, seeding, checkpoints, early stopping.

A training loop (one per task, e.g. `raypipe.train.ct`) runs inside each Ray Train worker and uses:

- `DeviceSetup` / `autocast`: bf16 autocast + channels_last on CUDA, plain fp32 on CPU (channels_last where the
  task's model is faster with it);
- `seed_everything`: Python, NumPy and torch RNGs from one seed (plus the rank when asked);
- `TrainState`: epoch, best monitored value, patience counter and the per-epoch history, saved with the
  model and optimizer in every checkpoint so a resumed run continues the same early-stopping schedule
  and still knows the metrics of every earlier epoch;
- `save_checkpoint` / `load_checkpoint`: one `state.pt` (torch.save of plain state_dicts, loaded with
  `weights_only=True`) inside a `ray.train.Checkpoint` directory; `resume` reads `ray.train.get_checkpoint()`;
- `report_epoch`: rank 0 writes the checkpoint and the metrics CSV, every rank calls `ray.train.report`
  (the report is a barrier, so every rank must call it the same number of times);
- `make_trainer`: a `TorchTrainer` sized by `raypipe.ray_utils.worker_resources` (fractional CPUs on small
  machines, so Ray Data keeps CPUs to stream with).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import time
import math
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


# ---------------------------------------------------------------------------------------------- device
@dataclass(frozen=True)
class DeviceSetup:
    """Where a worker computes and in which precision: bf16 autocast on CUDA; channels_last on CUDA (and on CPU for
    models whose task asks for it)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool


def select_device(amp: bool = True, device: torch.device | None = None, cpu_channels_last: bool = False) -> DeviceSetup:
    """The worker's device (Ray's when inside a Train worker) with bf16/channels_last on CUDA, fp32 on CPU
    (channels_last there too with `cpu_channels_last`: faster for depthwise-conv nets, slower for plain ResNets)."""
    if device is None:
        device = _ray_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    return DeviceSetup(device=device, amp_dtype=torch.bfloat16 if (amp and on_cuda) else None,
                       channels_last=on_cuda or cpu_channels_last)


def _ray_device() -> torch.device | None:
    """Ray Train's device for this worker, or None outside a Train worker."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None  # not inside a Ray Train worker
    import ray.train.torch

    return ray.train.torch.get_device()


def autocast(setup: DeviceSetup) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass (a no-op in fp32)."""
    if setup.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=setup.device.type, dtype=setup.amp_dtype)


def to_device_model(model: nn.Module, setup: DeviceSetup) -> nn.Module:
    """Move a model to its device, in channels_last memory format where that is faster (CUDA; CPU when asked)."""
    model = model.to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is repeatable given its seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def freeze_batchnorm(model: nn.Module) -> int:
    """Put BatchNorm layers in eval mode (running statistics) after `model.train()`; returns how many.

    With tiny per-worker batches, batch statistics are noisy and differ between 1 and N workers; frozen
    statistics make N-worker DDP compute exactly what one worker with the same global batch computes.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP/FSDP wrapper (its state_dict has no `module.` prefix)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# ---------------------------------------------------------------------------------------------- distributed
def world_rank() -> int:
    """This worker's rank in the torch process group (0 when no group is initialised, e.g. on the driver)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks in the torch process group (1 when no group is initialised)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def per_worker_batch(global_batch: int, n_workers: int) -> int:
    """Per-worker batch so that the global batch is what the config says (at least 1)."""
    if global_batch % n_workers:
        log.warning("global batch %d is not divisible by %d workers; using %d per worker",
                    global_batch, n_workers, global_batch // n_workers)
    return max(1, global_batch // n_workers)


def collective_device(device: torch.device | None = None) -> torch.device:
    """Where collectives run: the worker's training device (NCCL reduces only CUDA tensors; gloo CPU ones)."""
    return device if device is not None else select_device(False).device


def check_collective_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Refuse a collective on a tensor that is not on the training device (it would fail on NCCL)."""
    if t.device.type != torch.device(device).type:
        raise ValueError(f"collective on a {t.device.type} tensor while training on {torch.device(device).type}: "
                         "move it to the training device first (NCCL cannot reduce CPU tensors)")
    return t


def all_reduce_mean(value: float, weight: float = 1.0, device: torch.device | None = None) -> float:
    """Weighted mean of a scalar over all workers (identity with one process); reduced on the training device."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    dev = collective_device(device)
    t = check_collective_tensor(torch.tensor([value * weight, weight], dtype=torch.float64, device=dev), dev)
    dist.all_reduce(t)
    t = t.cpu()
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def broadcast_from_rank0(obj: Any, device: torch.device | None = None) -> Any:
    """Rank 0's object on every rank (e.g. validation metrics, so early stopping agrees); identity alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, device=collective_device(device))
    return holder[0]


def share_of(n: int, rank: int | None = None, world: int | None = None) -> np.ndarray:
    """Positions 0..n-1 this rank handles when rows are dealt round-robin (rank, rank + world, ...)."""
    rank = world_rank() if rank is None else rank
    world = world_size() if world is None else world
    return np.arange(rank, n, world, dtype=np.int64)


def gather_shares(local: torch.Tensor, n: int, device: torch.device | None = None) -> torch.Tensor:
    """All ranks' rows of a round-robin deal (`share_of`) back in their original order 0..n-1, on every rank.

    `local` (rows of this rank's share, ...) must be on the training device; the result is on the CPU.
    Identity with one process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if local.shape[0] != n:
            raise ValueError(f"a single rank holds {local.shape[0]} rows, expected {n}")
        return local.cpu()
    dev = collective_device(device)
    world = dist.get_world_size()
    longest = -(-n // world)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = check_collective_tensor(local, dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        pos = share_of(n, r, world)
        out[torch.from_numpy(pos)] = part[: len(pos)].cpu()
    return out


# ---------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Training progress saved with every checkpoint: last finished epoch, early stopping, history."""

    epoch: int = 0  # epochs finished (1-based count); the next epoch to run is epoch + 1
    best_value: float | None = None
    best_epoch: int = 0
    epochs_since_best: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, value: float, mode: str = "max", min_delta: float = 0.0) -> bool:
        """Record this epoch's monitored value; True when it improves on the best so far."""
        finite = value is not None and math.isfinite(value)
        if finite and (
            self.best_value is None
            or (mode == "max" and value > self.best_value + min_delta)
            or (mode == "min" and value < self.best_value - min_delta)
        ):
            self.best_value, self.best_epoch, self.epochs_since_best = float(value), self.epoch, 0
            return True
        self.epochs_since_best += 1
        return False

    def should_stop(self, patience: int) -> bool:
        """Early stopping: no improvement for `patience` epochs."""
        return self.epochs_since_best >= patience


def checkpoint_payload(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainState) -> dict:
    """Plain containers and tensors only, so the file loads with `torch.load(weights_only=True)`."""
    return {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "state": asdict(state),
    }


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainState) -> str:
    """Write `state.pt` (model + optimizer + training state) into `directory`; returns the file path."""
    path = os.path.join(os.fspath(directory), CHECKPOINT_FILE)
    torch.save(checkpoint_payload(model, optimizer, state), path)
    return path


def read_checkpoint(checkpoint: Any) -> dict:
    """Load the payload of a `ray.train.Checkpoint` (or a local directory) on CPU, weights_only."""
    if isinstance(checkpoint, (str, os.PathLike)) and not hasattr(checkpoint, "as_directory"):
        return torch.load(os.path.join(os.fspath(checkpoint), CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def load_checkpoint(checkpoint: Any, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainState:
    """Restore model (and optimizer) from a checkpoint and return its training state."""
    payload = read_checkpoint(checkpoint)
    unwrap(model).load_state_dict(payload["model"])
    if optimizer is not None and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])
    return TrainState(**payload["state"])


def resume(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainState:
    """Continue from `ray.train.get_checkpoint()` when Ray restores a run (retry or same name), else start fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    state = load_checkpoint(checkpoint, model, optimizer)
    log.info("resuming after epoch %d (best %s at epoch %d)", state.epoch, state.best_value, state.best_epoch)
    return state


# ---------------------------------------------------------------------------------------------- reporting
def metrics_csv_text(history: Sequence[Mapping[str, Any]]) -> str:
    """Per-epoch metrics as CSV text (union of keys, `epoch` first)."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    keys.sort(key=lambda k: k != "epoch")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def write_metrics_csv(path: str, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite the per-epoch metrics CSV atomically (readers never see half a file)."""
    from raypipe.storage import atomic_write_text

    atomic_write_text(path, metrics_csv_text(history))


def report_epoch(
    metrics: Mapping[str, float],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: TrainState,
    metrics_csv: str | None = None,
    checkpoint: bool = True,
) -> None:
    """Report one finished epoch: rank 0 saves the checkpoint (when `checkpoint`) and the CSV, every rank
    calls `ray.train.report` (a barrier: every rank must call it the same number of times)."""
    import ray.train

    rank = world_rank()
    clean = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in metrics.items()}
    if rank != 0:
        ray.train.report(clean, checkpoint=None)
        return
    if metrics_csv:
        write_metrics_csv(metrics_csv, state.history)
    if not checkpoint:
        ray.train.report(clean, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, optimizer, state)
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_epoch_{state.epoch:04d}")


def score_for_ranking(value: float, mode: str) -> float:
    """A finite number Ray can rank checkpoints by (undefined metrics rank last)."""
    if value is None or not math.isfinite(value):
        return -1e30 if mode == "max" else 1e30
    return float(value)


# ---------------------------------------------------------------------------------------------- trainer
# Ray Train's controller takes a worker's report every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s) and a
# worker's result queue holds one, so `ray.train.report` blocks until that poll: an epoch could not end in less
# than 2 s (a tiny DeepSurv epoch is 0.3 s of compute: a 3-fold, 40-epoch CV took 437 s, of which ~240 s waiting).
# A poll is one small actor call per worker; hanging polls are tolerated for 10 minutes, so a short interval is safe.
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = 0.1
PLACEMENT_DIR = "worker_placement"  # under the run folder: one JSON per worker start (rank, node id, pid)
WORKER_RESOURCES_ENV = "RAYPIPE_WORKER_RESOURCES"  # JSON mapping merged over the derived per-worker resources
PLACEMENT_STRATEGY_ENV = "RAYPIPE_PLACEMENT_STRATEGY"  # PACK (default) | SPREAD | STRICT_PACK | STRICT_SPREAD


def record_placement(directory: str) -> dict[str, Any]:
    """Write this worker's rank and Ray node id into `directory` (which node ran which rank, per attempt)."""
    import ray

    from raypipe.storage import atomic_write_json, join

    info = {"rank": world_rank(), "world_size": world_size(), "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(), "time": time.time()}
    try:
        atomic_write_json(join(directory, f"rank{info['rank']:03d}-{time.time_ns()}-{os.getpid()}.json"), info)
    except Exception as exc:  # placement is diagnostics: it must never fail a training run
        log.warning("could not record worker placement in %s: %s", directory, exc)
    return info


def read_placement(directory: str) -> list[dict[str, Any]]:
    """Every recorded worker start of a run (see `record_placement`), oldest first; [] when none."""
    import pyarrow.fs as pafs

    from raypipe import storage

    if not storage.exists(directory):
        return []
    fs, p = storage.filesystem(directory)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(p)) if i.base_name.endswith(".json")]
    rows = [json.loads(storage.read_bytes(storage.join(directory, i.base_name))) for i in infos]
    return sorted(rows, key=lambda r: (r["time"], r["rank"]))


def _with_placement_log(train_loop: Callable[[dict], None], directory: str) -> Callable[[dict], None]:
    """The train loop, first recording where this worker runs (multi-node placement and failover checks)."""

    @functools.wraps(train_loop)
    def loop(config: dict) -> None:
        record_placement(directory)
        return train_loop(config)

    return loop


def scaling_config(run: Any) -> Any:
    """The Ray Train `ScalingConfig` of a run config: workers, CPUs, the GPUs it asks for, placement; logs the devices.

    GPUs come from `run.use_gpu` / `run.gpus_per_worker` only: the request stands even when the cluster has
    no GPU yet (an autoscaler then adds GPU nodes); nothing falls back to CPU.
    """
    from ray.train import ScalingConfig

    from raypipe.ray_utils import describe_devices, worker_resources

    res = worker_resources(run.num_workers, use_gpu=run.use_gpu, gpus_per_worker=run.gpus_per_worker)
    resources = res.as_ray()
    resources.update(json.loads(os.environ.get(WORKER_RESOURCES_ENV) or "{}"))
    resources.update(run.resources_per_worker or {})
    if not run.use_gpu and resources.get("GPU"):
        raise ValueError(f"resources_per_worker asks for {resources['GPU']:g} GPU but use_gpu is false: set use_gpu: "
                         "true (or --gpus N) to train on GPUs")
    strategy = run.placement_strategy or os.environ.get(PLACEMENT_STRATEGY_ENV) or "PACK"
    log.info("%s (Ray Train: %s per worker, placement %s)",
             describe_devices(run.num_workers, run.use_gpu, resources.get("GPU", 0.0)), resources, strategy)
    return ScalingConfig(num_workers=run.num_workers, use_gpu=bool(run.use_gpu), resources_per_worker=resources,
                         placement_strategy=strategy)


def make_trainer(
    train_loop: Callable[[dict], None],
    config: Mapping[str, Any],
    datasets: Mapping[str, Any],
    run: Any,
    storage_path: str,
    callbacks: Sequence[Any] = (),
    score_attribute: str | None = None,
    score_order: str = "max",
    split_datasets: Sequence[str] = ("train",),
) -> Any:
    """A TorchTrainer sized and placed by the run config (`raypipe.train.config.RayRunConfig`).

    `run` gives workers, GPUs, failure retries, checkpoints kept, the run name, placement strategy and
    extra per-worker resources; `callbacks` (e.g. Tune's report callback) is the one way callers add
    Ray Train callbacks. Rerunning with the same `storage_path` and run name resumes from that run's
    latest checkpoint. Datasets named in `split_datasets` are streamed and split over the workers; the
    others (validation) are materialised once here instead of being re-read every epoch.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raypipe.storage import join

    # Ray Train's controller runs in this process's runtime env and inherits the variable (Ray propagates it).
    os.environ.setdefault(REPORT_POLL_ENV, str(REPORT_POLL_S))
    scaling = scaling_config(run)
    return TorchTrainer(
        _with_placement_log(train_loop, join(storage_path, run.run_name, PLACEMENT_DIR)),
        train_loop_config=dict(config),
        scaling_config=scaling,
        run_config=RunConfig(
            storage_path=storage_path,
            name=run.run_name,
            callbacks=list(callbacks) or None,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=run.num_to_keep,
                checkpoint_score_attribute=score_attribute,
                checkpoint_score_order=score_order,
            ),
        ),
        datasets={k: ds if k in split_datasets else ds.materialize() for k, ds in datasets.items()},
        dataset_config=DataConfig(datasets_to_split=list(split_datasets)),
    )


def best_checkpoint(result: Any, attribute: str | None, mode: str = "max") -> Any:
    """The best reported checkpoint by `attribute` (the latest when None or nothing ranks)."""
    if attribute and result.best_checkpoints:
        ranked = [(c, m) for c, m in result.best_checkpoints if m and attribute in m]
        if ranked:
            pick = max if mode == "max" else min
            return pick(ranked, key=lambda cm: cm[1][attribute])[0]
    return result.checkpoint
