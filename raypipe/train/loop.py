"""The one worker-loop skeleton every Ray Train task runs, with per-task hooks.

`run_worker_loop(task)` is what each Ray Train worker executes: set threads and seeds, build the model
(identical initial weights on every rank), the optimiser, resume from Ray's checkpoint, wrap in DDP, then
per epoch: re-seed, `begin_epoch`, stream the worker's shard through `train_step` (backward, clipping and
the optimiser step happen here), average the loss over workers, `end_epoch`, validate (split over every
rank and gathered when the task sets `distributed_validation`; otherwise on rank 0, shared with every
rank, so early stopping agrees), update the early-stopping state, log one line and report (checkpoint +
metrics) through `raypipe.train.common.report_epoch`. The loss is summed on the device (no per-step sync).

Each epoch row carries its time breakdown (`EpochTimer`): `time_step_s` (forward + backward + optimiser
steps; CUDA events on a GPU, read once per epoch), `time_data_s` (waiting for batches), `time_val_s`,
`time_epoch_s` (start of the epoch to its report) and `epoch_started` (Unix time; the difference of two
consecutive starts is an epoch's full wall time, checkpoint included).

A task subclasses `WorkerTask` and fills in `build_model`, `train_batches`, `train_step` and `validate`
(the way Ray's training templates factor `train_epoch` / `eval_epoch`); the other hooks have defaults.
The config a task receives must carry the shared loop fields (`seed`, `epochs`, `patience`, `monitor`,
`monitor_mode`, `min_delta`, `lr`, `weight_decay`, `optimizer`, `grad_clip`, `amp`, `torch_threads`,
`freeze_batchnorm`, `stop_after_epoch`); tasks without early stopping set `monitor` to None.

Backward, clipping and the step go through the hooks `prepare`, `step_context`, `backward`,
`sync_gradients` and `clip_gradients`, so a task may run them through Hugging Face Accelerate (the LDM
does): the optimiser steps, and gradients are cleared, only when `sync_gradients` says an accumulation
window is complete; `optimizer_steps` per epoch counts those steps, `steps` the micro-batches.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from raypipe.train.common import (
    DeviceSetup,
    TrainState,
    all_reduce_mean,
    broadcast_from_rank0,
    freeze_batchnorm,
    per_worker_batch,
    report_epoch,
    resume,
    score_for_ranking,
    seed_everything,
    select_device,
    to_device_model,
    world_rank,
    world_size,
)

log = logging.getLogger(__name__)

CHECKPOINT_SCORE = "checkpoint_score"  # finite copy of the monitored metric that Ray ranks checkpoints by


class WorkerTask:
    """Per-task hooks of the shared worker loop (see module doc). One instance per worker."""

    #: kwargs for `ray.train.torch.prepare_model` (e.g. find_unused_parameters)
    prepare_kwargs: Mapping[str, Any] = {}
    #: True: every rank calls `validate` on its share of the validation rows and gets the gathered metrics
    distributed_validation: bool = False
    #: True: channels_last memory format on CPU too (faster for depthwise-conv nets such as EfficientNet)
    cpu_channels_last: bool = False

    def __init__(self, cfg: Any, loop_config: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.loop_config = loop_config
        self.setup: DeviceSetup | None = None
        self.rank, self.world = world_rank(), world_size()

    # -- required hooks
    def build_model(self) -> nn.Module:
        """The task's model (same seed on every rank, so DDP starts from identical weights)."""
        raise NotImplementedError

    def train_batches(self, epoch: int, batch_size: int) -> Iterable[Any]:
        """This worker's training batches for one epoch."""
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int] | None:
        """Loss of one batch (graph attached) and its sample count; None skips the batch on this rank."""
        raise NotImplementedError

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (rank 0 only, shared by the loop; on every rank with `distributed_validation`)."""
        raise NotImplementedError

    # -- optional hooks
    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """Adam/AdamW over every parameter with the config's lr and weight decay."""
        cfg = self.cfg
        opt_cls = torch.optim.AdamW if getattr(cfg, "optimizer", "adam") == "adamw" else torch.optim.Adam
        return opt_cls(model.parameters(), lr=cfg.lr, weight_decay=getattr(cfg, "weight_decay", 0.0))

    def init_model(self, model: nn.Module) -> None:
        """Task-specific initialisation before a resume may overwrite it (e.g. an output bias)."""

    def resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """Model (and optimiser) from Ray's checkpoint when the run resumes, else a fresh state."""
        return resume(model, optimizer)

    def trainable(self, model: nn.Module) -> nn.Module:
        """The module DDP wraps and `train_step` calls (default: the model; e.g. a loss wrapper)."""
        return model

    def optimizer_for_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                            state: TrainState) -> torch.optim.Optimizer:
        """The optimiser of this epoch (default: the same one; a staged task may switch)."""
        return optimizer

    def clip_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The parameters whose gradient norm `grad_clip` bounds."""
        return model.parameters()

    def prepare(self, module: nn.Module) -> nn.Module:
        """Wrap the trainable module for data-parallel training (default: Ray's `prepare_model`, i.e. DDP)."""
        import ray.train.torch

        return ray.train.torch.prepare_model(module, move_to_device=False,
                                            parallel_strategy_kwargs=dict(self.prepare_kwargs) or None)

    def step_context(self, net: nn.Module) -> AbstractContextManager:
        """Context around one micro-batch's forward and backward (e.g. Accelerate's `accumulate`)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass of one micro-batch's loss."""
        loss.backward()

    def sync_gradients(self) -> bool:
        """Whether this micro-batch ends an accumulation window, so the optimiser steps (default: every batch)."""
        return True

    def clip_gradients(self, model: nn.Module) -> None:
        """Bound the gradient norm by the config's `grad_clip` (when set) before the optimiser step."""
        if getattr(self.cfg, "grad_clip", None):
            nn.utils.clip_grad_norm_(list(self.clip_parameters(model)), self.cfg.grad_clip)

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (e.g. an EMA update)."""

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        """Called after `model.train()`; returns extra per-epoch columns (e.g. the learning rate)."""
        return {}

    def end_epoch(self, model: nn.Module, epoch: int, batch_size: int) -> None:
        """Called after the training pass, before validation (e.g. BatchNorm recalibration)."""

    def extra_state(self) -> dict[str, Any]:
        """Saved in every checkpoint's `TrainState.extra` (e.g. the clinical standardisation)."""
        return {}

    def epoch_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Last chance to add or rename per-epoch columns before logging and reporting."""
        return row


def worker_logging() -> None:
    """INFO lines of raypipe's loggers on this worker's stdout (Ray forwards them to the driver and job logs)."""
    import sys

    logger = logging.getLogger("raypipe")
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


class EpochTimer:
    """Time breakdown of one epoch: steps (CUDA events on a GPU, no per-step sync), waiting for data, validation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.started_unix, self.started = time.time(), time.perf_counter()
        self.step_s, self.data_s, self.val_s = 0.0, 0.0, 0.0
        self.events: list[tuple[Any, Any]] = []
        self.t0 = 0.0

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The batches, timing how long the loop waits for each one."""
        it = iter(batches)
        while True:
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                self.data_s += time.perf_counter() - t
                return
            self.data_s += time.perf_counter() - t
            yield b

    def step_started(self) -> None:
        """Mark the start of a training step."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((ev, None))
        else:
            self.t0 = time.perf_counter()

    def step_ended(self) -> None:
        """Mark the end of the current training step."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events[-1] = (self.events[-1][0], ev)
        else:
            self.step_s += time.perf_counter() - self.t0

    def row(self) -> dict[str, float]:
        """The epoch's timing columns (synchronises CUDA once to read the step events)."""
        if self.cuda and self.events:
            torch.cuda.synchronize()
            self.step_s = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return {"time_step_s": self.step_s, "time_data_s": self.data_s, "time_val_s": self.val_s,
                "time_epoch_s": time.perf_counter() - self.started, "epoch_started": self.started_unix}


def run_worker_loop(task: WorkerTask) -> TrainState:
    """Run the task's epochs in this Ray Train worker (see module doc); returns the final state."""
    worker_logging()
    cfg = task.cfg
    if getattr(cfg, "torch_threads", None):
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    setup = select_device(getattr(cfg, "amp", True), cpu_channels_last=task.cpu_channels_last)
    task.setup = setup
    model = task.build_model()
    if getattr(cfg, "sync_batchnorm", False) and setup.device.type == "cuda" and task.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device_model(model, setup)
    optimizer = task.make_optimizer(model)
    task.init_model(model)
    state = task.resume_state(model, optimizer)
    net = task.prepare(task.trainable(model))
    batch = per_worker_batch(cfg.batch_size, task.world)
    monitor = getattr(cfg, "monitor", None)
    mode = getattr(cfg, "monitor_mode", "max")
    patience = getattr(cfg, "patience", None)
    if patience is not None and state.should_stop(patience):
        log.info("early stopping had already ended this run at epoch %d", state.epoch)
    model.zero_grad(set_to_none=True)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if patience is not None and state.should_stop(patience):
            break
        optimizer = task.optimizer_for_epoch(model, optimizer, epoch, state)
        seed_everything(cfg.seed * 100_003 + epoch * 1_009 + task.rank)
        net.train()
        if getattr(cfg, "freeze_batchnorm", False):
            freeze_batchnorm(net)
        timer = EpochTimer(setup.device)
        extra = task.begin_epoch(net, optimizer, epoch)
        total = torch.zeros((), dtype=torch.float64, device=setup.device)  # summed on the device: no per-step sync
        count, steps, updates = 0, 0, 0
        for b in timer.batches(task.train_batches(epoch, batch)):
            timer.step_started()
            with task.step_context(net):
                step = task.train_step(net, b)
                if step is None:
                    timer.step_ended()
                    continue
                loss, n = step
                task.backward(loss)
                if task.sync_gradients():  # gradients of the window are complete: clip, step, clear
                    task.clip_gradients(model)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    task.after_step(model)
                    updates += 1
            total += loss.detach().double() * n
            count, steps = count + n, steps + 1
            timer.step_ended()
        train_loss = all_reduce_mean(float(total) / max(count, 1), float(count), setup.device)
        task.end_epoch(net, epoch, batch)
        val_start = time.perf_counter()
        if task.distributed_validation:
            metrics = task.validate(net)
        else:
            metrics = broadcast_from_rank0(task.validate(net) if task.rank == 0 else None, setup.device)
        timer.val_s = time.perf_counter() - val_start
        state.epoch = epoch
        row: dict[str, Any] = {"epoch": epoch, **extra, "train_loss": train_loss,
                               "train_samples": all_reduce_mean(float(count), 1.0, setup.device) * task.world,
                               "steps": steps, "optimizer_steps": updates, **metrics, **timer.row()}
        if monitor:
            improved = state.update(metrics.get(monitor, float("nan")), mode, getattr(cfg, "min_delta", 0.0))
            row.update(best_epoch=state.best_epoch, improved=int(improved))
        row = task.epoch_row(row)
        state.history.append(row)
        state.extra = {**state.extra, **task.extra_state()}
        if task.rank == 0:
            log.info("epoch %d/%d: %s", epoch, cfg.epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "epoch_started"))
        report = dict(row)
        if monitor:
            score = score_for_ranking(metrics.get(monitor), mode)
            report[CHECKPOINT_SCORE] = score if mode == "max" else -score
        stop_now = getattr(cfg, "stop_after_epoch", None) is not None and epoch >= cfg.stop_after_epoch
        last = (epoch == cfg.epochs or stop_now or (patience is not None and state.should_stop(patience)))
        every = int(getattr(cfg, "checkpoint_every", 1) or 1)
        save = last or epoch % every == 0 or (monitor and row.get("improved") == 1) or not monitor
        # the checkpoint holds the model itself (not a loss wrapper around it)
        report_epoch(report, model, optimizer, state, task.loop_config.get("metrics_csv"), checkpoint=bool(save))
        if stop_now:
            log.info("stop_after_epoch %d reached: ending this run (rerun to resume)", epoch)
            break
    return state
