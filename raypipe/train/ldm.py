"""`raypipe train ldm`: the Diff-X VAE, then the structure and prompt LDMs (papers/004), on Ray Train.

Reads top to bottom:

1. `LDMTrainConfig`: defaults visible at the top (thesis: 512 x 512 radiographs, SD v1 structure).
2. Losses as plain functions (`vae_loss`, `diffusion_loss`): VAE = L1 reconstruction + a small KL
   (SD also uses LPIPS and a patch GAN; neither is available offline for grey radiographs, so they are
   left out); LDMs = DDPM noise-prediction MSE with SD's noise schedule, both UNets on the same noisy
   latent and prompt, the structure UNet also seeing the low-resolution image.
3. `train_epoch`: one pass over batches for one stage, for `train_local` (tests, notebooks, no Ray).
4. `LDMWorkerTask` / `train_loop_ldm` (every Ray Train worker, on the shared skeleton
   `raypipe.train.loop`): epochs 1..vae_epochs train the VAE, the rest the two
   UNets (+ the small text encoder unless a pretrained CLIP is configured, which stays frozen). The
   steps run through Hugging Face Accelerate inside the Ray Train worker, as diffusers'
   train_text_to_image.py does: `Accelerator(mixed_precision, gradient_accumulation_steps)` reuses Ray's
   process group and wraps the stage's `Objective` in DDP; `accelerator.accumulate` / `backward` /
   `clip_grad_norm_`, the optimiser steps once per accumulation window; EMA of the LDM weights
   (diffusers' `EMAModel`, saved in the checkpoint) after every real step; one checkpoint per epoch and
   resume via `raypipe.train.common`. With `pretrained_sd` the model starts from a local Stable Diffusion
   directory (`raypipe.models.ldm.stable_diffusion`) and keeps SD's latent scaling factor; otherwise the
   factor (1 / SD of the training latents) is measured once after the VAE stage.
5. `fit_ldm` on the driver: manifest -> Ray Data (radiographs read and resized on the fly) -> train ->
   model.pt (flat state_dict: vae., structure_unet., prompt_unet., text_encoder.; EMA weights),
   model_meta.json (builder + kwargs + sampler settings), config.yaml, metrics.csv, metrics.json.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from raypipe import storage
from raypipe.train.common import (
    TrainState,
    all_reduce_mean,
    autocast,
    per_worker_batch,
    read_checkpoint,
    seed_everything,
    select_device,
    unwrap,
)
from raypipe.train.config import RayRunConfig
from raypipe.train.loop import WorkerTask, run_worker_loop

log = logging.getLogger(__name__)

Stage = Literal["vae", "unet"]


class LDMTrainConfig(RayRunConfig):
    """One Diff-X training run; defaults follow the thesis (SD v1 structure at 512 x 512)."""

    model: str = Field("diffx", description="registry name: diffx (SD v1 sizes) or diffx_tiny")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="builder overrides (sizes, text path)")
    pretrained_sd: str = Field(
        ..., description="a local diffusers-format Stable Diffusion directory to fine-tune (the thesis's setting; "
                         "docs/WEIGHTS.md), or 'none' for random initialisation, stated explicitly")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimiser step (Accelerate)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="Accelerate's mixed precision; auto: bf16 on CUDA when amp, else no")
    display_name: str = "diffx"
    clinical_prompts: bool = Field(True, description="add the thesis's clinical attributes to training prompts")
    cond_drop_prob: float = Field(0.1, ge=0, lt=1, description="prompt dropout (empty prompt) for guidance")

    vae_epochs: int = Field(20, ge=0)
    vae_lr: float = Field(1e-4, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    unet_epochs: int = Field(100, ge=0)
    unet_lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    batch_size: int = Field(16, ge=1, description="global batch; each worker takes batch_size / num_workers")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke runs)")
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, gt=0, le=1, description="EMA of the LDM weights (warm-up as diffusers')")
    use_ema: bool = True
    latent_scale_batches: int = Field(8, ge=1, description="batches used to measure the latent SD")

    label: str = Field("prevalent_fracture", description="stratifies the patient-level validation split")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)

    sampler: dict[str, Any] = Field(
        default_factory=lambda: {"steps": 50, "eta": 0.5, "guidance_scale": 1.0, "injection_layer": 5},
        description="raypipe.generate.SamplerSettings saved with the model",
    )

    @model_validator(mode="after")
    def _check_pretrained_sd(self) -> "LDMTrainConfig":
        from raypipe.models.ldm.stable_diffusion import check_sd_directory

        if self.pretrained_sd == "none":
            return self
        if self.model_kwargs.get("text_encoder_path"):
            raise ValueError("pretrained_sd already brings SD's CLIP text encoder; drop model_kwargs.text_encoder_path")
        try:
            check_sd_directory(self.pretrained_sd)
        except ValueError as e:
            raise ValueError(f"pretrained_sd: {e}") from None
        return self

    @property
    def name(self) -> str:
        return self.display_name

    @property
    def sd_directory(self) -> str | None:
        """The Stable Diffusion directory to fine-tune, None for random initialisation."""
        return None if self.pretrained_sd == "none" else self.pretrained_sd

    @property
    def epochs(self) -> int:
        """All epochs of the run: the VAE's, then the LDM's."""
        return self.vae_epochs + self.unet_epochs


# ---------------------------------------------------------------------------------------------- model
def model_kwargs(cfg: LDMTrainConfig) -> dict[str, Any]:
    """Registry builder kwargs of this run (with a Stable Diffusion directory: its architectures)."""
    if cfg.sd_directory is None:
        return dict(cfg.model_kwargs)
    from raypipe.models.ldm.stable_diffusion import diffx_kwargs_from_sd

    return {**diffx_kwargs_from_sd(cfg.sd_directory), **cfg.model_kwargs}


def build(cfg: LDMTrainConfig, load_weights: bool = False) -> Any:
    """The `DiffXModel` of this config; with `load_weights`, Stable Diffusion's weights copied in when configured."""
    from raypipe.models.registry import build_model

    model = build_model(cfg.model, **model_kwargs(cfg))
    if load_weights and cfg.sd_directory is not None:
        from raypipe.models.ldm.stable_diffusion import load_stable_diffusion

        report = load_stable_diffusion(model, cfg.sd_directory)
        log.info("fine-tuning Stable Diffusion from %s (%d tensors; structure UNet +%d zero input channels; "
                 "latent scale %.5f)", report.path, report.tensors, report.structure_extra_channels, report.latent_scale)
    return model


