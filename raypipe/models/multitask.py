"""Multitask CT model (paper 002): prevalent-fracture detection and longitudinal risk from one trunk.

The attention CNN-RNN trunk of :mod:`raypipe.models.cnn_rnn` is shared. The cross-sectional head
detects a prevalent vertebral fracture (one logit, trained with BCE); the longitudinal heads give a
log-risk for the Cox partial likelihood (no bias: it cancels in the partial likelihood) and one
logit per horizon (2/3/5 years by default) for fixed-horizon risk, so the detection task shapes the
features the prediction task uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raypipe.models.cnn_rnn import CNN_RNN_TINY, SliceSequenceEncoder

__all__ = ["MultitaskCNNRNN", "multitask", "multitask_tiny"]


class MultitaskCNNRNN(nn.Module):
    """Shared slice encoder + GRU with detection and survival heads; forward returns a dict."""

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
        n_clinical: int = 0,
        horizons_years: Sequence[float] = (2.0, 3.0, 5.0),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
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
        self.n_clinical = n_clinical
        self.horizons_years = tuple(float(h) for h in horizons_years)
        feat = self.trunk.out_features
        self.dropout = nn.Dropout(dropout)
        self.prevalent_head = nn.Linear(feat, 1)
        self.risk_head = nn.Linear(feat + n_clinical, 1, bias=False)
        self.horizon_head = nn.Linear(feat + n_clinical, len(self.horizons_years))

    @property
    def gradcam_layer(self) -> nn.Module:
        """Deepest convolutional stage, the usual Grad-CAM target."""
        return self.trunk.encoder.layer4

    def forward(
        self, x: Tensor, clinical: Tensor | None = None, *, return_attention: bool = False
    ) -> dict[str, Tensor]:
        """``prevalent_logit`` (B,), ``log_risk`` (B,), ``risk_logits`` (B, len(horizons)) [+ ``attention``]."""
        seq, attn = self.trunk(x)
        seq = self.dropout(seq)
        longi = seq
        if self.n_clinical:
            if clinical is None or clinical.shape[-1] != self.n_clinical:
                got = None if clinical is None else tuple(clinical.shape)
                raise ValueError(f"model expects clinical (B, {self.n_clinical}), got {got}")
            longi = torch.cat([seq, clinical.to(seq.dtype)], dim=1)
        elif clinical is not None:
            raise ValueError("clinical given but model was built with n_clinical=0")
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = {
                "prevalent_logit": self.prevalent_head(seq.float()).squeeze(1),
                "log_risk": self.risk_head(longi.float()).squeeze(1),
                "risk_logits": self.horizon_head(longi.float()),
            }
        if return_attention and attn is not None:
            out["attention"] = attn
        return out


def multitask(**kwargs: Any) -> MultitaskCNNRNN:
    """Paper-scale multitask model: ResNeXt-50 32x4d trunk, heads for detection and 2/3/5-year risk."""
    return MultitaskCNNRNN(**kwargs)


def multitask_tiny(**kwargs: Any) -> MultitaskCNNRNN:
    """Same heads on the tiny CNN-RNN trunk, for tests and smoke runs."""
    return MultitaskCNNRNN(**{**CNN_RNN_TINY, **kwargs})
