"""UNet2DConditionModel builders with Stable Diffusion's structure (sizes by config).

SD v1 layout: three cross-attention down blocks and one plain down block, a cross-attention mid
block, then one plain up block and three cross-attention up blocks. With ``layers_per_block = 2``
every up block has three ResNets, so the decoder is 3 ResNet blocks followed by 9 ResNet +
attention blocks, which is how the Diff-X thesis describes it ("three Resnet blocks and nine
Resnet-attention blocks"). The structure LDM takes the low-resolution image concatenated
channel-wise with the noisy latent, so its ``in_channels`` is ``latent + lowres`` while it still
predicts ``latent`` channels of noise.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # diffusers is imported when a model is built, not when the registry is imported
    from diffusers import UNet2DConditionModel

__all__ = ["SD_UNET_CHANNELS", "build_unet", "build_structure_unet", "build_prompt_unet"]

SD_UNET_CHANNELS: tuple[int, ...] = (320, 640, 1280, 1280)


def build_unet(
    *,
    sample_size: int = 64,
    in_channels: int = 4,
    out_channels: int = 4,
    block_out_channels: Sequence[int] = SD_UNET_CHANNELS,
    layers_per_block: int = 2,
    cross_attention_dim: int = 768,
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
) -> "UNet2DConditionModel":
    """A text-conditioned UNet with SD's block types (``attention_head_dim`` is heads, as in SD v1 configs)."""
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    if n < 2:
        raise ValueError("need at least two resolution levels")
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def build_structure_unet(*, latent_channels: int = 4, lowres_channels: int = 1, **kwargs: int) -> "UNet2DConditionModel":
    """Structure LDM: input = noisy latent (+) low-res image along channels; output = latent noise."""
    return build_unet(in_channels=latent_channels + lowres_channels, out_channels=latent_channels, **kwargs)


def build_prompt_unet(*, latent_channels: int = 4, **kwargs: int) -> "UNet2DConditionModel":
    """Prompt LDM: a plain text-to-image latent UNet."""
    return build_unet(in_channels=latent_channels, out_channels=latent_channels, **kwargs)