def text_trainable(cfg: LDMTrainConfig) -> bool:
    """The small text encoder trains with the UNets; a pretrained CLIP (own path or SD's) stays frozen."""
    return not (cfg.model_kwargs.get("text_encoder_path") or cfg.sd_directory)


def image_size(cfg: LDMTrainConfig) -> int:
    """Training image side from the builder defaults and overrides."""
    from raypipe.models.registry import default_config

    return int({**default_config(cfg.model), **model_kwargs(cfg)}["image_size"])


def set_trainable(model: Any, text_trainable: bool) -> None:
    """Every part trainable except a pretrained text encoder (frozen, as in Stable Diffusion)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if not text_trainable:
        model.text_encoder.requires_grad_(False)


def stage_parameters(model: Any, stage: Stage) -> list[nn.Parameter]:
    """Parameters the stage's optimizer steps."""
    if stage == "vae":
        return [p for p in model.vae.parameters() if p.requires_grad]
    parts = (model.structure_unet, model.prompt_unet, model.text_encoder)
    return [p for part in parts for p in part.parameters() if p.requires_grad]


def ldm_parameters(model: Any) -> list[nn.Parameter]:
    """Parameters the EMA tracks (UNets + trainable text encoder), in a fixed order."""
    return stage_parameters(model, "unet")


# ---------------------------------------------------------------------------------------------- losses
def vae_loss(model: Any, images: Tensor, kl_weight: float = 1e-6) -> Tensor:
    """L1 reconstruction of a posterior sample + `kl_weight` x KL (mean per element)."""
    dist = model.vae.encode(images).latent_dist
    recon = model.vae.decode(dist.sample()).sample
    return F.l1_loss(recon.float(), images.float()) + kl_weight * dist.kl().mean() / images[0].numel()


