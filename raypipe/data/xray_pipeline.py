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

import io
import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
import pandas as pd

from raypipe import storage
from raypipe.config import config_hash, dump_config, load_config
from raypipe.data.ct_pipeline import (
    QC_DIR,
    ShardPlan,
    _clean_record,
    _scalar_schema,
    _table_to_pandas,
    _warn_stale,
    shard_complete,
    shard_files,
)
from raypipe.io.errors import RaypipeInputError
from raypipe.preprocess.config import XrayPreprocessConfig

log = logging.getLogger(__name__)

INDEX_FILE = "shards.json"
NO_KEYPOINTS = "no keypoints and no keypoint model configured"
QC_COLUMNS = (
    "patient_id", "study_id", "status", "message", "warnings", "keypoints_source", "keypoint_confidence",
    "variant", "channels", "image_rows", "image_cols", "pixel_spacing_mm", "photometric", "mean_spacing_px",
    "seconds", "image_path", "keypoints_path", "shard",
)
# Config fields that do not change the shards' content, left out of the shard hash.
_NON_OUTPUT_FIELDS = {"cpus_per_task", "shard_size"}


# ------------------------------------------------------------------------------------------ manifest


def read_xray_manifest(manifest: str | os.PathLike) -> pd.DataFrame:
    """XR rows of a validated manifest, paths made absolute; missing files are left to per-study QC."""
    from raypipe.io.manifest import load_manifest

    table = load_manifest(manifest, check_files=False)
    xr = table[table["modality"].astype(str).str.upper() == "XR"].reset_index(drop=True)
    if len(xr) < len(table):
        log.info("manifest: %d XR studies (%d other rows ignored)", len(xr), len(table) - len(xr))
    return xr


def output_config_hash(cfg: XrayPreprocessConfig) -> str:
    """Hash of the config fields that shape the shards' content."""
    return config_hash(cfg.model_dump(mode="json", exclude=_NON_OUTPUT_FIELDS))


def plan_shards(table: pd.DataFrame, cfg: XrayPreprocessConfig) -> list[ShardPlan]:
    """Group studies into shards of `shard_size` in manifest order, named by index + hash of content."""
    import hashlib

    chash = output_config_hash(cfg)
    records = [_clean_record(r) for r in table.to_dict(orient="records")]
    plans = []
    for i, start in enumerate(range(0, len(records), cfg.shard_size)):
        rows = tuple(records[start: start + cfg.shard_size])
        key = chash + "\n" + "\n".join(f"{r['study_id']}|{r.get('image_path')}|{r.get('keypoints_path')}" for r in rows)
        h = hashlib.sha1(key.encode()).hexdigest()[:10]
        plans.append(ShardPlan(index=i, name=f"part-{i:05d}-{h}", rows=tuple(rows)))
    return plans


# ------------------------------------------------------------------------------------ keypoint model

_MODELS: dict[tuple[str, str, str, int], Any] = {}


