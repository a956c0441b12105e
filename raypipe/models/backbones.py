"""2D image encoders by name (ResNet / ResNeXt family) and local-file pretrained loading.

The full-size encoders have exactly torchvision's module names and shapes (minus ``fc``), so an
ImageNet state_dict saved from torchvision or timm (``.pth`` or ``.safetensors``) loads with
:func:`raypipe.models.pretrained.load_pretrained` (re-exported here). A ``width`` knob and
the ``*_tiny`` names build narrow, shallow versions of the same structure for tests and smoke runs.
Nothing here downloads weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from raypipe.models.pretrained import load_pretrained

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "ResNetEncoder",
    "build_backbone",
    "list_backbones",
    "load_pretrained",
]


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of one named encoder; ``width`` is the channel count of the first stage."""

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    width: int = 64


BACKBONES: Mapping[str, BackboneSpec] = {
    "resnet18": BackboneSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": BackboneSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": BackboneSpec(Bottleneck, (3, 4, 6, 3)),
    "resnext50_32x4d": BackboneSpec(Bottleneck, (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnet_tiny": BackboneSpec(BasicBlock, (1, 1, 1, 1), width=16),
    "resnext_tiny": BackboneSpec(Bottleneck, (1, 1, 1, 1), groups=4, width_per_group=16, width=16),
}


class ResNetEncoder(nn.Module):
    """ResNet/ResNeXt trunk without classifier: stage feature maps and a pooled feature vector.

    Attribute names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``) match torchvision's ResNet so
    torchvision checkpoints load unchanged; ``out_channels`` is the pooled feature size.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Iterable[int],
        *,
        in_chans: int = 1,
        width: int = 64,
        groups: int = 1,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {layers}")
        if block is BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError("BasicBlock supports only groups=1, width_per_group=64")
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.stage_channels: tuple[int, ...] = tuple(width * m * block.expansion for m in (1, 2, 4, 8))
        self.out_channels: int = self.stage_channels[-1]
        self.in_chans = in_chans
        self._init_weights()

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        extra = {"groups": self.groups, "base_width": self.base_width}
        mods = [block(self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch: blocks start as identities (Goyal et al.).
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def stem(self, x: Tensor) -> Tensor:
        """Stride-4 stem (conv 7x7/2 + max-pool/2)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature maps after layer1..layer4 (strides 4, 8, 16, 32)."""
        feats = []
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def forward_features(self, x: Tensor) -> Tensor:
        """Last feature map ``(N, out_channels, H/32, W/32)``."""
        return self.forward_stages(x)[-1]

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(N, out_channels)`` from images ``(N, in_chans, H, W)``."""
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(BACKBONES)


def build_backbone(
    name: str, *, in_chans: int = 1, width: int | None = None, pretrained_path: str | Path | None = None
) -> ResNetEncoder:
    """Build a named encoder; ``width`` overrides the first-stage channels (torchvision uses 64)."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; choose from {list_backbones()}")
    spec = BACKBONES[name]
    enc = ResNetEncoder(
        spec.block,
        spec.layers,
        in_chans=in_chans,
        width=spec.width if width is None else width,
        groups=spec.groups,
        width_per_group=spec.width_per_group,
    )
    if pretrained_path is not None:
        load_pretrained(enc, pretrained_path)
    return enc
