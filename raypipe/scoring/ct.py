"""CT fracture scoring without Ray: CT + vertebra masks + clinical -> 5-year fracture probability.

Split in two so Serve can scale them apart: `CTPreprocessor` (reads files, crops T12-L4, samples the
14 centred slices; no weights) and `CTPredictor` (the published CNN-RNN; `predict_batch` runs many
studies in one forward pass). What the model needs to know about its inputs (bone or bone_muscle crops,
slice count, clinical means/SDs) comes from the run folder the CT trainer wrote (model_meta.json,
config.yaml, preprocess.yaml), so serving cannot drift from training.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raypipe.preprocess.config import LEVEL_ORDER, CTPreprocessConfig
from raypipe.registry import ModelVersion
from raypipe.scoring.common import (
    ClinicalStandardiser,
    build_module,
    model_info,
    open_version,
    png_bytes,
    stack_optional,
)

log = logging.getLogger(__name__)

MASK_NAMES_EXTRA = ("vertebral_body", "autochthon_left", "autochthon_right")


@dataclass
class CTInput:
    """One preprocessed study: model slices (S, 1, H, W) float32, standardised clinical vector, QC."""

    x: np.ndarray
    clinical: np.ndarray | None
    qc: dict[str, Any]


@dataclass
class CTPrediction:
    """Fracture probability (5-year) with the model version, QC and optional Grad-CAM PNGs (one per slice)."""

    probability: float
    model: dict[str, Any]
    qc: dict[str, Any]
    gradcam_png: list[bytes] = field(default_factory=list)


def _preprocess_config(version: ModelVersion) -> CTPreprocessConfig:
    """The CT preprocessing the model was trained with (preprocess.yaml), else the paper's defaults."""
    raw = version.preprocess or {}
    known = {k: v for k, v in raw.items() if k in CTPreprocessConfig.model_fields}
    try:
        return CTPreprocessConfig.model_validate(known)
    except Exception as e:  # noqa: BLE001 - a model whose preprocess.yaml is for another branch
        log.warning("model %s %s: preprocess.yaml not a CT config (%s); using defaults", version.name, version.version, e)
        return CTPreprocessConfig()


class CTPreprocessor:
    """Files -> `CTInput` for one published CT model (input kind, slice count and clinical block from its metadata)."""

    def __init__(self, version: ModelVersion) -> None:
        self.version = version
        meta, cfg = version.meta, version.config
        self.input_kind: str = str(meta.get("input") or cfg.get("input") or "bone_muscle")
        if self.input_kind not in ("bone", "bone_muscle"):
            raise ValueError(f"model input {self.input_kind!r} is not bone or bone_muscle")
        self.n_slices = int(meta.get("n_slices") or cfg.get("n_slices") or 14)
        self.config = _preprocess_config(version)
        self.clinical = ClinicalStandardiser.from_meta(meta)

    @classmethod
    def from_registry(cls, registry: str | Path, name: str = "ct", version: str = "latest") -> "CTPreprocessor":
        """Metadata only: no weights are loaded, so preprocessing replicas stay light."""
        return cls(open_version(registry, name, version))

    def from_arrays(self, ct: Any, masks: Mapping[str, np.ndarray], body_mask: np.ndarray | None,
                    clinical: Mapping[str, Any] | None) -> CTInput:
        """Already-read CT + masks -> model input (crops, 14 centred slices, standardised clinical)."""
        from raypipe.preprocess.ct import preprocess_ct_study, sample_slices

        arrays, qc = preprocess_ct_study(ct, masks, body_mask, self.config)
        stack = np.asarray(arrays[self.input_kind], dtype=np.float32)
        idx = sample_slices(stack.shape[0], self.n_slices)
        vec, missing = self.clinical.vector(clinical)
        qc = {**qc, "input": self.input_kind, "slices_used": [str(arrays["slice_level"][i]) for i in idx],
              "clinical_missing": missing}
        return CTInput(x=stack[idx][:, None], clinical=vec, qc=_plain(qc))

    def from_files(self, ct_path: str | Path, masks_path: str | Path, body_mask_path: str | Path | None = None,
                   mask_labels: str | None = None, clinical: Mapping[str, Any] | None = None) -> CTInput:
        """CT (DICOM folder or NIfTI) + masks (TotalSegmentator folder or multilabel NIfTI) -> model input."""
        from raypipe.io.ct import read_ct
        from raypipe.io.masks import read_body_mask, read_masks

        ct = read_ct(ct_path)
        names = [f"vertebrae_{lvl}" for lvl in LEVEL_ORDER] + list(MASK_NAMES_EXTRA)
        masks = read_masks(masks_path, ct, labels=mask_labels, names=names)
        body = read_body_mask(body_mask_path, ct) if body_mask_path else None
        return self.from_arrays(ct, masks, body, clinical)