def diffusion_loss(
    model: Any,
    images: Tensor,
    prompts: Sequence[str],
    scheduler: Any,
    *,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    cond_drop_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DDPM noise-prediction MSE of the structure and prompt LDMs: (sum, structure, prompt).

    `noise` / `timesteps` fix the draw (evaluation); prompts are replaced by "" with `cond_drop_prob`.
    """
    with torch.no_grad():
        z0 = model.encode(images).float()
        lowres = model.lowres(images)
    b = z0.shape[0]
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(z0.device)
    z_t = scheduler.add_noise(z0, noise.to(z0.device), timesteps)
    texts = list(prompts)
    if cond_drop_prob > 0:
        drop = torch.rand(b, generator=generator) < cond_drop_prob
        texts = ["" if d else t for d, t in zip(drop.tolist(), texts)]
    text = model.encode_text(texts)
    loss_s = F.mse_loss(model.structure_eps(z_t, timesteps, text, lowres).float(), noise.to(z0.device))
    loss_p = F.mse_loss(model.prompt_eps(z_t, timesteps, text).float(), noise.to(z0.device))
    return loss_s + loss_p, loss_s.detach(), loss_p.detach()


class Objective(nn.Module):
    """The trained model behind one forward (so DDP syncs gradients): the stage's loss."""

    def __init__(self, model: Any, scheduler: Any, kl_weight: float, cond_drop_prob: float) -> None:
        super().__init__()
        self.model, self.scheduler = model, scheduler
        self.kl_weight, self.cond_drop_prob = kl_weight, cond_drop_prob

    def forward(self, images: Tensor, prompts: Sequence[str], stage: Stage) -> tuple[Tensor, dict[str, float]]:
        if stage == "vae":
            loss = vae_loss(self.model, images, self.kl_weight)
            return loss, {"vae_loss": float(loss.detach())}
        loss, ls, lp = diffusion_loss(self.model, images, prompts, self.scheduler, cond_drop_prob=self.cond_drop_prob)
        return loss, {"structure_loss": float(ls), "prompt_loss": float(lp)}


@torch.no_grad()
def measure_latent_scale(model: Any, batches: Iterable[Tensor]) -> float:
    """1 / SD of the VAE's latents over `batches` (all workers pooled), as the LDM paper scales latents."""
    total, sq, n = 0.0, 0.0, 0
    for images in batches:
        z = model.vae.encode(images).latent_dist.sample().float()
        total, sq, n = total + float(z.sum()), sq + float((z * z).sum()), n + z.numel()
    mean = all_reduce_mean(total / max(n, 1), float(n))
    second = all_reduce_mean(sq / max(n, 1), float(n))
    sd = math.sqrt(max(second - mean * mean, 1e-12))
    return 1.0 / sd


def train_epoch(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Sequence[str]]],
    stage: Stage,
    setup: Any,
    grad_clip: float | None = None,
    ema: Any = None,
    max_steps: int | None = None,
) -> dict[str, float]:
    """One pass over `batches` for `stage`; returns mean losses and the number of steps."""
    model = unwrap(objective).model
    params = stage_parameters(model, stage)
    objective.train()
    sums: dict[str, float] = {}
    steps = 0
    for images, prompts in batches:
        if max_steps is not None and steps >= max_steps:
            break
        with autocast(setup):
            loss, parts = objective(images.to(setup.device, non_blocking=True), prompts, stage)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if ema is not None and stage == "unet":
            ema.step(ldm_parameters(model))
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
    return {**{k: v / max(steps, 1) for k, v in sums.items()}, "steps": float(steps)}


