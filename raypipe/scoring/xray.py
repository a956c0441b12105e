"""Radiograph scoring without Ray: DeepSurv log-risk and S(t), pVF score, and keypoints when none are given.

`XrayPreprocessor` turns a radiograph (+ optional L1-L5 keypoints) into the DeepSurv input (aligned
patches, papers/001) and the pVF classifier input (papers/004); keypoints come from the published
keypoint model when the request has none, and implausible keypoints are refused (`KeypointsError`, a
`RaypipeInputError` -> 422) rather than scored. `XrayPredictor` and `PVFPredictor` run batches.
S(t) uses the Breslow baseline hazard the DeepSurv trainer stores in model_meta.json.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.io.errors import RaypipeInputError
from raypipe.preprocess.config import XrayPreprocessConfig
from raypipe.registry import ModelVersion
from raypipe.scoring.common import (
    DAYS_PER_YEAR,
    ClinicalStandardiser,
    build_module,
    builder_of,
    model_info,
    open_version,
    stack_optional,
)

if TYPE_CHECKING:
    from raypipe.metrics.survival import BreslowBaseline

log = logging.getLogger(__name__)

SURVIVAL_YEARS: tuple[int, ...] = tuple(range(1, 11))
BASELINE_KEYS = ("baseline_hazard", "breslow_baseline", "breslow", "baseline")
NO_KEYPOINTS = "no keypoints given and no keypoint model is published: send L1-L5 keypoints (JSON)"


class KeypointModelUnavailable(RaypipeInputError):
    """Keypoints are needed from the model but none is published (the endpoint answers 503)."""


@dataclass
class XrayInput:
    """One preprocessed radiograph: DeepSurv image (C, H, W), pVF image (1, H, W), clinical vector, keypoints, QC."""

    image: np.ndarray | None
    pvf_image: np.ndarray | None
    clinical: np.ndarray | None
    keypoints: dict[str, list[float]]
    keypoints_source: str
    qc: dict[str, Any]


@dataclass
class XrayPrediction:
    """DeepSurv output for one radiograph: log-risk, S(t) for t = 1..10 years, 5-year risk."""

    log_risk: float
    survival: dict[str, float] | None
    risk_5y: float | None
    model: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _xray_config(version: ModelVersion | None) -> XrayPreprocessConfig:
    """The radiograph preprocessing a DeepSurv model was trained with (preprocess.yaml), else the paper's."""
    if version is None:
        return XrayPreprocessConfig()
    raw = {k: v for k, v in (version.preprocess or {}).items() if k in XrayPreprocessConfig.model_fields}
    return XrayPreprocessConfig.model_validate(raw)


def baseline_from_meta(meta: Mapping[str, Any]) -> BreslowBaseline | None:
    """The Breslow baseline (time in days, cumulative hazard, offset) stored with a DeepSurv model, if any."""
    from raypipe.metrics.survival import BreslowBaseline

    for key in BASELINE_KEYS:
        b = meta.get(key)
        if isinstance(b, Mapping) and "time" in b and "cumulative_hazard" in b:
            return BreslowBaseline(np.asarray(b["time"], dtype=np.float64),
                                   np.asarray(b["cumulative_hazard"], dtype=np.float64), float(b.get("offset", 0.0)))
    return None


def uses_image(version: ModelVersion) -> bool:
    """False for a clinical-only DeepSurv (built with backbone=None), which takes no image."""
    _, kwargs = builder_of(version)
    return not ("backbone" in kwargs and kwargs["backbone"] is None)


