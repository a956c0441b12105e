"""`raypipe preprocess ct`: manifest -> Parquet shards of T12-L4 crops + qc.csv, with Ray Data.

One study -> `bone` (S x 96 x 96) and `bone_muscle` (S x 96 x 144) float16 crops of every axial slice
from T12 to L4, `slice_level`, `slice_z_mm`, plus the manifest's label and clinical columns. The shard
layout, idempotent re-runs and QC files are `raypipe.data.shards`'. A study that cannot be read or
cropped becomes a QC row (skipped: bad input, naming the file; error: unexpected failure) instead of
failing the job.
"""
from __future__ import annotations

import logging
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
from raypipe.io.errors import MaskError, RaypipeInputError
from raypipe.preprocess.config import CTPreprocessConfig

log = logging.getLogger(__name__)

__all__ = ["QC_DIR", "QC_COLUMNS", "load_ct_shards", "load_study", "preprocess_ct", "process_study", "read_ct_manifest"]

QC_COLUMNS = (
    "patient_id", "study_id", "status", "message", "warnings", "vertebrae_found", "missing_levels", "n_slices",
    "spacing_mm", "source_orientation", "body_rule", "padded_slices_bone", "padded_slices_muscle", "seconds",
    "image_path", "mask_path", "shard", "qc_png",
)


def read_ct_manifest(manifest: str | os.PathLike) -> pd.DataFrame:
    """CT rows of a validated manifest, paths made absolute; missing files are left to per-study QC."""
    return read_modality_rows(manifest, "CT")


# ------------------------------------------------------------------------------------------ one study


def mask_names(cfg: CTPreprocessConfig) -> list[str]:
    """Masks worth reading: the requested levels, one neighbour on each side (for QC), the body mask."""
    from raypipe.preprocess.config import LEVEL_ORDER

    i0, i1 = LEVEL_ORDER.index(cfg.levels[0]), LEVEL_ORDER.index(cfg.levels[-1])
    levels = LEVEL_ORDER[max(0, i0 - 1): i1 + 2]
    return [f"vertebrae_{lvl}" for lvl in levels] + ["vertebral_body"]


def load_study(row: dict[str, Any], cfg: CTPreprocessConfig) -> tuple[Any, dict[str, np.ndarray], np.ndarray | None]:
    """Read a manifest row's CT, masks and optional body mask, with file-naming errors for missing inputs.

    `body_mask_path` holds label 1 = body (TotalSegmentator `vertebrae_body`), or with `mask_labels: verse`
    the VerSe subregions 49 + 50.
    """
    from raypipe.io.ct import read_ct
    from raypipe.io.masks import read_body_mask, read_masks

    image, mask = row.get("image_path"), row.get("mask_path")
    if not image or not storage.exists(image):
        raise RaypipeInputError("image not found", path=str(image), field="image_path")
    if not mask:
        raise MaskError(str(image), "no mask_path in the manifest: vertebra masks are needed to preprocess a CT "
                        "(e.g. TotalSegmentator, then `raypipe manifest build --masks`)", field="mask_path")
    if not storage.exists(mask):
        raise MaskError(str(mask), "mask file or folder not found", field="mask_path")
    ct = read_ct(image)
    labels = row.get("mask_labels") or None
    masks = read_masks(mask, ct, labels=labels, names=mask_names(cfg))
    body = None
    bpath = row.get("body_mask_path")
    if bpath:
        if not storage.exists(bpath):
            raise MaskError(str(bpath), "body mask not found", field="body_mask_path")
        body = read_body_mask(bpath, ct, body_label=(49, 50) if labels == "verse" else 1)
    return ct, masks, body


