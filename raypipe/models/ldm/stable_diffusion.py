"""Stable Diffusion weights from a local diffusers-format directory, adapted to Diff-X (papers/004, Methods 6).

The thesis builds both LDMs on Stable Diffusion. A diffusers SD directory (``huggingface-cli download`` of an
SD 1.x/2.x repository, docs/WEIGHTS.md) holds ``unet/``, ``vae/``, ``text_encoder/`` and ``tokenizer/``;
each is read with ``from_pretrained(dir, subfolder=..., local_files_only=True)``, so nothing downloads.

How the weights enter `DiffXModel` (`load_stable_diffusion`):

- prompt UNet: SD's UNet unchanged.
- structure UNet: SD's UNet with ``conv_in`` widened by the low-resolution image's channels (concatenated
  after the latent). The new input channels' kernels are zero, so at initialisation the structure UNet
  predicts exactly what SD's UNet predicts for the latent alone; fine-tuning learns to use the low-res image.
- VAE: radiographs are grey. The encoder's RGB ``conv_in`` kernel is summed over its three input channels
  (a grey image ``g`` gets SD's response to ``(g, g, g)``) and the decoder's RGB ``conv_out`` is averaged over
  its three output channels (the grey output is the mean of SD's RGB output). ``latent_scale`` is SD's
  ``scaling_factor`` (0.18215 for SD 1.x/2.x), the scale SD's UNet was trained on.
- text encoder and tokenizer: SD's CLIP, frozen during fine-tuning as in SD.

The architectures come from the directory's ``config.json`` files (`diffx_kwargs_from_sd`), so the run
artifact can rebuild the model without the weights; the tokenizer is read from the directory at build time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SD_SUBFOLDERS",
    "SDLoadReport",
    "check_sd_directory",
    "diffx_kwargs_from_sd",
    "grey_decoder_output",
    "grey_encoder_input",
    "load_stable_diffusion",
    "read_sd_config",
    "widen_input_channels",
]

#: subfolder -> files that must exist in it (weights: one of the listed names)
SD_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "merges.txt"),
}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin")
_PRIVATE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version",
                 "_commit_hash", "dtype", "torch_dtype")


@dataclass(frozen=True)
class SDLoadReport:
    """What `load_stable_diffusion` copied and adapted (for logs and tests)."""

    path: str
    tensors: int
    structure_extra_channels: int
    vae_input_channels_summed: int
    vae_output_channels_averaged: int
    latent_scale: float


def check_sd_directory(path: str | Path) -> Path:
    """The directory as a Path; ValueError naming the first missing file of the diffusers SD layout."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"Stable Diffusion directory {str(root)!r} does not exist (weights are never downloaded; "
                         "see docs/WEIGHTS.md)")
    for sub, files in SD_SUBFOLDERS.items():
        for name in files:
            if not (root / sub / name).is_file():
                raise ValueError(f"Stable Diffusion directory {str(root)!r}: {sub}/{name} is missing "
                                 f"(a diffusers-format directory needs {', '.join(SD_SUBFOLDERS)}; see docs/WEIGHTS.md)")
        if sub in ("unet", "vae", "text_encoder") and not any((root / sub / w).is_file() for w in _WEIGHT_FILES):
            raise ValueError(f"Stable Diffusion directory {str(root)!r}: {sub}/ has no weight file "
                             f"(expected one of {', '.join(_WEIGHT_FILES)})")
    return root


def read_sd_config(path: str | Path, subfolder: str) -> dict[str, Any]:
    """``subfolder/config.json`` of an SD directory without its bookkeeping keys."""
    file = Path(path) / subfolder / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read the {subfolder} config ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return {k: v for k, v in cfg.items() if k not in _PRIVATE_KEYS}


