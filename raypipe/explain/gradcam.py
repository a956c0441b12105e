"""Grad-CAM (Selvaraju et al. 2017) on any module and target layer, and heatmap overlays for PNGs.

Used for the papers' attention figures: where in each CT slice (or radiograph) the score comes from.
The target layer's activations are weighted by their spatially averaged gradients of the chosen
score; for the CNN-RNN the layer sees B*S slice images, so maps come back per slice ``(B, S, H, W)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["grad_cam", "overlay"]

Target = int | str | Callable[[Any], Tensor] | None


def _select_score(output: Any, target: Target) -> Tensor:
    """Per-sample scalar score to explain from a model output (tensor or dict of tensors)."""
    if callable(target):
        return target(output)
    if isinstance(output, dict):
        if not isinstance(target, str):
            raise ValueError(f"dict output: pass target as one of {sorted(output)} or a callable")
        output = output[target]
    elif isinstance(target, str):
        raise ValueError("target names a dict key but the model returned a tensor")
    if output.ndim == 1:
        return output
    index = 0 if target is None or isinstance(target, str) else target
    return output[:, index]


def grad_cam(
    model: nn.Module,
    target_layer: nn.Module,
    x: Tensor,
    *,
    target: Target = None,
    output_size: tuple[int, int] | None = None,
    **forward_kwargs: Any,
) -> Tensor:
    """Grad-CAM maps in [0, 1]: ``(B, H, W)``, or ``(B, S, H, W)`` when the layer sees B*S images.

    ``target``: None explains the logit (column 0 for multi-class), an int a class column, a str a
    key of a dict output, a callable maps the output to per-sample scores ``(B,)``. Maps are upsampled
    to ``output_size`` (default: the input's last two dims) and min-max normalised per image.
    The model's train/eval mode and parameters are left untouched.
    """
    store: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, out: Tensor) -> None:
        store["act"] = out

    handle = target_layer.register_forward_hook(hook)
    try:
        # cuDNN RNNs refuse backward in eval mode; the native kernels do not.
        with (
            torch.enable_grad(),
            torch.autocast(device_type=x.device.type, enabled=False),
            torch.backends.cudnn.flags(enabled=False),
        ):
            xin = x.detach().float().requires_grad_(True)  # a graph even when weights are frozen
            score = _select_score(model(xin, **forward_kwargs), target)
            if "act" not in store:
                raise RuntimeError("target_layer was not called in the forward pass")
            (grad,) = torch.autograd.grad(score.sum(), store["act"], allow_unused=True)
    finally:
        handle.remove()
    if grad is None:
        raise RuntimeError("no gradient reached target_layer; is it on the path to the output?")
    act = store["act"].detach().float()
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    size = output_size or tuple(x.shape[-2:])
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = cam.reshape(cam.shape[0], -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    cam = ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(cam.shape)
    b = x.shape[0]
    if cam.shape[0] != b:
        cam = cam.reshape(b, cam.shape[0] // b, *size)
    return cam


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a grey image (any range; min-max scaled) with a [0, 1] heatmap: RGB uint8 ``(H, W, 3)``."""
    from matplotlib import colormaps  # deferred: matplotlib is only needed for figures

    img = np.asarray(image, dtype=np.float64)
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0.0, 1.0)
    if img.ndim != 2 or img.shape != heat.shape:
        raise ValueError(f"need 2D image and heatmap of equal shape, got {img.shape} and {heat.shape}")
    span = img.max() - img.min()
    grey = (img - img.min()) / span if span > 0 else np.zeros_like(img)
    colour = colormaps[cmap](heat)[..., :3]
    rgb = (1 - alpha) * grey[..., None] + alpha * colour
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