def _plain(obj: Any) -> Any:
    """JSON-safe copy of a QC value (numpy scalars/arrays -> Python)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class CTPredictor:
    """A published CT CNN-RNN: batched 5-year fracture probabilities (+ Grad-CAM on request)."""

    def __init__(self, version: ModelVersion, threads: int | None = None) -> None:
        self.version = version
        self.preprocessor = CTPreprocessor(version)
        self.model = build_module(version, threads)
        self.info = model_info(version)
        meta = version.meta
        self.horizons = list(meta.get("horizons_years") or [])
        self.score_kind = str(meta.get("score_kind") or "probability")
        self.device = "cpu"

    def to(self, device: str) -> "CTPredictor":
        """Move the model to `device` (e.g. "cuda" on a GPU replica); inputs follow it in `predict_batch`."""
        self.model.to(device)
        self.device = device
        return self

    @classmethod
    def from_registry(cls, registry: str | Path, name: str = "ct", version: str = "latest",
                      threads: int | None = None) -> "CTPredictor":
        """Load the named version (checksums verified, weights_only=True)."""
        return cls(open_version(registry, name, version), threads)

    def preprocess(self, ct_path: str | Path, masks_path: str | Path, body_mask_path: str | Path | None = None,
                   mask_labels: str | None = None, clinical: Mapping[str, Any] | None = None) -> CTInput:
        """Files -> `CTInput` (see `CTPreprocessor.from_files`)."""
        return self.preprocessor.from_files(ct_path, masks_path, body_mask_path, mask_labels, clinical)

    def _probabilities(self, out: Any) -> Any:
        """Model output -> 5-year probability: sigmoid of the logit, or of the multitask 5-year head."""
        import torch

        if isinstance(out, dict):
            j = self.horizons.index(5) if 5 in self.horizons else len(self.horizons) - 1
            return torch.sigmoid(out["risk_logits"][:, j].float())
        return torch.sigmoid(out.float().reshape(out.shape[0], -1)[:, 0])

    def predict_batch(self, inputs: Sequence[CTInput], gradcam: Sequence[bool] | bool = False) -> list[CTPrediction]:
        """Score many preprocessed studies in one forward pass; Grad-CAM only for those that ask."""
        import torch

        if not inputs:
            return []
        want = [bool(gradcam)] * len(inputs) if isinstance(gradcam, bool) else [bool(g) for g in gradcam]
        dev = self.device
        x = torch.from_numpy(np.stack([i.x for i in inputs]).astype(np.float32)).to(dev)
        cl = stack_optional([i.clinical for i in inputs])
        clinical = None if cl is None else torch.from_numpy(cl).to(dev)
        with torch.inference_mode():
            prob = self._probabilities(self.model(x, clinical)).cpu().numpy()
        preds = [CTPrediction(float(p), self.info, i.qc) for p, i in zip(prob, inputs)]
        for k, (inp, pred) in enumerate(zip(inputs, preds)):
            if want[k]:
                pred.gradcam_png = self.gradcam(inp)
        return preds

    def predict(self, inp: CTInput, gradcam: bool = False) -> CTPrediction:
        """One study (a batch of one)."""
        return self.predict_batch([inp], gradcam)[0]

    def gradcam(self, inp: CTInput) -> list[bytes]:
        """One PNG per model slice: the crop with the Grad-CAM heatmap of the 5-year score overlaid."""
        import torch

        from raypipe.explain.gradcam import grad_cam, overlay

        layer = getattr(self.model, "gradcam_layer", None)
        if layer is None:
            return []
        x = torch.from_numpy(inp.x[None].astype(np.float32)).to(self.device)
        kw = {} if inp.clinical is None else {"clinical": torch.from_numpy(inp.clinical[None]).to(self.device)}
        cams = grad_cam(self.model, layer, x, target=lambda out: self._logit(out), **kw)[0].cpu().numpy()
        return [png_bytes(overlay(inp.x[s, 0], cams[s])) for s in range(cams.shape[0])]

    def _logit(self, out: Any) -> Any:
        """Per-sample score that Grad-CAM explains (the logit behind the 5-year probability)."""
        if isinstance(out, dict):
            j = self.horizons.index(5) if 5 in self.horizons else len(self.horizons) - 1
            return out["risk_logits"][:, j]
        return out.reshape(out.shape[0], -1)[:, 0]
