"""`raypipe preprocess xray`: manifest -> Parquet shards of aligned L1-L5 inputs + qc.csv, with Ray Data.

Mirrors `raypipe.data.ct_pipeline` (same layout, shard naming, idempotence and QC-part completion marks):
  part-00000-<hash>.parquet  one row per usable study: patient_id, study_id, `image` (float16 C x 384 x 384),
                             `keypoints` (float32 5 x 2, original pixels, x = column), `keypoints_source`
                             (manifest | model), `keypoint_confidence` (NaN for manifest keypoints), and the
                             manifest's label and clinical columns
  _qc/part-00000-<hash>.csv  the shard's QC rows; written last, so it marks the shard complete
  qc.csv                     one row per XR study (status ok | skipped | error, keypoints source, confidence,
                             warnings, the plausibility problems when skipped)
  shards.json, config.yaml   as for CT

Keypoints come from the manifest's `keypoints_path` when given, else from the configured keypoint model
(`keypoint_model_path`: a state_dict of `keypoint_model_name` from the model registry, loaded once per
worker), else the study is skipped ("no keypoints and no keypoint model configured"). Implausible
keypoints (`check_keypoints`) skip the study with the problems in QC; they are never used silently.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
import pandas as pd

from raypipe import storage
from raypipe.config import load_config
from raypipe.data.qc_pictures import PICTURE_KEY
from raypipe.data.shards import (
    QC_DIR, ShardSpec, load_shards, read_modality_rows, run_shards, scalar_columns, strip_inputs, tensor_column,
)
from raypipe.io.errors import RaypipeInputError
from raypipe.preprocess.config import XrayPreprocessConfig

log = logging.getLogger(__name__)

NO_KEYPOINTS = "no keypoints and no keypoint model configured"
QC_COLUMNS = (
    "patient_id", "study_id", "status", "message", "warnings", "keypoints_source", "keypoint_confidence",
    "variant", "channels", "image_rows", "image_cols", "pixel_spacing_mm", "photometric", "mean_spacing_px",
    "seconds", "image_path", "keypoints_path", "shard", "qc_png",
)
__all__ = ["QC_DIR", "QC_COLUMNS", "NO_KEYPOINTS", "load_xray_shards", "preprocess_xray", "process_study"]


def read_xray_manifest(manifest: str | os.PathLike) -> pd.DataFrame:
    """XR rows of a validated manifest, paths made absolute; missing files are left to per-study QC."""
    return read_modality_rows(manifest, "XR")


# ------------------------------------------------------------------------------------ keypoint model

_MODELS: dict[tuple[str, str, str, int], Any] = {}


class KeypointPredictor:
    """A registry keypoint model (HRNet heatmaps) applied to a whole radiograph, in original pixels."""

    def __init__(self, name: str, weights: str, model_config: dict[str, Any] | None = None, input_size: int = 384):
        import torch

        from raypipe.models.registry import build_model

        self.input_size = int(input_size)
        self.model = build_model(name, **(model_config or {}))
        with storage.localize(weights) as local:  # weights on an object store: fetched for the load
            state = torch.load(local, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self.model.load_state_dict(state)
        self.model.eval()
        self.stride = float(getattr(self.model, "stride", 4))
        self.in_chans = int((model_config or {}).get("in_chans", 1))

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(xy (5, 2), confidence (5,)): zero-pad to a square, resize to the input size, decode heatmaps."""
        import torch

        from raypipe.preprocess.xray import antialias, sample_affine

        h, w = pixels.shape
        side = float(max(h, w))
        k = side / self.input_size  # source pixels per input pixel (pixel centres at (u + 0.5) * k - 0.5)
        inv = np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5], [0, 0, 1]])
        x, _ = sample_affine(antialias(np.asarray(pixels, np.float32), k), inv, (self.input_size, self.input_size))
        t = torch.from_numpy(x)[None, None].repeat(1, self.in_chans, 1, 1)
        with torch.inference_mode():
            heat = self.model(t)
        coords, conf = self.model.decode(heat.float())
        uv = coords[0].numpy().astype(np.float64)
        return (uv + 0.5) * k - 0.5, conf[0].numpy().astype(np.float64)


