"""ImageNet weights from local files: ``.pth``/``.pt``/``.bin`` state_dicts or ``.safetensors``.

Formats: a torchvision or timm ``state_dict`` saved with ``torch.save`` (optionally wrapped as
``{"state_dict": ...}`` or ``{"model": ...}``, keys optionally prefixed ``module.``), or a safetensors
file. ResNet/ResNeXt and HRNet keys are the same in torchvision and timm; timm's EfficientNet layout
(``conv_stem``, ``blocks.i.j.*``, ``conv_head``) is renamed to torchvision's (``features.*``) and then
checked shape by shape like any other file.

First-conv channel adaptation: a kernel trained on RGB is mapped to a 1-channel stem by summing over
the three input channels (a grey image ``g`` gives the response the RGB kernel gives to ``(g, g, g)``); to
``C`` channels (e.g. the five L1-L5 patches) every channel gets that sum divided by ``C``, so ``C`` equal
channels again give the grey response (radiographs and CT carry no colour, so nothing else is kept). How to produce each file is in ``docs/WEIGHTS.md``. Nothing here downloads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "PRETRAINED_CHOICES",
    "WEIGHT_SUFFIXES",
    "adapt_in_channels",
    "check_pretrained",
    "load_pretrained",
    "read_state_dict",
    "timm_efficientnet_to_torchvision",
]

PRETRAINED_CHOICES = ("imagenet", "none")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def check_pretrained(pretrained: str, path: str | None, *, owner: str = "config") -> None:
    """Validate a config's ``pretrained`` / ``pretrained_path`` pair; raise ValueError naming the field."""
    if pretrained not in PRETRAINED_CHOICES:
        raise ValueError(f"{owner}: pretrained must be one of {PRETRAINED_CHOICES}, got {pretrained!r}")
    if pretrained == "none":
        if path:
            raise ValueError(f"{owner}: pretrained is 'none' but pretrained_path is set ({path!r}); drop one of them")
        return
    if not path:
        raise ValueError(
            f"{owner}: pretrained is 'imagenet' (the paper's setting) but pretrained_path is not set; "
            "name the local ImageNet weight file (docs/WEIGHTS.md says how to produce it) "
            "or state `pretrained: none` to train from random initialisation"
        )
    p = Path(path)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{owner}: pretrained_path {path!r} must end in one of {WEIGHT_SUFFIXES}")
    if not p.is_file():
        raise ValueError(
            f"{owner}: pretrained_path {path!r} does not exist (weights are never downloaded; see docs/WEIGHTS.md)"
        )


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a local weight file (safetensors or a ``weights_only`` torch pickle), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or non-weights pickle: say which file
        raise ValueError(f"{path} is not a readable state_dict ({type(exc).__name__}: {exc})") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TypeError(f"{path} does not hold a state_dict of tensors (got {type(state).__name__})")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def adapt_in_channels(weight: Tensor, in_chans: int) -> Tensor:
    """Map a conv kernel trained on 3 channels to ``in_chans`` while keeping its response to grey input."""
    grey = weight.sum(dim=1, keepdim=True)
    return grey if in_chans == 1 else grey.repeat(1, in_chans, 1, 1) / in_chans


# timm block part -> torchvision MBConv ``block`` index, for blocks with and without an expansion conv
_TIMM_IR_PARTS = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "se.conv_reduce": "2.fc1",
                  "se.conv_expand": "2.fc2", "conv_pwl": "3.0", "bn3": "3.1"}
_TIMM_DS_PARTS = {"conv_dw": "0.0", "bn1": "0.1", "se.conv_reduce": "1.fc1", "se.conv_expand": "1.fc2",
                  "conv_pw": "2.0", "bn2": "2.1"}


def timm_efficientnet_to_torchvision(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor], *, ignore_prefixes: Iterable[str] = ("classifier.",)
) -> dict[str, Tensor]:
    """Rename a timm EfficientNet state_dict (``conv_stem``, ``blocks.i.j``, ``conv_head``) to torchvision's keys."""
    prefixes = tuple(ignore_prefixes)
    last = max(int(k.split(".")[1]) for k in target if k.startswith("features."))
    expanded = {".".join(k.split(".")[1:3]) for k in state if k.startswith("blocks.") and ".conv_pwl." in k}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(prefixes):
            continue
        head, _, leaf = key.rpartition(".")
        if head in ("conv_stem", "bn1", "conv_head", "bn2"):
            index = {"conv_stem": "0.0", "bn1": "0.1", "conv_head": f"{last}.0", "bn2": f"{last}.1"}[head]
            out[f"features.{index}.{leaf}"] = value
            continue
        parts = head.split(".")
        if parts[0] != "blocks" or len(parts) < 4:
            raise ValueError(f"timm EfficientNet key {key!r} has no torchvision counterpart")
        stage, block, part = int(parts[1]), parts[2], ".".join(parts[3:])
        table = _TIMM_IR_PARTS if f"{stage}.{block}" in expanded else _TIMM_DS_PARTS
        if part not in table:
            raise ValueError(f"timm EfficientNet key {key!r} has no torchvision counterpart")
        out[f"features.{stage + 1}.{block}.block.{table[part]}.{leaf}"] = value
    return out


def _is_timm_efficientnet(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> bool:
    return "conv_stem.weight" in state and "conv_stem.weight" not in own and "features.0.0.weight" in own


def load_pretrained(
    module: nn.Module,
    path: str | Path,
    *,
    ignore_prefixes: Iterable[str] = ("fc.", "classifier."),
    strict: bool = True,
) -> nn.Module:
    """Load local ImageNet weights into ``module``, adapting 3-channel stems; mismatches raise naming keys.

    Keys starting with ``ignore_prefixes`` (classifier heads) and a ``module.`` prefix (DDP) are
    dropped; input-channel mismatches on conv kernels are adapted (see the module docstring). With
    ``strict`` any missing key, unexpected key or shape mismatch raises a ValueError that lists them
    (key, shape in the file, shape in the model).
    """
    path = Path(path)
    state = read_state_dict(path)
    prefixes = tuple(ignore_prefixes)
    own = module.state_dict()
    if _is_timm_efficientnet(state, own):
        state = timm_efficientnet_to_torchvision(state, own, ignore_prefixes=prefixes)
    loaded: dict[str, Tensor] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    mismatched: set[str] = set()
    for key, value in state.items():
        if key.startswith(prefixes):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        target = own[key].shape
        if value.shape != target:
            if value.ndim == 4 and value.shape[1] == 3 and value.shape[0] == target[0] and value.shape[2:] == target[2:]:
                value = adapt_in_channels(value, target[1])
            else:
                bad_shape.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target)}")
                mismatched.add(key)
                continue
        loaded[key] = value.to(own[key].dtype)
    missing = [k for k in own if k not in loaded and k not in mismatched and not k.startswith(prefixes)]
    if strict and (missing or unexpected or bad_shape):
        parts = []
        for label, items in (("shape mismatch", bad_shape), ("missing", missing), ("unexpected", unexpected)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise ValueError(f"state_dict in {path} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(loaded, strict=False)
    return module
