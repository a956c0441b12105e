"""Attention CNN-RNN over axial CT slices (Kong et al. 2024, paper 000).

Each of the S slices (14 equidistant T12-L4 slices, 96x96 bone-only or 96x144 bone+muscle) goes
through a 2D encoder (ResNeXt-50 32x4d by default) as one batch of B*S images. A spatial attention
gate sits after ``layer3`` (stride 16): a per-pixel map in [0, 1] from channel-pooled statistics
(CBAM-style: mean and max over channels, 7x7 conv, sigmoid) multiplies the layer3 features before
``layer4``, so background regions are suppressed before the deepest stage. The pooled per-slice
vectors form a sequence for a GRU; its final hidden state, optionally concatenated with standardised
clinical variables, feeds the last linear layer (the paper concatenates clinical variables there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raypipe.models.backbones import ResNetEncoder, build_backbone

__all__ = [
    "CNN_RNN_TINY",
    "AttentionCNNRNN",
    "SliceSequenceEncoder",
    "SpatialAttention",
    "cnn_rnn",
    "cnn_rnn_tiny",
]

# Tiny settings for tests and smoke runs: same structure, narrow ResNet, small GRU.
CNN_RNN_TINY: dict[str, Any] = {"backbone": "resnet_tiny", "width": 8, "hidden_size": 16}


class SpatialAttention(nn.Module):
    """CBAM-style spatial gate: per-pixel weights from channel mean/max, so background is damped."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return reweighted features ``x * a`` and the map ``a`` of shape ``(N, 1, h, w)``."""
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        attn = torch.sigmoid(self.conv(stats))
        return x * attn, attn


class SliceSequenceEncoder(nn.Module):
    """Shared trunk: per-slice CNN with spatial attention, then a GRU over the slice sequence."""

    def __init__(
        self,
        *,
        backbone: str = "resnext50_32x4d",
        in_chans: int = 1,
        width: int | None = None,
        pretrained_path: str | Path | None = None,
        attention: bool = True,
        hidden_size: int = 256,
        num_layers: int = 1,
        bidirectional: bool = False,
        rnn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder: ResNetEncoder = build_backbone(
            backbone, in_chans=in_chans, width=width, pretrained_path=pretrained_path
        )
        self.attention = SpatialAttention() if attention else None
        self.gru = nn.GRU(
            self.encoder.out_channels,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=rnn_dropout if num_layers > 1 else 0.0,
        )
        self.out_features: int = hidden_size * (2 if bidirectional else 1)

    def encode_slices(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-slice features ``(B, S, F)`` and attention maps ``(B, S, H/16, W/16)`` (or None)."""
        if x.ndim != 5:
            raise ValueError(f"expected (B, S, C, H, W) slices, got shape {tuple(x.shape)}")
        b, s = x.shape[:2]
        enc = self.encoder
        h = enc.layer3(enc.layer2(enc.layer1(enc.stem(x.reshape(b * s, *x.shape[2:])))))
        attn = None
        if self.attention is not None:
            h, attn = self.attention(h)
            attn = attn.reshape(b, s, *attn.shape[2:])
        h = enc.layer4(h)
        feats = torch.flatten(enc.avgpool(h), 1).reshape(b, s, -1)
        return feats, attn

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sequence feature ``(B, out_features)`` (GRU final state(s)) and attention maps."""
        feats, attn = self.encode_slices(x)
        # The GRU is small; running it in fp32 keeps it valid under any autocast dtype/device.
        with torch.autocast(device_type=x.device.type, enabled=False):
            _, h_n = self.gru(feats.float())
        n_dir = 2 if self.gru.bidirectional else 1
        seq = torch.cat([h_n[-n_dir + i] for i in range(n_dir)], dim=1)
        return seq, attn


class AttentionCNNRNN(nn.Module):
    """Attention CNN-RNN classifier: ``(B, S, C, H, W)`` slices (+ clinical ``(B, n)``) -> logits."""

    def __init__(
        self,
        *,
        backbone: str = "resnext50_32x4d",
        in_chans: int = 1,
        width: int | None = None,
        pretrained_path: str | Path | None = None,
        attention: bool = True,
        hidden_size: int = 256,
        num_layers: int = 1,
        bidirectional: bool = False,
        n_classes: int = 1,
        n_clinical: int = 0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if n_classes < 1 or n_clinical < 0:
            raise ValueError(f"need n_classes >= 1 and n_clinical >= 0, got {n_classes}, {n_clinical}")
        self.trunk = SliceSequenceEncoder(
            backbone=backbone,
            in_chans=in_chans,
            width=width,
            pretrained_path=pretrained_path,
            attention=attention,
            hidden_size=hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            rnn_dropout=dropout,
        )
        self.n_classes = n_classes
        self.n_clinical = n_clinical
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.trunk.out_features + n_clinical, n_classes)

    @property
    def gradcam_layer(self) -> nn.Module:
        """Deepest convolutional stage, the usual Grad-CAM target."""
        return self.trunk.encoder.layer4

    def forward(
        self, x: Tensor, clinical: Tensor | None = None, *, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Logits ``(B,)`` (``n_classes == 1``) or ``(B, n_classes)``; optionally the attention maps."""
        seq, attn = self.trunk(x)
        seq = self.dropout(seq)
        if self.n_clinical:
            if clinical is None or clinical.shape[-1] != self.n_clinical:
                got = None if clinical is None else tuple(clinical.shape)
                raise ValueError(f"model expects clinical (B, {self.n_clinical}), got {got}")
            seq = torch.cat([seq, clinical.to(seq.dtype)], dim=1)
        elif clinical is not None:
            raise ValueError("clinical given but model was built with n_clinical=0")
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.classifier(seq.float())
        if self.n_classes == 1:
            logits = logits.squeeze(1)
        return (logits, attn) if return_attention else logits


def cnn_rnn(**kwargs: Any) -> AttentionCNNRNN:
    """Paper setting: ResNeXt-50 32x4d slice encoder, attention after layer3, GRU, 1 logit."""
    return AttentionCNNRNN(**kwargs)


def cnn_rnn_tiny(**kwargs: Any) -> AttentionCNNRNN:
    """Same architecture with a narrow 4-block ResNet and a 16-unit GRU, for tests and smoke runs."""
    return AttentionCNNRNN(**{**CNN_RNN_TINY, **kwargs})