def keypoint_predictor(cfg: XrayPreprocessConfig) -> KeypointPredictor | None:
    """The configured keypoint model, built once per process (Ray workers reuse it across studies)."""
    if not cfg.keypoint_model_path:
        return None
    key = (cfg.keypoint_model_name, cfg.keypoint_model_path, json.dumps(cfg.keypoint_model_config, sort_keys=True),
           cfg.keypoint_input_size)
    if key not in _MODELS:
        if not storage.is_file(cfg.keypoint_model_path):
            raise RaypipeInputError("keypoint model weights not found", path=cfg.keypoint_model_path,
                                    field="keypoint_model_path")
        log.info("loading keypoint model %s from %s", cfg.keypoint_model_name, cfg.keypoint_model_path)
        _MODELS[key] = KeypointPredictor(cfg.keypoint_model_name, cfg.keypoint_model_path,
                                         cfg.keypoint_model_config, cfg.keypoint_input_size)
    return _MODELS[key]


# ------------------------------------------------------------------------------------------ one study


def study_keypoints(row: dict[str, Any], pixels: np.ndarray, cfg: XrayPreprocessConfig) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(xy, confidence or None, source) from the manifest's keypoints_path, else the keypoint model."""
    from raypipe.io.keypoints import read_keypoints

    path = row.get("keypoints_path")
    if path:
        kp = read_keypoints(path)
        return kp.xy, kp.confidence, "manifest"
    model = keypoint_predictor(cfg)
    if model is None:
        raise RaypipeInputError(NO_KEYPOINTS, field="keypoints_path")
    xy, conf = model(pixels)
    return xy, conf, "model"


def process_study(row: dict[str, Any], cfg: XrayPreprocessConfig) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(shard record or None, QC row) for one manifest row; input problems become QC, never exceptions."""
    from raypipe.io.radiograph import read_radiograph
    from raypipe.preprocess.xray import preprocess_radiograph

    t0 = time.perf_counter()
    qc: dict[str, Any] = {c: None for c in QC_COLUMNS}
    qc.update(patient_id=row.get("patient_id"), study_id=row.get("study_id"), image_path=row.get("image_path"),
              keypoints_path=row.get("keypoints_path"), warnings="", message="", keypoints_source="",
              variant=cfg.variant)
    record = None
    warnings: list[str] = []
    rad = xy = arr = info = None
    try:
        image = row.get("image_path")
        if not image or not storage.exists(image):
            raise RaypipeInputError("image not found", path=str(image), field="image_path")
        rad = read_radiograph(image)
        qc.update(image_rows=rad.shape[0], image_cols=rad.shape[1], photometric=rad.photometric,
                  pixel_spacing_mm="" if rad.pixel_spacing is None else "x".join(f"{s:.4g}" for s in rad.pixel_spacing))
        if rad.pixel_spacing is None:
            warnings.append("no usable pixel spacing: keypoint spacing checked in pixels only")
        xy, conf, source = study_keypoints(row, rad.pixels, cfg)
        qc["keypoints_source"] = source
        if conf is not None and np.isfinite(conf).any():
            qc["keypoint_confidence"] = round(float(np.nanmin(conf)), 4)
            if np.nanmin(conf) < cfg.min_keypoint_confidence:
                warnings.append(f"low keypoint confidence {np.nanmin(conf):.3f} (< {cfg.min_keypoint_confidence:g})")
        arr, info = preprocess_radiograph(rad, xy, cfg)
        warnings += info["warnings"]
        qc.update(status="ok", channels=info["channels"], mean_spacing_px=round(info["mean_spacing_px"], 2))
        record = strip_inputs(row)
        record.update(image=arr, keypoints=np.asarray(xy, np.float32), keypoints_source=source,
                      keypoint_confidence=float(qc["keypoint_confidence"]) if qc["keypoint_confidence"] is not None else math.nan)
    except RaypipeInputError as e:
        qc.update(status="skipped", message=str(e))
    except Exception as e:  # noqa: BLE001 - one bad study must not stop a cohort run
        log.exception("study %s failed", row.get("study_id"))
        qc.update(status="error", message=f"{type(e).__name__}: {e} (image {row.get('image_path')})")
    qc["warnings"] = "; ".join(warnings)
    if cfg.qc_pictures and rad is not None:
        qc[PICTURE_KEY] = _picture(rad.pixels, xy, arr, info, qc)
    qc["seconds"] = round(time.perf_counter() - t0, 3)
    return record, qc


def _picture(pixels: np.ndarray, xy: np.ndarray | None, arr: np.ndarray | None, info: dict[str, Any] | None,
             qc: dict[str, Any]) -> bytes | None:
    """The study's QC picture (`raypipe.preprocess.qc_png`); None, with a log line, if drawing fails."""
    from raypipe.preprocess.qc_png import xray_qc_picture

    try:
        return xray_qc_picture(pixels, xy, arr, (info or {}).get("corners_px", ()),
                               title=f"{qc['study_id']}  [{qc['status']}]  {qc.get('variant') or ''}",
                               problem=qc["message"] or qc["warnings"] or None)
    except Exception:  # noqa: BLE001 - a picture must never cost a study
        log.warning("QC picture of study %s failed", qc["study_id"], exc_info=True)
        return None


