"""Single-channel AutoencoderKL builder (Stable Diffusion's VAE structure, sizes by config).

Grey radiographs have one channel, so the VAE is trained from scratch with ``in_channels =
out_channels = 1``; the spatial downsampling factor is ``2 ** (len(block_out_channels) - 1)``
(8 for Stable Diffusion's four blocks: 512 x 512 images -> 64 x 64 latents).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers is imported when a model is built, not when the registry is imported
    from diffusers import AutoencoderKL

__all__ = ["SD_VAE_CHANNELS", "build_vae", "downsample_factor"]

SD_VAE_CHANNELS: tuple[int, ...] = (128, 256, 512, 512)


def downsample_factor(block_out_channels: Sequence[int]) -> int:
    """Image side / latent side for a VAE with these encoder blocks."""
    return 2 ** (len(block_out_channels) - 1)


def build_vae(
    *,
    image_size: int = 512,
    block_out_channels: Sequence[int] = SD_VAE_CHANNELS,
    layers_per_block: int = 2,
    latent_channels: int = 4,
    norm_num_groups: int = 32,
    in_channels: int = 1,
) -> "AutoencoderKL":
    """AutoencoderKL with SD's block layout for `in_channels`-channel images."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
    )