@torch.no_grad()
def validation_loss(model: Any, batches: Iterable[tuple[Tensor, Sequence[str]]], stage: Stage, scheduler: Any,
                    setup: Any, seed: int = 0) -> float:
    """Stage loss on validation batches with seeded noise and timesteps (comparable across epochs)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for images, prompts in batches:
        images = images.to(setup.device)
        with autocast(setup):
            if stage == "vae":
                recon = model.vae.decode(model.vae.encode(images).latent_dist.mode()).sample
                loss = F.l1_loss(recon.float(), images.float())
            else:
                loss = diffusion_loss(model, images, prompts, scheduler, generator=gen)[0]
        total, n = total + float(loss) * images.shape[0], n + images.shape[0]
    return total / n if n else float("nan")


def make_optimizer(model: Any, stage: Stage, cfg: LDMTrainConfig) -> torch.optim.Optimizer:
    """AdamW over the stage's parameters."""
    lr = cfg.vae_lr if stage == "vae" else cfg.unet_lr
    return torch.optim.AdamW(stage_parameters(model, stage), lr=lr, weight_decay=cfg.weight_decay)


def make_ema(model: Any, cfg: LDMTrainConfig) -> Any:
    """diffusers' EMAModel over the LDM parameters (None when disabled)."""
    if not cfg.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(ldm_parameters(model), decay=cfg.ema_decay)


def ema_state(ema: Any) -> dict[str, Any]:
    """EMA state with CPU copies of the shadow weights (checkpoint-safe, weights_only loadable)."""
    st = dict(ema.state_dict())
    st["shadow_params"] = [p.detach().cpu().clone() for p in ema.shadow_params]
    return st


def train_local(model: Any, images: Tensor, prompts: Sequence[str], cfg: LDMTrainConfig,
                setup: Any = None) -> dict[str, list[float]]:
    """Train without Ray (tests, notebooks): VAE epochs, latent scale, LDM epochs; EMA copied in at the end."""
    from raypipe.models.ldm.schedule import ddpm_scheduler

    setup = setup or select_device(cfg.amp)
    seed_everything(cfg.seed)
    set_trainable(model, text_trainable(cfg))
    objective = Objective(model, ddpm_scheduler(), cfg.kl_weight, cfg.cond_drop_prob)
    history: dict[str, list[float]] = {"vae": [], "unet": []}
    bs = cfg.batch_size

    def batches(epoch: int) -> Iterable[tuple[Tensor, list[str]]]:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            yield images[idx], [prompts[i] for i in idx.tolist()]

    opt = make_optimizer(model, "vae", cfg)
    for epoch in range(cfg.vae_epochs):
        history["vae"].append(train_epoch(objective, opt, batches(epoch), "vae", setup, cfg.grad_clip,
                                          max_steps=cfg.max_steps_per_epoch)["loss"])
    if cfg.sd_directory is None:  # a Stable Diffusion start keeps SD's scaling_factor
        model.vae.latent_scale.fill_(measure_latent_scale(model, (images[s:s + bs].to(setup.device)
                                                                  for s in range(0, len(images), bs))))
    opt, ema = make_optimizer(model, "unet", cfg), make_ema(model, cfg)
    for epoch in range(cfg.unet_epochs):
        history["unet"].append(train_epoch(objective, opt, batches(10_000 + epoch), "unet", setup, cfg.grad_clip,
                                           ema, cfg.max_steps_per_epoch)["loss"])
    if ema is not None and cfg.unet_epochs > 0:
        ema.copy_to(ldm_parameters(model))
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------- data
def study_prompt(row: Mapping[str, Any], clinical: bool) -> str:
    """The thesis's prompt for a manifest row (age, sex and, when `clinical`, its attributes)."""
    from raypipe.generate import CLINICAL_PROMPT_KEYS
    from raypipe.models.ldm.text import build_prompt

    attrs = {k: row.get(k) for k in CLINICAL_PROMPT_KEYS if clinical and k in row}
    if "bmi" in attrs:
        try:
            attrs["bmi"] = float(attrs["bmi"])
        except (TypeError, ValueError):
            attrs["bmi"] = None
        if attrs["bmi"] is not None and not math.isfinite(attrs["bmi"]):
            attrs["bmi"] = None
    return build_prompt(float(row["age"]), str(row["sex"]), **attrs)