# ------------------------------------------------------------------------------------------- shards


def records_to_table(records: list[dict[str, Any]], schema: Any) -> Any:
    """Shard rows -> Arrow table: manifest columns + float16 image / float32 keypoints tensor columns."""
    import pyarrow as pa

    cols = scalar_columns(records, schema)
    cols["image"] = tensor_column(r["image"] for r in records)
    cols["keypoints"] = tensor_column(r["keypoints"] for r in records)
    cols["keypoints_source"] = pa.array([r["keypoints_source"] for r in records], type=pa.string())
    cols["keypoint_confidence"] = pa.array([r["keypoint_confidence"] for r in records], type=pa.float64())
    return pa.table(cols)


def qc_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """QC rows in the documented column order."""
    return pd.DataFrame(rows, columns=list(QC_COLUMNS))


def _study_key(r: dict[str, Any]) -> str:
    return f"{r['study_id']}|{r.get('image_path')}|{r.get('keypoints_path')}"


def warm_up(cfg: XrayPreprocessConfig) -> None:
    """Import what `process_study` needs, once per writer actor; the keypoint model loads on first use."""
    import raypipe.io.keypoints  # noqa: F401
    import raypipe.io.radiograph  # noqa: F401
    import raypipe.preprocess.xray  # noqa: F401

    if cfg.qc_pictures:
        import raypipe.preprocess.qc_png  # noqa: F401


XRAY_SPEC = ShardSpec(kind="X-ray", config_cls=XrayPreprocessConfig, process_study=process_study,
                      records_to_table=records_to_table, qc_frame=qc_frame, study_key=_study_key, warm_up=warm_up)


def preprocess_xray(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: XrayPreprocessConfig | None = None,
    config_path: str | os.PathLike | None = None,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Preprocess every XR study of a manifest into shards + qc.csv (layout: `raypipe.data.shards`)."""
    cfg = config or (load_config(XrayPreprocessConfig, config_path) if config_path else XrayPreprocessConfig())
    return run_shards(XRAY_SPEC, read_xray_manifest(manifest), out, cfg, use_ray=use_ray,
                      extra_summary={"variant": cfg.variant, "channels": cfg.channels()})


def load_xray_shards(path: str | os.PathLike, backend: str = "ray", columns: list[str] | None = None) -> Any:
    """X-ray shards for training: a `ray.data.Dataset` (backend="ray") or pandas with ndarray cells."""
    return load_shards(path, backend=backend, columns=columns)
