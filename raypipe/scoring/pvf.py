"""Ray-free pVF scoring: load a `raypipe train pvf` folder (or registry version) and score radiographs.

The age regressor of `raypipe train age` is the same network and input with its output read as years
(`AgeScorer`, `load_age_regressor`); Diff-X generation uses it for the thesis's age check.

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

__all__ = ["AgeScorer", "PVFScorer", "load_age_regressor", "load_network", "load_pvf"]


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
    def outputs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The network's raw output per image (float64): the pVF logit, or the age regressor's standardised age."""
        device = next(self.model.parameters()).device
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            x = self.inputs(images[start:start + self.batch_size]).to(device)
            out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """pVF score per image (float64)."""
        logits = torch.from_numpy(self.outputs(images).astype(np.float32))  # float32 sigmoid, as trained
        return torch.sigmoid(logits).numpy().astype(np.float64)


@dataclass
class AgeScorer(PVFScorer):
    """The age regressor (`raypipe train age`): the pVF network and input, its output read as age in years."""

    target_mean: float = 0.0
    target_sd: float = 1.0

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted age in years per image (float64)."""
        return self.target_mean + self.target_sd * self.outputs(images)


def load_network(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The network of a pVF-family run folder or registry version (eval mode, weights_only) and its `RunArtifact`."""
    from raypipe.artifact import read_artifact
    from raypipe.models.registry import build_model

    from raypipe import storage

    with storage.localize_files(storage.absolute(model_dir), ("model.pt", "model_meta.json")) as local:
        art = read_artifact(local)
        model = build_model(art.builder, **art.inference_kwargs())
        model.load_state_dict(torch.load(Path(local) / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval(), art


def load_pvf(model_dir: str | Path, device: str | torch.device = "cpu") -> PVFScorer:
    """Rebuild the classifier from ``model_meta.json`` (builder + kwargs) and ``model.pt`` (weights_only)."""
    model, art = load_network(model_dir, device)
    return PVFScorer(model, dict(art.preprocess))


def load_age_regressor(model_dir: str | Path, device: str | torch.device = "cpu") -> AgeScorer:
    """An age regressor written by `raypipe train age` (its ``target_scale`` turns outputs into years)."""
    from raypipe.io.errors import RaypipeInputError

    model, art = load_network(model_dir, device)
    scale = art.setting("target_scale")
    if art.task != "age" or not isinstance(scale, dict) or not {"mean", "sd"} <= set(scale):
        raise RaypipeInputError(f"not an age regressor (task {art.task!r}; `raypipe train age` writes task 'age' "
                                "and target_scale)", path=str(model_dir), field="task", value=art.task)
    return AgeScorer(model, dict(art.preprocess), target_mean=float(scale["mean"]), target_sd=float(scale["sd"]))