def process_study(row: dict[str, Any], cfg: CTPreprocessConfig) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(shard record or None, QC row) for one manifest row; input problems become QC, never exceptions."""
    from raypipe.preprocess.ct import preprocess_ct_study

    t0 = time.perf_counter()
    qc: dict[str, Any] = {c: None for c in QC_COLUMNS}
    qc.update(patient_id=row.get("patient_id"), study_id=row.get("study_id"),
              image_path=row.get("image_path"), mask_path=row.get("mask_path"), warnings="", message="")
    record = None
    ct = masks = info = None
    try:
        ct, masks, body = load_study(row, cfg)
        arrays, info = preprocess_ct_study(ct, masks, body, cfg)
        qc.update(
            status="ok",
            warnings="; ".join(info["warnings"]),
            vertebrae_found=" ".join(info["vertebrae_found"]),
            missing_levels="",
            n_slices=info["n_slices"],
            spacing_mm="x".join(f"{s:.3f}" for s in info["spacing_mm"]),
            source_orientation=info.get("source_orientation"),
            body_rule=info["body_rule"],
            padded_slices_bone=info["padded_slices_bone"],
            padded_slices_muscle=info["padded_slices_muscle"],
        )
        record = strip_inputs(row)
        record.update(arrays)
        record["n_slices"] = info["n_slices"]
    except RaypipeInputError as e:
        qc.update(status="skipped", message=str(e))
        if isinstance(e, MaskError) and isinstance(e.value, list):
            qc["missing_levels"] = " ".join(map(str, e.value))
    except Exception as e:  # noqa: BLE001 - one bad study must not stop a cohort run
        log.exception("study %s failed", row.get("study_id"))
        qc.update(status="error", message=f"{type(e).__name__}: {e} (image {row.get('image_path')})")
    if cfg.qc_pictures and ct is not None:
        qc[PICTURE_KEY] = _picture(ct, masks or {}, info, qc, cfg)
    qc["seconds"] = round(time.perf_counter() - t0, 3)
    return record, qc


def _picture(ct: Any, masks: dict[str, np.ndarray], info: dict[str, Any] | None, qc: dict[str, Any],
             cfg: CTPreprocessConfig) -> bytes | None:
    """The study's QC picture (`raypipe.preprocess.qc_png`); None, with a log line, if drawing fails."""
    from raypipe.preprocess.qc_png import ct_qc_picture

    problem = qc["message"] or qc["warnings"] or None
    try:
        return ct_qc_picture(ct.hu, masks, ct.spacing, (info or {}).get("geometry"),
                             title=f"{qc['study_id']}  [{qc['status']}]", problem=problem,
                             hu_window=(cfg.window_low, cfg.window_high))
    except Exception:  # noqa: BLE001 - a picture must never cost a study
        log.warning("QC picture of study %s failed", qc["study_id"], exc_info=True)
        return None


# ------------------------------------------------------------------------------------------- shards


def records_to_table(records: list[dict[str, Any]], schema: Any) -> Any:
    """Shard rows -> Arrow table: manifest columns + ragged float16 crops (Ray tensor extension)."""
    import pyarrow as pa

    cols = scalar_columns(records, schema)
    for k in ("bone", "bone_muscle"):
        cols[k] = tensor_column(r[k] for r in records)
    cols["slice_level"] = pa.array([[str(x) for x in r["slice_level"]] for r in records], type=pa.list_(pa.string()))
    cols["slice_z_mm"] = pa.array([np.asarray(r["slice_z_mm"], np.float32) for r in records], type=pa.list_(pa.float32()))
    cols["n_slices"] = pa.array([int(r["n_slices"]) for r in records], type=pa.int32())
    return pa.table(cols)


def qc_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """QC rows with integer counts kept integer where studies were skipped (empty, not 56.0)."""
    df = pd.DataFrame(rows, columns=list(QC_COLUMNS))
    for c in ("n_slices", "padded_slices_bone", "padded_slices_muscle"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    return df


def warm_up(cfg: CTPreprocessConfig) -> None:
    """Import what `process_study` needs, once per writer actor (not inside the first study's timing)."""
    import raypipe.io.ct  # noqa: F401
    import raypipe.io.masks  # noqa: F401
    import raypipe.preprocess.ct  # noqa: F401

    if cfg.qc_pictures:
        import raypipe.preprocess.qc_png  # noqa: F401


CT_SPEC = ShardSpec(kind="CT", config_cls=CTPreprocessConfig, process_study=process_study,
                    records_to_table=records_to_table, qc_frame=qc_frame, warm_up=warm_up)


def preprocess_ct(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: CTPreprocessConfig | None = None,
    config_path: str | os.PathLike | None = None,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Preprocess every CT study of a manifest into shards + qc.csv (layout: `raypipe.data.shards`)."""
    cfg = config or (load_config(CTPreprocessConfig, config_path) if config_path else CTPreprocessConfig())
    return run_shards(CT_SPEC, read_ct_manifest(manifest), out, cfg, use_ray=use_ray)


def load_ct_shards(path: str | os.PathLike, backend: str = "ray", columns: list[str] | None = None) -> Any:
    """CT shards for training: a `ray.data.Dataset` (backend="ray") or pandas with ndarray cells."""
    return load_shards(path, backend=backend, columns=columns)
