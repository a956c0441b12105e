"""Prevalent vertebral fracture (pVF) classifier on lateral spine radiographs (paper 004, Verte-X pVF).

torchvision's EfficientNet (B4 in the paper) with one output logit; ``score`` applies the sigmoid
to give the pVF score in [0, 1] that the risk groups threshold (BpVF 0.5, GpVF 0.6). Grey images
enter either through a 1-channel stem (``input_mode="adapt"``; ImageNet kernels summed over RGB when
loaded) or replicated to 3 channels (``"replicate"``) to keep an RGB checkpoint's stem unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

from raypipe.models.backbones import load_pretrained

__all__ = ["EFFICIENTNET_SCALES", "PVF_B4", "PVF_TINY", "PVFClassifier", "pvf_efficientnet_b4", "pvf_tiny"]

# (width_mult, depth_mult, dropout) per variant; b0/b4 as torchvision, tiny for tests.
EFFICIENTNET_SCALES: dict[str, tuple[float, float, float]] = {
    "efficientnet_b0": (1.0, 1.0, 0.2),
    "efficientnet_b4": (1.4, 1.8, 0.4),
    "efficientnet_tiny": (0.25, 0.25, 0.2),
}
PVF_B4: dict[str, Any] = {"arch": "efficientnet_b4"}
PVF_TINY: dict[str, Any] = {"arch": "efficientnet_tiny"}


class PVFClassifier(nn.Module):
    """EfficientNet pVF classifier: images ``(B, C, H, W)`` -> logits ``(B,)``."""

    def __init__(
        self,
        *,
        arch: str = "efficientnet_b4",
        in_chans: int = 1,
        input_mode: Literal["adapt", "replicate"] = "adapt",
        dropout: float | None = None,
        pretrained_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if arch not in EFFICIENTNET_SCALES:
            raise KeyError(f"unknown arch {arch!r}; choose from {sorted(EFFICIENTNET_SCALES)}")
        if input_mode not in ("adapt", "replicate"):
            raise ValueError(f"input_mode must be 'adapt' or 'replicate', got {input_mode!r}")
        if input_mode == "replicate" and in_chans not in (1, 3):
            raise ValueError(f"input_mode='replicate' needs in_chans 1 or 3, got {in_chans}")
        width_mult, depth_mult, default_dropout = EFFICIENTNET_SCALES[arch]
        # All B-variants share B0's block table; only the multipliers differ.
        setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=width_mult, depth_mult=depth_mult)
        self.net = EfficientNet(
            setting,
            default_dropout if dropout is None else dropout,
            num_classes=1,
            last_channel=last_channel,
        )
        # torchvision draws the classifier from U(+-1/sqrt(num_classes)): U(+-1) for one logit, which starts
        # every image at a confident random score (logit SD ~2) that training first has to undo
        head = self.net.classifier[-1]
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        self.in_chans = in_chans
        self.input_mode = input_mode
        if input_mode == "adapt" and in_chans != 3:
            old = self.net.features[0][0]
            self.net.features[0][0] = nn.Conv2d(
                in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
            )
            nn.init.kaiming_normal_(self.net.features[0][0].weight, mode="fan_out")
        if pretrained_path is not None:
            load_pretrained(self.net, pretrained_path, ignore_prefixes=("classifier.",))

    @property
    def gradcam_layer(self) -> nn.Module:
        """Last convolutional block (1x1 conv to the final feature width)."""
        return self.net.features[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B,)``; train with BCE-with-logits."""
        if self.input_mode == "replicate" and x.shape[1] != 3:
            x = x.expand(-1, 3, -1, -1)
        feats = torch.flatten(self.net.avgpool(self.net.features(x)), 1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net.classifier(feats.float()).squeeze(1)

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """pVF score in [0, 1] per image ``(B,)``."""
        return torch.sigmoid(self.forward(x))


def pvf_efficientnet_b4(**kwargs: Any) -> PVFClassifier:
    """Paper setting: EfficientNet-B4 (about 17.5 M parameters), one logit."""
    return PVFClassifier(**{**PVF_B4, **kwargs})


def pvf_tiny(**kwargs: Any) -> PVFClassifier:
    """EfficientNet with width and depth multipliers 0.25, for tests and smoke runs."""
    return PVFClassifier(**{**PVF_TINY, **kwargs})
