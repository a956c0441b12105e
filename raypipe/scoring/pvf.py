"""Ray-free pVF scoring: load a `raypipe train pvf` folder (or registry version) and score radiographs.

The preprocessing parameters travel in ``model_meta.json`` (``preprocess``), so a generated image is
scored exactly as the classifier's training images were prepared (`raypipe.preprocess.pvf.pvf_input`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raypipe.preprocess.pvf import PVFPreprocess

__all__ = ["PVFScorer", "load_pvf"]


@dataclass
class PVFScorer:
    """A pVF classifier with its preprocessing: [0, 1] bone-bright images in, pVF scores in [0, 1] out."""

    model: nn.Module
    preprocess: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16

    def inputs(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Classifier inputs (N, 1, rows, cols) for a list of 2-D images."""
        prepare = PVFPreprocess.from_dict(self.preprocess)
        arrays = [prepare(img) for img in images]
        return torch.from_numpy(np.stack(arrays))

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """pVF score per image (float64)."""
        device = next(self.model.parameters()).device
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            x = self.inputs(images[start:start + self.batch_size]).to(device)
            out.append(torch.sigmoid(self.model(x).float()).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def load_pvf(model_dir: str | Path, device: str | torch.device = "cpu") -> PVFScorer:
    """Rebuild the classifier from ``model_meta.json`` (builder + kwargs) and ``model.pt`` (weights_only)."""
    from raypipe.artifact import read_artifact
    from raypipe.models.registry import build_model

    from raypipe import storage

    with storage.localize_files(storage.absolute(model_dir), ("model.pt", "model_meta.json")) as local:
        art = read_artifact(local)
        model = build_model(art.builder, **art.inference_kwargs())
        model.load_state_dict(torch.load(Path(local) / "model.pt", map_location="cpu", weights_only=True))
    return PVFScorer(model.to(device).eval(), dict(art.preprocess))