class KeypointPredictor:
    """A registry keypoint model (HRNet heatmaps) applied to a whole radiograph, in original pixels."""

    def __init__(self, name: str, weights: str, model_config: dict[str, Any] | None = None, input_size: int = 384):
        import torch

        from raypipe.models.registry import build_model

        self.input_size = int(input_size)
        self.model = build_model(name, **(model_config or {}))
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self.model.load_state_dict(state)
        self.model.eval()
        self.stride = float(getattr(self.model, "stride", 4))
        self.in_chans = int((model_config or {}).get("in_chans", 1))

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(xy (5, 2), confidence (5,)): zero-pad to a square, resize to the input size, decode heatmaps."""
        import torch

        from raypipe.models.keypoints import decode_heatmaps
        from raypipe.preprocess.xray import _antialias, _sample

        h, w = pixels.shape
        side = float(max(h, w))
        k = side / self.input_size  # source pixels per input pixel (pixel centres at (u + 0.5) * k - 0.5)
        inv = np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5], [0, 0, 1]])
        x, _ = _sample(_antialias(np.asarray(pixels, np.float32), k), inv, (self.input_size, self.input_size))
        t = torch.from_numpy(x)[None, None].repeat(1, self.in_chans, 1, 1)
        with torch.inference_mode():
            heat = self.model(t)
        coords, conf = decode_heatmaps(heat.float(), stride=self.stride)
        uv = coords[0].numpy().astype(np.float64)
        return (uv + 0.5) * k - 0.5, conf[0].numpy().astype(np.float64)


def keypoint_predictor(cfg: XrayPreprocessConfig) -> KeypointPredictor | None:
    """The configured keypoint model, built once per process (Ray workers reuse it across studies)."""
    if not cfg.keypoint_model_path:
        return None
    key = (cfg.keypoint_model_name, cfg.keypoint_model_path, json.dumps(cfg.keypoint_model_config, sort_keys=True),
           cfg.keypoint_input_size)
    if key not in _MODELS:
        if not os.path.isfile(cfg.keypoint_model_path):
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
    try:
        image = row.get("image_path")
        if not image or not os.path.exists(image):
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
        record = {k: v for k, v in row.items() if k not in _INPUT_COLUMNS}
        record.update(image=arr, keypoints=np.asarray(xy, np.float32), keypoints_source=source,
                      keypoint_confidence=float(qc["keypoint_confidence"]) if qc["keypoint_confidence"] is not None else math.nan)
    except RaypipeInputError as e:
        qc.update(status="skipped", message=str(e))
    except Exception as e:  # noqa: BLE001 - one bad study must not stop a cohort run
        log.exception("study %s failed", row.get("study_id"))
        qc.update(status="error", message=f"{type(e).__name__}: {e} (image {row.get('image_path')})")
    qc["warnings"] = "; ".join(warnings)
    qc["seconds"] = round(time.perf_counter() - t0, 3)
    return record, qc


# Manifest columns that point at inputs; not copied into shards (paths do not travel with data).
_INPUT_COLUMNS = ("image_path", "mask_path", "mask_labels", "body_mask_path", "keypoints_path", "modality")


# ------------------------------------------------------------------------------------------- shards


def records_to_table(records: list[dict[str, Any]], scalar_schema: Any) -> Any:
    """Shard rows -> Arrow table: manifest columns + float16 image / float32 keypoints tensor columns."""
    import pyarrow as pa
    from ray.data.extensions import ArrowVariableShapedTensorArray

    cols: dict[str, Any] = {}
    for f in scalar_schema:
        vals = [r.get(f.name) for r in records]
        if pa.types.is_string(f.type):
            vals = [None if v is None else str(v) for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    cols["image"] = ArrowVariableShapedTensorArray.from_numpy([np.ascontiguousarray(r["image"]) for r in records])
    cols["keypoints"] = ArrowVariableShapedTensorArray.from_numpy([np.ascontiguousarray(r["keypoints"]) for r in records])
    cols["keypoints_source"] = pa.array([r["keypoints_source"] for r in records], type=pa.string())
    cols["keypoint_confidence"] = pa.array([r["keypoint_confidence"] for r in records], type=pa.float64())
    return pa.table(cols)


def write_shard(plan: ShardPlan, out: str, cfg: XrayPreprocessConfig, scalar_schema: Any) -> dict[str, Any]:
    """Preprocess one shard's studies and write its Parquet file, then its QC part (the completion mark)."""
    records, qcs = [], []
    for row in plan.rows:
        rec, qc = process_study(row, cfg)
        qc["shard"] = plan.name if rec is not None else ""
        qcs.append(qc)
        if rec is not None:
            records.append(rec)
    if records:
        storage.atomic_write_parquet(records_to_table(records, scalar_schema), storage.join(out, plan.name + ".parquet"))
    buf = io.StringIO()
    pd.DataFrame(qcs, columns=list(QC_COLUMNS)).to_csv(buf, index=False)
    storage.atomic_write_text(storage.join(out, QC_DIR, plan.name + ".csv"), buf.getvalue())
    counts = pd.Series([q["status"] for q in qcs]).value_counts().to_dict()
    return {"shard": plan.name, "studies": len(plan.rows), "rows": len(records),
            "ok": int(counts.get("ok", 0)), "skipped": int(counts.get("skipped", 0)), "error": int(counts.get("error", 0))}


class _ShardTask:
    """Ray Data row function: one item = one shard plan (JSON), returns the shard's counts."""

    def __init__(self, out: str, cfg_json: str, scalar_schema: Any) -> None:
        self.out = out
        self.cfg_json = cfg_json
        self.schema = scalar_schema

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        cfg = XrayPreprocessConfig.model_validate_json(self.cfg_json)
        plan = ShardPlan(index=int(item["index"]), name=str(item["name"]), rows=tuple(json.loads(item["rows"])))
        return write_shard(plan, self.out, cfg, self.schema)