class LoadRadiographs:
    """Ray Data map_batches: manifest rows -> `image` (B, 1, S, S) float32 in [-1, 1] + `prompt`."""

    def __init__(self, size: int, clinical: bool) -> None:
        self.size, self.clinical = size, clinical

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        from raypipe.io.radiograph import read_radiograph
        from raypipe.preprocess.pvf import ldm_input

        images = [ldm_input(read_radiograph(p).pixels, self.size) for p in batch["image_path"]]
        prompts = [study_prompt(r, self.clinical) for r in batch.to_dict("records")]
        return {"study_id": batch["study_id"].astype(str).to_numpy(), "image": np.stack(images).astype(np.float32),
                "prompt": np.asarray(prompts, dtype=object)}


def _collate(batch: Mapping[str, np.ndarray]) -> tuple[Tensor, list[str]]:
    return torch.from_numpy(np.asarray(batch["image"], dtype=np.float32)), [str(p) for p in batch["prompt"]]


def _shard_batches(name: str, batch_size: int, seed: int) -> Iterable[tuple[Tensor, list[str]]]:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                local_shuffle_buffer_size=64 if name == "train" else None,
                                local_shuffle_seed=seed if name == "train" else None):
        yield _collate(b)


# ---------------------------------------------------------------------------------------------- worker loop
class LDMWorkerTask(WorkerTask):
    """Hooks of the shared worker loop for Diff-X: VAE epochs, then LDM epochs (own optimiser, EMA, latent scale).

    DDP wraps the `Objective` (the stage's loss), checkpoints hold the model itself; on resume the optimiser
    state is reloaded only when it belongs to the stage being resumed.
    """

    def __init__(self, cfg: LDMTrainConfig, loop_config: Mapping[str, Any]) -> None:
        from raypipe.models.ldm.schedule import ddpm_scheduler

        super().__init__(cfg, loop_config)
        self.scheduler = ddpm_scheduler()
        self.model: Any = None
        self.stage: Stage | None = None
        self.ema: Any = None
        self.opt_state: dict[str, Any] | None = None
        self.parts: dict[str, float] = {}
        self.part_steps = 0
        self.accelerator: Any = None

    def build_model(self) -> nn.Module:
        model = build(self.cfg, load_weights=True)  # a resume overwrites the weights afterwards
        set_trainable(model, text_trainable(self.cfg))
        self.model = model
        return model

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, self._stage_of(1), self.cfg)

    def resume_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        import ray.train

        from raypipe.train.common import load_checkpoint

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return TrainState()
        state = load_checkpoint(checkpoint, model)  # the optimiser follows with its stage
        self.opt_state = read_checkpoint(checkpoint).get("optimizer") or None
        log.info("resuming after epoch %d (stage %s)", state.epoch, state.extra.get("stage"))
        return state

    def trainable(self, model: nn.Module) -> nn.Module:
        return Objective(model, self.scheduler, self.cfg.kl_weight, self.cfg.cond_drop_prob)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Accelerate wraps the objective (DDP over Ray's process group, mixed-precision forward)."""
        self.accelerator = make_accelerator(self.cfg, self.setup.device)
        return self.accelerator.prepare(module)

    def step_context(self, net: nn.Module) -> Any:
        return self.accelerator.accumulate(net)

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)  # divides by gradient_accumulation_steps, scales fp16 losses

    def sync_gradients(self) -> bool:
        return bool(self.accelerator.sync_gradients)

    def clip_gradients(self, model: nn.Module) -> None:
        if self.cfg.grad_clip:
            self.accelerator.clip_grad_norm_(stage_parameters(model, self.stage), self.cfg.grad_clip)

    def _stage_of(self, epoch: int) -> Stage:
        return "vae" if epoch <= self.cfg.vae_epochs else "unet"

    def optimizer_for_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                            state: TrainState) -> torch.optim.Optimizer:
        stage = self._stage_of(epoch)
        if stage == self.stage:
            return optimizer
        cfg, setup = self.cfg, self.setup
        optimizer = make_optimizer(model, stage, cfg)
        if self.opt_state and state.extra.get("stage") == stage:
            optimizer.load_state_dict(self.opt_state)
        optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.accelerator.step = 0  # a new stage starts a new accumulation window
        model.zero_grad(set_to_none=True)
        if stage == "unet":
            if not state.extra.get("latent_scale") and cfg.sd_directory is not None:
                state.extra["latent_scale"] = float(model.vae.latent_scale)  # SD's scaling_factor, as SD's UNet saw it
            if not state.extra.get("latent_scale"):
                batch = per_worker_batch(cfg.batch_size, self.world)
                scale = measure_latent_scale(model, (x.to(setup.device) for x, _ in _islice(
                    _shard_batches("train", batch, cfg.seed), cfg.latent_scale_batches)))
                model.vae.latent_scale.fill_(scale)
                state.extra["latent_scale"] = scale
                log.info("latent scale 1/SD = %.4f", scale)
            self.ema = make_ema(model, cfg)
            if self.ema is not None and state.extra.get("ema"):
                self.ema.load_state_dict(state.extra["ema"])
                self.ema.to(setup.device)
        self.stage = stage
        return optimizer

    def begin_epoch(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        self.parts, self.part_steps = {}, 0
        return {"stage": 0.0 if self.stage == "vae" else 1.0}

    def train_batches(self, epoch: int, batch_size: int) -> Any:
        batches = _shard_batches("train", batch_size, self.cfg.seed + epoch)
        cap = self.cfg.max_steps_per_epoch
        return _islice(batches, cap) if cap is not None else batches

    def train_step(self, model: nn.Module, batch: tuple[Tensor, list[str]]) -> tuple[Tensor, int]:
        images, prompts = batch
        loss, parts = model(images.to(self.setup.device, non_blocking=True), prompts, self.stage)  # Accelerate's autocast
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v
        self.part_steps += 1
        return loss, int(images.shape[0])

    def clip_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return stage_parameters(model, self.stage)

    def after_step(self, model: nn.Module) -> None:
        if self.ema is not None and self.stage == "unet":
            self.ema.step(ldm_parameters(model))

    def validate(self, model: nn.Module) -> dict[str, float]:
        batch = per_worker_batch(self.cfg.batch_size, self.world)
        val = validation_loss(self.model, _shard_batches("val", batch, 0), self.stage, self.scheduler, self.setup,
                              self.cfg.seed)
        return {f"val_{self.stage}_loss": val}

    def epoch_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **{k: v / max(self.part_steps, 1) for k, v in self.parts.items()}}

    def extra_state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"stage": self.stage}
        if self.ema is not None:
            extra["ema"] = ema_state(self.ema)
        return extra


