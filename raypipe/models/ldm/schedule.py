"""The noise schedule shared by training (DDPM) and sampling (DDIM, DDIM inversion): SD v1's.

One definition so the trained noise levels and the sampler's levels cannot drift. ``leading`` timestep
spacing with ``steps_offset = 1`` makes the inverse scheduler's last timestep equal the DDIM
scheduler's first, so denoising starts exactly where inversion ended.
"""
from __future__ import annotations

from typing import Any

from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

__all__ = ["NOISE_SCHEDULE", "ddim_inverse_scheduler", "ddim_scheduler", "ddpm_scheduler"]

NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
_DDIM: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                         "timestep_spacing": "leading"}


def ddpm_scheduler() -> DDPMScheduler:
    """Forward process for training (`add_noise`)."""
    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False)


def ddim_scheduler() -> DDIMScheduler:
    """Deterministic (eta = 0) or stochastic (eta > 0) DDIM sampling."""
    return DDIMScheduler(**NOISE_SCHEDULE, **_DDIM)


def ddim_inverse_scheduler() -> DDIMInverseScheduler:
    """DDIM inversion: clean latent -> x_T along the deterministic DDIM path."""
    return DDIMInverseScheduler(**NOISE_SCHEDULE, **_DDIM)