def _run_with_ray(pending: list[ShardPlan], out: str, cfg: XrayPreprocessConfig, schema: Any) -> list[dict[str, Any]]:
    """Fan the pending shards out as Ray Data tasks (one block per shard) and log each one as it lands."""
    import ray

    from raypipe.ray_utils import init_ray

    init_ray()
    items = [{"index": p.index, "name": p.name, "rows": json.dumps(list(p.rows), default=str)} for p in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(_ShardTask(out, cfg.model_dump_json(), schema), num_cpus=cfg.cpus_per_task)
    results = []
    for i, r in enumerate(ds.iter_rows(), start=1):
        results.append(dict(r))
        log.info("shard %s done (%d/%d): %d ok, %d skipped, %d error",
                 r["shard"], i, len(pending), r["ok"], r["skipped"], r["error"])
    return results


# --------------------------------------------------------------------------------------------- entry


def preprocess_xray(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: XrayPreprocessConfig | None = None,
    config_path: str | os.PathLike | None = None,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Preprocess every XR study of a manifest into OUT (see module docstring); returns a summary dict.

    `use_ray=False` runs the same shard function in this process (benchmarks, debugging).
    """
    t0 = time.perf_counter()
    cfg = config or (load_config(XrayPreprocessConfig, config_path) if config_path else XrayPreprocessConfig())
    out_s = str(out)
    table = read_xray_manifest(manifest)
    plans = plan_shards(table, cfg)
    storage.makedirs(out_s)
    dump_config(cfg, storage.join(out_s, "config.yaml"))
    pending = [p for p in plans if not shard_complete(out_s, p.name)]
    log.info("X-ray preprocessing (%s): %d studies in %d shards, %d already complete, %d to do -> %s",
             cfg.variant, len(table), len(plans), len(plans) - len(pending), len(pending), out_s)
    schema = _scalar_schema(table)
    if pending:
        if use_ray:
            _run_with_ray(pending, out_s, cfg, schema)
        else:
            for i, p in enumerate(pending, start=1):
                r = write_shard(p, out_s, cfg, schema)
                log.info("shard %s done (%d/%d): %d ok, %d skipped", p.name, i, len(pending), r["ok"], r["skipped"])
    qc = _collect_qc(out_s, plans)
    buf = io.StringIO()
    qc.to_csv(buf, index=False)
    storage.atomic_write_text(storage.join(out_s, "qc.csv"), buf.getvalue())
    counts = qc["status"].value_counts().to_dict() if len(qc) else {}
    shards = [p.name + ".parquet" for p in plans if storage.exists(storage.join(out_s, p.name + ".parquet"))]
    _warn_stale(out_s, set(shards))
    summary = {
        "out": out_s,
        "studies": int(len(table)),
        "ok": int(counts.get("ok", 0)),
        "skipped": int(counts.get("skipped", 0)),
        "error": int(counts.get("error", 0)),
        "variant": cfg.variant,
        "channels": cfg.channels(),
        "shards": len(plans),
        "shards_written": len(pending),
        "shards_reused": len(plans) - len(pending),
        "parquet_files": shards,
        "config_hash": output_config_hash(cfg),
        "qc_path": storage.join(out_s, "qc.csv"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    storage.atomic_write_json(storage.join(out_s, INDEX_FILE), summary)
    log.info("X-ray preprocessing done: %d ok, %d skipped, %d error in %.1f s (qc: %s)",
             summary["ok"], summary["skipped"], summary["error"], summary["seconds"], summary["qc_path"])
    return summary


def _collect_qc(out: str, plans: list[ShardPlan]) -> pd.DataFrame:
    """Concatenate the QC parts of this run's shards in manifest order."""
    parts = [pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, QC_DIR, p.name + ".csv"))),
                         dtype={"patient_id": str, "study_id": str}, keep_default_na=False)
             for p in plans]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(QC_COLUMNS))


def load_xray_shards(path: str | os.PathLike, backend: str = "ray", columns: list[str] | None = None) -> Any:
    """Shards for training: a `ray.data.Dataset` (backend="ray") or pandas with one ndarray per tensor cell."""
    files = shard_files(path)
    if backend == "ray":
        import ray

        from raypipe.ray_utils import init_ray

        init_ray()
        if not files:
            raise FileNotFoundError(f"no X-ray shards in {path}")
        ds = ray.data.read_parquet(files)
        return ds.select_columns(columns) if columns else ds
    if backend != "pandas":
        raise ValueError(f"backend must be 'ray' or 'pandas', got {backend!r}")
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401 - registers the tensor extension type for reading

    frames = []
    for f in files:
        fs, p = storage.filesystem(f)
        frames.append(_table_to_pandas(pq.read_table(p, filesystem=fs, columns=columns)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