def mixed_precision(cfg: LDMTrainConfig, device: torch.device) -> str:
    """Accelerate's mixed-precision mode: the configured one, or bf16 on CUDA when `amp` (fp32 on CPU)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if (cfg.amp and device.type == "cuda") else "no"


def make_accelerator(cfg: LDMTrainConfig, device: torch.device) -> Any:
    """An `Accelerator` inside a Ray Train worker: it finds Ray's process group already initialised and reuses it.

    Ray Train sets RANK / WORLD_SIZE / LOCAL_RANK and ACCELERATE_TORCH_DEVICE and calls
    `init_process_group` before the loop runs; Accelerate's state then skips its own initialisation. On CPU
    workers `cpu=True` is needed, otherwise Accelerate would see no GPU and train without DDP.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(
        mixed_precision=mixed_precision(cfg, device),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=device.type == "cpu",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # one stage's parts idle
    )


def train_loop_ldm(loop_config: dict) -> None:
    """Ray Train worker loop of Diff-X (the shared skeleton, `raypipe.train.loop`)."""
    run_worker_loop(LDMWorkerTask(LDMTrainConfig.model_validate(loop_config["config"]), loop_config))


def _islice(it: Iterable[Any], n: int) -> Iterable[Any]:
    for i, x in enumerate(it):
        if i >= n:
            break
        yield x


