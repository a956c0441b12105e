"""Shared pieces of the Ray-free predictors: registry loading, clinical standardisation, PNG encoding.

Batch jobs and the Serve deployments use the same predictors, so a model scores the same way offline
and online. Weights are always read through `raypipe.registry` (checksums verified, `weights_only=True`).
"""
from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raypipe.clinical import ClinicalEncoder, ClinicalValueError
from raypipe.registry import ModelVersion, load_version

log = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25




# The one clinical encoder (training and serving share it); the old names stay importable for callers.
ClinicalStandardiser = ClinicalEncoder
ClinicalInputError = ClinicalValueError


def builder_of(version: ModelVersion) -> tuple[str, dict[str, Any]]:
    """(builder name, kwargs) from the version's run artifact, without the kwargs that only matter in training."""
    art = version.artifact
    return art.builder, art.inference_kwargs()


def build_module(version: ModelVersion, threads: int | None = None) -> Any:
    """The version's nn.Module in eval mode, weights loaded with weights_only=True (via the registry)."""
    import torch

    from raypipe.models.registry import build_model

    if threads:
        torch.set_num_threads(int(threads))
    name, kwargs = builder_of(version)
    model = build_model(name, **kwargs)
    model.load_state_dict(version.load_state_dict())
    return model.eval()


def open_version(registry: str | Path, name: str, version: str = "latest") -> ModelVersion:
    """`raypipe.registry.load_version` (checksums verified); a named wrapper so every predictor opens models alike."""
    return load_version(registry, name, version)


def model_info(version: ModelVersion) -> dict[str, Any]:
    """What responses and /v1/models say about a model: name, version, builder, task, metrics."""
    builder, _ = builder_of(version)
    return {"name": version.name, "version": version.version, "builder": builder,
            "task": version.meta.get("task"), "metrics": version.metrics}


def parse_clinical(data: Any) -> dict[str, Any]:
    """Validate a decoded clinical JSON: an object of scalars (numbers, strings, booleans, null)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ClinicalInputError("clinical must be a JSON object", field="clinical")
    out: dict[str, Any] = {}
    for k, v in data.items():
        if not isinstance(k, str) or len(k) > 64:
            raise ClinicalInputError("clinical keys must be short strings", field="clinical")
        if v is not None and not isinstance(v, (int, float, str, bool)):
            raise ClinicalInputError(f"clinical.{k} must be a scalar", field=f"clinical.{k}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ClinicalInputError(f"clinical.{k} is not finite", field=f"clinical.{k}")
        out[k] = v
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of a 2-D grey image (any range; min-max scaled to 8 bit) or an RGB uint8 image."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 2 and a.dtype != np.uint8:
        a = a.astype(np.float32)
        span = float(a.max() - a.min()) if a.size else 0.0
        a = np.zeros(a.shape, np.uint8) if span <= 0 else np.round((a - a.min()) / span * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a.astype(np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class BatchRecorder:
    """Sizes of the last batches a model ran, so tests and operators can see dynamic batching work."""

    keep: int = 256
    sizes: list[int] = field(default_factory=list)

    def record(self, n: int) -> None:
        """Remember one batch size (bounded history)."""
        self.sizes.append(int(n))
        del self.sizes[: max(0, len(self.sizes) - self.keep)]


def stack_optional(items: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Stack per-sample vectors, or None when the model takes none (all None)."""
    if all(i is None for i in items):
        return None
    if any(i is None for i in items):
        raise ValueError("cannot batch samples with and without clinical input")
    return np.stack(items)  # type: ignore[arg-type]