class KeypointModel:
    """A published L1-L5 keypoint model applied to a whole radiograph (the X-ray pipeline's predictor)."""

    def __init__(self, version: ModelVersion, threads: int | None = None) -> None:
        from raypipe.data.xray_pipeline import KeypointPredictor

        if threads:
            import torch

            torch.set_num_threads(int(threads))
        builder, kwargs = builder_of(version)
        size = int(version.meta.get("input_size") or (version.preprocess or {}).get("keypoint_input_size") or 384)
        self.version = version
        self.info = model_info(version)
        self.predictor = KeypointPredictor(builder, str(version.path / "model.pt"), kwargs, size)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(xy (5, 2) in original pixels, confidence (5,))."""
        return self.predictor(pixels)


class XrayPreprocessor:
    """Radiograph file + keypoints -> `XrayInput` for the published DeepSurv and pVF models (metadata only)."""

    def __init__(self, xray: ModelVersion | None, pvf: ModelVersion | None = None,
                 keypoints: KeypointModel | None = None) -> None:
        self.xray, self.pvf, self.keypoint_model = xray, pvf, keypoints
        self.config = _xray_config(xray)
        self.clinical = ClinicalStandardiser.from_meta(xray.meta) if xray is not None else ClinicalStandardiser()
        self.uses_image = xray is not None and uses_image(xray)
        self.pvf_size = PVFPredictor.input_size(pvf) if pvf is not None else None

    def keypoints_for(self, rad: Any, keypoints: Mapping[str, Any] | None) -> tuple[np.ndarray, str, list[float] | None]:
        """(xy, source, confidence): the request's keypoints, else the keypoint model's."""
        from raypipe.io.keypoints import parse_keypoints

        if keypoints is not None:
            kp = parse_keypoints(keypoints, "keypoints")
            return kp.xy, "request", None
        if self.keypoint_model is None:
            raise KeypointModelUnavailable(NO_KEYPOINTS, field="keypoints")
        xy, conf = self.keypoint_model(rad.pixels)
        return xy, "model", [float(c) for c in conf]

    def from_radiograph(self, rad: Any, keypoints: Mapping[str, Any] | None = None,
                        clinical: Mapping[str, Any] | None = None, need_survival: bool = True) -> XrayInput:
        """Read radiograph -> DeepSurv input (keypoints checked first) and pVF input."""
        from raypipe.io.keypoints import LEVELS
        from raypipe.preprocess.pvf import PVFPreprocess, pvf_input
        from raypipe.preprocess.xray import preprocess_radiograph

        image, qc, vec, missing = None, {}, None, []
        kp_used: dict[str, list[float]] = {}
        source = "none"
        if need_survival and self.xray is not None and not self.uses_image:  # clinical-only DeepSurv
            vec, missing = self.clinical.vector(clinical)
        elif need_survival and self.xray is not None:
            xy, source, conf = self.keypoints_for(rad, keypoints)
            kp_used = {lvl: [float(x), float(y)] for lvl, (x, y) in zip(LEVELS, xy)}
            img, qc = preprocess_radiograph(rad, xy, self.config)  # KeypointsError when implausible
            image = np.asarray(img, dtype=np.float32)
            vec, missing = self.clinical.vector(clinical)
            if conf is not None:
                qc = {**qc, "keypoint_confidence": conf}
                low = [lvl for lvl, c in zip(LEVELS, conf) if c < self.config.min_keypoint_confidence]
                if low:
                    qc.setdefault("warnings", []).append(f"low keypoint confidence: {', '.join(low)}")
        pvf_img = None
        if self.pvf is not None:
            prepare = PVFPreprocess.from_dict(self.pvf.meta.get("preprocess"))
            pvf_img = pvf_input(rad.pixels, self.pvf_size, clip_limit=prepare.clip_limit, tiles=prepare.tiles,
                                mean=prepare.mean, std=prepare.std)
        qc = {**{k: v for k, v in qc.items() if isinstance(v, (int, float, str, bool, list, type(None)))},
              "image_shape": list(rad.shape), "pixel_spacing_mm": list(rad.pixel_spacing) if rad.pixel_spacing else None,
              "clinical_missing": missing}
        return XrayInput(image, pvf_img, vec, kp_used, source, qc)

    def from_file(self, image_path: str | Path, keypoints: Mapping[str, Any] | None = None,
                  clinical: Mapping[str, Any] | None = None, need_survival: bool = True) -> XrayInput:
        """A DICOM/PNG radiograph file -> `XrayInput`."""
        from raypipe.io.radiograph import read_radiograph

        return self.from_radiograph(read_radiograph(image_path), keypoints, clinical, need_survival)


class XrayPredictor:
    """A published radiograph DeepSurv model: log-risk, S(t) for 1..10 years and the 5-year risk."""

    def __init__(self, version: ModelVersion, keypoints: KeypointModel | None = None, pvf: ModelVersion | None = None,
                 threads: int | None = None) -> None:
        from raypipe.registry import RegistryError

        head = version.meta.get("head", "cox")
        if head != "cox":
            raise RegistryError(f"only Cox-head DeepSurv models are served (this one has head {head!r})",
                                path=str(version.path), field="head")
        self.version = version
        self.model = build_module(version, threads)
        self.info = model_info(version)
        self.baseline = baseline_from_meta(version.meta)
        self.uses_image = uses_image(version)
        self.image_size = version.meta.get("image_size")  # the trainer resizes shard images on the fly to this
        self.preprocessor = XrayPreprocessor(version, pvf, keypoints)
        self.device = "cpu"

    def to(self, device: str) -> "XrayPredictor":
        """Move the model to `device` (e.g. "cuda" on a GPU replica); inputs follow it in `predict_batch`."""
        self.model.to(device)
        self.device = device
        return self

    @classmethod
    def from_registry(cls, registry: str | Path, name: str = "xray", version: str = "latest",
                      keypoints_name: str | None = "keypoints", threads: int | None = None) -> "XrayPredictor":
        """Load the DeepSurv model and, when published, the keypoint model used for requests without keypoints."""
        from raypipe.registry import list_versions

        kp = None
        if keypoints_name and list_versions(registry, keypoints_name):
            kp = KeypointModel(open_version(registry, keypoints_name), threads)
        return cls(open_version(registry, name, version), kp, None, threads)

    def preprocess(self, image_path: str | Path, keypoints: Mapping[str, Any] | None = None,
                   clinical: Mapping[str, Any] | None = None) -> XrayInput:
        """File -> `XrayInput` (see `XrayPreprocessor`)."""
        return self.preprocessor.from_file(image_path, keypoints, clinical)

    def survival(self, log_risk: float) -> tuple[dict[str, float] | None, float | None]:
        """S(t) at 1..10 years and the 5-year risk from the stored Breslow baseline (None without one)."""
        if self.baseline is None:
            return None, None
        s = self.baseline.survival([log_risk], [y * DAYS_PER_YEAR for y in SURVIVAL_YEARS])[0]
        surv = {str(y): float(v) for y, v in zip(SURVIVAL_YEARS, s)}
        return surv, float(1.0 - surv["5"])

    def predict_batch(self, inputs: Sequence[XrayInput]) -> list[XrayPrediction]:
        """Log-risk for many radiographs in one forward pass, then S(t) per patient."""
        import torch

        if not inputs:
            return []
        import torch.nn.functional as F

        x = None
        if self.uses_image:
            x = torch.from_numpy(np.stack([i.image for i in inputs]).astype(np.float32)).to(self.device)
            if self.image_size and tuple(x.shape[-2:]) != (int(self.image_size),) * 2:
                x = F.interpolate(x, size=(int(self.image_size),) * 2, mode="bilinear", align_corners=False,
                                  antialias=True)
        cl = stack_optional([i.clinical for i in inputs])
        with torch.inference_mode():
            r = self.model(x, None if cl is None else torch.from_numpy(cl).to(self.device)).float().cpu().numpy()
        out = []
        for lr in r:
            surv, risk5 = self.survival(float(lr))
            warn = [] if surv is not None else ["model has no Breslow baseline: survival not available"]
            out.append(XrayPrediction(float(lr), surv, risk5, self.info, warn))
        return out

    def predict(self, inp: XrayInput) -> XrayPrediction:
        """One radiograph (a batch of one)."""
        return self.predict_batch([inp])[0]


class PVFPredictor:
    """A published pVF classifier (papers/004): pVF score in [0, 1] per radiograph."""

    def __init__(self, version: ModelVersion, threads: int | None = None) -> None:
        self.version = version
        self.model = build_module(version, threads)
        self.info = model_info(version)
        self.size = self.input_size(version)
        self.device = "cpu"

    def to(self, device: str) -> "PVFPredictor":
        """Move the model to `device` (e.g. "cuda" on a GPU replica); inputs follow it in `predict_batch`."""
        self.model.to(device)
        self.device = device
        return self

    @staticmethod
    def input_size(version: ModelVersion) -> tuple[int, int]:
        """(rows, cols) the classifier was trained on: model_meta `input_size`, preprocess.yaml `size`, else 1024 x 512."""
        from raypipe.preprocess.pvf import PVFPreprocess

        size = (version.meta.get("input_size") or (version.meta.get("preprocess") or {}).get("size")
                or (version.preprocess or {}).get("size") or PVFPreprocess().size)
        rows, cols = (int(v) for v in size)
        return rows, cols

    @classmethod
    def from_registry(cls, registry: str | Path, name: str = "pvf", version: str = "latest",
                      threads: int | None = None) -> "PVFPredictor":
        """Load the named version (checksums verified, weights_only=True)."""
        return cls(open_version(registry, name, version), threads)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Radiograph pixels in [0, 1] -> classifier input (1, rows, cols)."""
        from raypipe.preprocess.pvf import PVFPreprocess, pvf_input

        p = PVFPreprocess.from_dict(self.version.meta.get("preprocess"))  # what `raypipe train pvf` records
        return pvf_input(pixels, self.size, clip_limit=p.clip_limit, tiles=p.tiles, mean=p.mean, std=p.std)

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[float]:
        """pVF scores for many prepared inputs (1, rows, cols) in one forward pass."""
        import torch

        if not len(images):
            return []
        x = torch.from_numpy(np.stack(images).astype(np.float32)).to(self.device)
        with torch.inference_mode():
            return [float(v) for v in torch.sigmoid(self.model(x).float()).cpu().numpy()]

    def score(self, pixels: np.ndarray) -> float:
        """pVF score of one radiograph."""
        return self.predict_batch([self.prepare(pixels)])[0]