# ---------------------------------------------------------------------------------------------- driver
def read_training_manifest(data: str) -> pd.DataFrame:
    """The radiograph (XR) rows of a manifest (a file, or a folder holding manifest.csv)."""
    from raypipe.io.manifest import load_manifest

    path = storage.join(data, "manifest.csv") if storage.is_dir(data) else data
    table = load_manifest(path)
    xr = table[table["modality"] == "XR"].reset_index(drop=True)
    if xr.empty:
        raise ValueError(f"{path}: no XR studies")
    missing = [c for c in ("age", "sex") if c not in xr.columns or xr[c].isna().any()]
    if missing:
        raise ValueError(f"{path}: prompts need {missing} for every XR study")
    return xr


def fit_ldm(config: LDMTrainConfig, data: str, out_dir: str, callbacks: Sequence[Any] = ()) -> Any:
    """Train Diff-X on the radiographs of manifest `data`; write the model folder into `out_dir`."""
    import ray.data

    from raypipe import storage
    from raypipe.data.splits import split_by_patient
    from raypipe.train.common import make_trainer

    cfg = config
    out = str(out_dir) if storage.is_uri(out_dir) else os.path.abspath(out_dir)
    storage.makedirs(out)
    storage_path = cfg.storage_path or storage.join(out, "ray_results")
    table = read_training_manifest(data)
    role = split_by_patient(table, cfg.label, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    if not (role == "train").any() or not (role == "val").any():
        raise ValueError("need training and validation patients")
    cols = [c for c in ("patient_id", "study_id", "image_path", "age", "sex", "bmi", "prevalent_fracture",
                        "glucocorticoid", "prior_fracture", "rheumatoid_arthritis", "secondary_osteoporosis")
            if c in table.columns]
    loader = LoadRadiographs(image_size(cfg), cfg.clinical_prompts)

    def dataset(mask: pd.Series) -> Any:
        return ray.data.from_pandas(table.loc[mask.to_numpy(), cols].reset_index(drop=True)).map_batches(
            loader, batch_format="pandas", batch_size=8)

    run_dir = storage.join(storage_path, cfg.run_name)
    trainer = make_trainer(
        train_loop_ldm, {"config": cfg.model_dump(mode="json"), "metrics_csv": storage.join(run_dir, "metrics.csv")},
        {"train": dataset(role == "train"), "val": dataset(role == "val")}, run=cfg, storage_path=storage_path,
        callbacks=callbacks,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    write_model_dir(cfg, read_checkpoint(result.checkpoint), out)
    return result


def write_model_dir(cfg: LDMTrainConfig, payload: Mapping[str, Any], out: str) -> None:
    """model.pt (EMA LDM weights when kept), model_meta.json, config.yaml, metrics.csv, metrics.json."""
    from raypipe import storage
    from raypipe.artifact import RunArtifact
    from raypipe.config import config_hash
    from raypipe.train.outputs import write_run_files

    state = payload["state"]
    weights = dict(payload["model"])
    ema = state.get("extra", {}).get("ema")
    if cfg.use_ema and ema:
        model = build(cfg)
        set_trainable(model, text_trainable(cfg))
        model.load_state_dict(weights)
        for p, shadow in zip(ldm_parameters(model), ema["shadow_params"], strict=True):
            p.data.copy_(shadow)
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    history = state.get("history", [])
    artifact = RunArtifact(
        builder=cfg.model, kwargs=model_kwargs(cfg), task="ldm", train_task="ldm", display_name=cfg.name,
        preprocess={"ldm_size": image_size(cfg), "intensity": "min-max, padded square, [-1, 1]"},
        config_hash=config_hash(cfg), epochs_run=int(state.get("epoch", 0)), sampler=dict(cfg.sampler),
        latent_scale=float(weights["vae.latent_scale"]), ema=bool(cfg.use_ema and ema), image_size=image_size(cfg),
        clinical_prompts=cfg.clinical_prompts,
    )
    write_run_files(out, cfg, weights, history, artifact)
    last = {}
    for row in history:
        last.update({k: v for k, v in row.items() if k.startswith("val_")})
    metrics = {"models": {cfg.name: {k: {"value": v, "ci_low": None, "ci_high": None} for k, v in last.items()}},
               "comparisons": []}
    storage.atomic_write_json(storage.join(out, "metrics.json"), metrics)
    log.info("wrote Diff-X model folder %s", out)