def diffx_kwargs_from_sd(path: str | Path) -> dict[str, Any]:
    """`DiffXModel` builder kwargs that reproduce the directory's architectures (JSON-serialisable)."""
    root = check_sd_directory(path)
    unet, vae, text = (read_sd_config(root, s) for s in ("unet", "vae", "text_encoder"))
    latent = int(vae.get("latent_channels", 4))
    if int(unet.get("in_channels", 4)) != latent or int(unet.get("out_channels", 4)) != latent:
        raise ValueError(f"{root}: unet in/out channels ({unet.get('in_channels')}/{unet.get('out_channels')}) do not "
                         f"match the VAE's latent_channels {latent} (an inpainting or depth UNet is not supported)")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return {
        "image_size": int(unet.get("sample_size", 64)) * factor,
        "latent_channels": latent,
        "unet_config": unet,
        "vae_config": vae,
        "text_config": text,
        "tokenizer_path": str((root / "tokenizer").resolve()),
        "max_length": int(text.get("max_position_embeddings", 77)),
    }


def widen_input_channels(weight: Tensor, extra: int) -> Tensor:
    """A conv kernel (out, in, kh, kw) with `extra` zero input channels appended."""
    if extra < 0:
        raise ValueError(f"extra channels must be >= 0, got {extra}")
    pad = torch.zeros(weight.shape[0], extra, *weight.shape[2:], dtype=weight.dtype, device=weight.device)
    return torch.cat([weight, pad], dim=1)


def grey_encoder_input(weight: Tensor, channels: int = 1) -> Tensor:
    """An RGB input kernel for `channels` grey channels: summed over RGB, divided by `channels`."""
    return weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels


def grey_decoder_output(weight: Tensor, bias: Tensor, channels: int = 1) -> tuple[Tensor, Tensor]:
    """An RGB output kernel and bias averaged over RGB, repeated for `channels` grey outputs."""
    w = weight.mean(dim=0, keepdim=True).repeat(channels, 1, 1, 1)
    return w, bias.mean().reshape(1).repeat(channels)


def load_stable_diffusion(model: Any, path: str | Path) -> SDLoadReport:
    """Copy a diffusers SD directory's weights into a `DiffXModel` built from `diffx_kwargs_from_sd(path)`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = check_sd_directory(path)
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    text = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)

    unet_state = {k: v.detach() for k, v in unet.state_dict().items()}
    _load(model.prompt_unet, unet_state, root / "unet")
    extra = int(model.structure_unet.config.in_channels) - int(unet.config.in_channels)
    structure = dict(unet_state, **{"conv_in.weight": widen_input_channels(unet_state["conv_in.weight"], extra)})
    _load(model.structure_unet, structure, root / "unet")

    vae_state = {k: v.detach() for k, v in vae.state_dict().items()}
    grey_in, grey_out = int(model.vae.config.in_channels), int(model.vae.config.out_channels)
    rgb_in, rgb_out = int(vae.config.in_channels), int(vae.config.out_channels)
    if rgb_in != grey_in:
        vae_state["encoder.conv_in.weight"] = grey_encoder_input(vae_state["encoder.conv_in.weight"], grey_in)
    if rgb_out != grey_out:
        w, b = grey_decoder_output(vae_state["decoder.conv_out.weight"], vae_state["decoder.conv_out.bias"], grey_out)
        vae_state["decoder.conv_out.weight"], vae_state["decoder.conv_out.bias"] = w, b
    scale = float(vae.config.scaling_factor)
    vae_state["latent_scale"] = torch.tensor(scale)
    _load(model.vae, vae_state, root / "vae")
    text_state = text.state_dict()
    _load(model.text_encoder, text_state, root / "text_encoder")
    n = len(unet_state) * 2 + len(vae_state) + len(text_state)
    return SDLoadReport(str(root), n, extra, rgb_in if rgb_in != grey_in else 0, rgb_out if rgb_out != grey_out else 0,
                        scale)


def _load(module: torch.nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Strict load with one error listing every missing, unexpected or mis-shaped key."""
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if problems:
        raise ValueError(f"{source}: weights do not fit the Diff-X model ({len(problems)} problems): "
                         + "; ".join(problems[:20]))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(dtype=v.dtype))
