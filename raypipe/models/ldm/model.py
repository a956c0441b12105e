"""`DiffXModel`: the Diff-X weights in one module (VAE, structure UNet, prompt UNet, text encoder).

One container so that a run's ``model.pt`` is one flat state_dict with the prefixes ``vae.``,
``structure_unet.``, ``prompt_unet.`` and ``text_encoder.`` (loadable with ``weights_only=True``) and
the registry can rebuild it from builder kwargs. The latent scaling factor (1 / SD of the training
latents, as in the LDM paper) is the buffer ``vae.latent_scale`` so every checkpoint carries it.
``forward`` is a smoke pass through every part (the registry's model contract); training losses and
sampling live in `raypipe.train.ldm` and `raypipe.generate`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raypipe.models.ldm.text import build_prompt, build_text_encoder, encode_prompts, load_tokenizer
from raypipe.models.ldm.unet import SD_UNET_CHANNELS, build_prompt_unet, build_structure_unet
from raypipe.models.ldm.vae import SD_VAE_CHANNELS, build_vae, downsample_factor

__all__ = ["DIFFX_SD", "DIFFX_TINY", "DiffXModel", "diffx", "diffx_tiny"]

DIFFX_SD: dict[str, Any] = {
    "image_size": 512, "vae_channels": list(SD_VAE_CHANNELS), "unet_channels": list(SD_UNET_CHANNELS),
    "attention_heads": 8, "text_hidden": 768, "text_layers": 12, "text_heads": 12,
}
DIFFX_TINY: dict[str, Any] = {
    "image_size": 64, "vae_channels": [16, 32, 32, 32], "vae_layers_per_block": 1, "vae_norm_groups": 8,
    "unet_channels": [32, 32, 64, 64], "unet_layers_per_block": 2, "norm_num_groups": 8, "attention_heads": 2,
    "text_hidden": 32, "text_layers": 2, "text_heads": 2,
}
_PROBE_PROMPT = build_prompt(70, "F")


class DiffXModel(nn.Module):
    """Diff-X: single-channel VAE, structure LDM (latent + low-res image in), prompt LDM, prompt encoder."""

    def __init__(
        self,
        *,
        image_size: int = 512,
        latent_channels: int = 4,
        lowres_channels: int = 1,
        vae_channels: Sequence[int] = SD_VAE_CHANNELS,
        vae_layers_per_block: int = 2,
        vae_norm_groups: int = 32,
        unet_channels: Sequence[int] = SD_UNET_CHANNELS,
        unet_layers_per_block: int = 2,
        norm_num_groups: int = 32,
        attention_heads: int = 8,
        text_encoder_path: str | None = None,
        text_hidden: int = 768,
        text_layers: int = 12,
        text_heads: int = 12,
        max_length: int = 32,
        unet_config: Mapping[str, Any] | None = None,
        vae_config: Mapping[str, Any] | None = None,
        text_config: Mapping[str, Any] | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__()
        sd_parts = (unet_config, vae_config, text_config, tokenizer_path)
        if any(x is not None for x in sd_parts) and not all(x is not None for x in sd_parts):
            raise ValueError("unet_config, vae_config, text_config and tokenizer_path come together (a Stable "
                             "Diffusion directory, raypipe.models.ldm.stable_diffusion.diffx_kwargs_from_sd)")
        if vae_config is not None:
            vae_channels = vae_config["block_out_channels"]
        factor = downsample_factor(vae_channels)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE's factor {factor}")
        self.image_size, self.latent_channels, self.lowres_channels = image_size, latent_channels, lowres_channels
        self.latent_size = image_size // factor
        if unet_config is not None and vae_config is not None and text_config is not None:
            self._build_from_sd_configs(unet_config, vae_config, text_config, tokenizer_path or "")
        else:
            self.vae = build_vae(image_size=image_size, block_out_channels=vae_channels,
                                 layers_per_block=vae_layers_per_block, latent_channels=latent_channels,
                                 norm_num_groups=vae_norm_groups)
            self.text_encoder = build_text_encoder(path=text_encoder_path, hidden_size=text_hidden,
                                                   num_layers=text_layers, num_heads=text_heads, max_length=max_length)
            self.tokenizer = load_tokenizer(text_encoder_path, max_length)
            unet_kw = dict(sample_size=self.latent_size, latent_channels=latent_channels,
                           block_out_channels=unet_channels, layers_per_block=unet_layers_per_block,
                           cross_attention_dim=int(self.text_encoder.config.hidden_size),
                           attention_head_dim=attention_heads, norm_num_groups=norm_num_groups)
            self.structure_unet = build_structure_unet(lowres_channels=lowres_channels, **unet_kw)
            self.prompt_unet = build_prompt_unet(**unet_kw)
        self.vae.register_buffer("latent_scale", torch.tensor(1.0))
        probe = self.tokenizer([_PROBE_PROMPT], padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="pt")["input_ids"]
        self.register_buffer("probe_ids", probe, persistent=False)

    def _build_from_sd_configs(self, unet: Mapping[str, Any], vae: Mapping[str, Any], text: Mapping[str, Any],
                               tokenizer_path: str) -> None:
        """Stable Diffusion's architectures (random weights): grey VAE, structure UNet widened by the low-res input."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        self.vae = AutoencoderKL.from_config({**vae, "in_channels": 1, "out_channels": 1})
        self.prompt_unet = UNet2DConditionModel.from_config(dict(unet))
        widened = int(unet.get("in_channels", self.latent_channels)) + self.lowres_channels
        self.structure_unet = UNet2DConditionModel.from_config({**unet, "in_channels": widened})
        self.text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(text)))
        self.tokenizer = load_tokenizer(tokenizer_path)

    # ------------------------------------------------------------------------------------------ parts
    def lowres(self, image: Tensor) -> Tensor:
        """The low-resolution image (area average at the latent size) the structure LDM is conditioned on."""
        return F.interpolate(image, size=(self.latent_size, self.latent_size), mode="area")

    def encode(self, image: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Scaled latents of [-1, 1] images (posterior mean unless `sample`)."""
        dist = self.vae.encode(image).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return z * self.vae.latent_scale

    def decode(self, latents: Tensor) -> Tensor:
        """[-1, 1] images from scaled latents."""
        return self.vae.decode(latents / self.vae.latent_scale).sample

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompt embeddings (B, L, D) for the UNets' cross-attention."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts)

    def structure_eps(self, latents: Tensor, t: Tensor, text: Tensor, lowres: Tensor) -> Tensor:
        """Structure LDM noise prediction: the low-res image is concatenated channel-wise to the latent."""
        lr = lowres.expand(latents.shape[0], -1, -1, -1) if lowres.shape[0] == 1 else lowres
        return self.structure_unet(torch.cat([latents, lr.to(latents.dtype)], dim=1), t, encoder_hidden_states=text).sample

    def prompt_eps(self, latents: Tensor, t: Tensor, text: Tensor) -> Tensor:
        """Prompt LDM noise prediction."""
        return self.prompt_unet(latents, t, encoder_hidden_states=text).sample

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Smoke pass through every part: VAE reconstruction and both UNets' noise predictions at t = 500."""
        z = self.vae.encode(x).latent_dist.mode()
        recon = self.vae.decode(z).sample
        ids = self.probe_ids.expand(x.shape[0], -1)
        text = self.text_encoder(input_ids=ids).last_hidden_state
        t = torch.full((x.shape[0],), 500, device=x.device, dtype=torch.long)
        return {
            "reconstruction": recon,
            "structure_eps": self.structure_eps(z, t, text, self.lowres(x)),
            "prompt_eps": self.prompt_eps(z, t, text),
        }


def diffx(**kwargs: Any) -> DiffXModel:
    """Thesis setting: SD v1 VAE/UNet sizes at 512 x 512 (64 x 64 latents), single-channel images."""
    return DiffXModel(**{**DIFFX_SD, **kwargs})


def diffx_tiny(**kwargs: Any) -> DiffXModel:
    """Tests and smoke runs: 64 x 64 images, 8 x 8 latents, SD's block layout with narrow channels."""
    return DiffXModel(**{**DIFFX_TINY, **kwargs})
