"""`raypipe preprocess ct`: manifest -> Parquet shards of T12-L4 crops + qc.csv, with Ray Data.

Layout of OUT:
  part-00000-<hash>.parquet  one row per preprocessed study (DESIGN.md "Preprocessed shards")
  _qc/part-00000-<hash>.csv  the shard's QC rows; written last, so it marks the shard complete
  qc.csv                     one row per CT study of the manifest (status ok | skipped | error, warnings)
  shards.json                the shards of this run (what `load_ct_shards` reads), counts, config hash
  config.yaml                the resolved CTPreprocessConfig

Studies are grouped into shards of `shard_size` in manifest order; a shard's name hashes its study ids
and the output-relevant config, so a re-run (after a kill, or on a grown manifest) skips every shard whose
QC part exists and never mixes outputs of different configs. Every file is written temp-then-rename.
A study that cannot be read or cropped becomes a QC row (skipped: bad input, naming the file; error:
unexpected failure) instead of failing the job.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from raypipe import storage
from raypipe.config import config_hash, dump_config, load_config
from raypipe.io.errors import MaskError, RaypipeInputError
from raypipe.preprocess.config import CTPreprocessConfig

log = logging.getLogger(__name__)

QC_DIR = "_qc"
INDEX_FILE = "shards.json"
# Manifest columns that point at inputs; they are not copied into shards (paths do not travel with data).
_INPUT_COLUMNS = ("image_path", "mask_path", "mask_labels", "body_mask_path", "keypoints_path", "modality")
QC_COLUMNS = (
    "patient_id", "study_id", "status", "message", "warnings", "vertebrae_found", "missing_levels", "n_slices",
    "spacing_mm", "source_orientation", "body_rule", "padded_slices_bone", "padded_slices_muscle", "seconds",
    "image_path", "mask_path", "shard",
)
# Config fields that do not change the shards' content, left out of the shard hash.
_NON_OUTPUT_FIELDS = {"cpus_per_task"}


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its deterministic name and the manifest rows it holds."""

    index: int
    name: str
    rows: tuple[dict[str, Any], ...]


# ------------------------------------------------------------------------------------------ manifest


def read_ct_manifest(manifest: str | os.PathLike) -> pd.DataFrame:
    """CT rows of a validated manifest, paths made absolute; missing files are left to per-study QC."""
    try:
        from raypipe.io.manifest import load_manifest
    except ImportError:  # pragma: no cover - the validator ships with raypipe.io
        load_manifest = None
    if load_manifest is not None:
        table = load_manifest(manifest, check_files=False)
    else:  # pragma: no cover
        table = _read_manifest_plain(Path(manifest))
    ct = table[table["modality"].astype(str).str.upper() == "CT"].reset_index(drop=True)
    if len(ct) < len(table):
        log.info("manifest: %d CT studies (%d other rows ignored)", len(ct), len(table) - len(ct))
    return ct


def _read_manifest_plain(path: Path) -> pd.DataFrame:  # pragma: no cover - fallback only
    t = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    for c in ("image_path", "mask_path", "body_mask_path"):
        if c in t:
            t[c] = [None if pd.isna(v) or str(v) == "" else str(path.parent / str(v)) for v in t[c]]
    t["patient_id"] = t["patient_id"].astype(str)
    t["study_id"] = t["study_id"].astype(str)
    return t


def output_config_hash(cfg: CTPreprocessConfig) -> str:
    """Hash of the config fields that shape the shards' content."""
    return config_hash(cfg.model_dump(mode="json", exclude=_NON_OUTPUT_FIELDS))


def plan_shards(table: pd.DataFrame, cfg: CTPreprocessConfig) -> list[ShardPlan]:
    """Group studies into shards of `shard_size` in manifest order, named by index + hash of content."""
    chash = output_config_hash(cfg)
    records = [_clean_record(r) for r in table.to_dict(orient="records")]
    plans = []
    for i, start in enumerate(range(0, len(records), cfg.shard_size)):
        rows = tuple(records[start: start + cfg.shard_size])
        key = chash + "\n" + "\n".join(str(r["study_id"]) for r in rows)
        h = hashlib.sha1(key.encode()).hexdigest()[:10]
        plans.append(ShardPlan(index=i, name=f"part-{i:05d}-{h}", rows=rows))
    return plans


def _clean_record(r: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe manifest row (NaN -> None, numpy scalars -> Python)."""
    out = {}
    for k, v in r.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and np.isnan(v):
            v = None
        out[k] = v
    return out


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
    if not image or not Path(image).exists():
        raise RaypipeInputError("image not found", path=str(image), field="image_path")
    if not mask or not Path(mask).exists():
        raise MaskError(str(mask), "mask file or folder not found", field="mask_path")
    ct = read_ct(image)
    labels = row.get("mask_labels") or None
    masks = read_masks(mask, ct, labels=labels, names=mask_names(cfg))
    body = None
    bpath = row.get("body_mask_path")
    if bpath:
        if not Path(bpath).exists():
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
        record = {k: v for k, v in row.items() if k not in _INPUT_COLUMNS}
        record.update(arrays)
        record["n_slices"] = info["n_slices"]
    except RaypipeInputError as e:
        qc.update(status="skipped", message=str(e))
        if isinstance(e, MaskError) and isinstance(e.value, list):
            qc["missing_levels"] = " ".join(map(str, e.value))
    except Exception as e:  # noqa: BLE001 - one bad study must not stop a cohort run
        log.exception("study %s failed", row.get("study_id"))
        qc.update(status="error", message=f"{type(e).__name__}: {e} (image {row.get('image_path')})")
    qc["seconds"] = round(time.perf_counter() - t0, 3)
    return record, qc


# ------------------------------------------------------------------------------------------- shards


def _scalar_schema(table: pd.DataFrame):
    """Arrow schema of the copied manifest columns, fixed once so every shard has the same types."""
    import pyarrow as pa

    keep = [c for c in table.columns if c not in _INPUT_COLUMNS]
    fields = []
    for c in keep:
        s = table[c]
        if c in ("patient_id", "study_id") or s.dtype == object:
            fields.append(pa.field(c, pa.string()))
        elif pd.api.types.is_bool_dtype(s):
            fields.append(pa.field(c, pa.bool_()))
        elif pd.api.types.is_integer_dtype(s):
            fields.append(pa.field(c, pa.int64()))
        else:
            fields.append(pa.field(c, pa.float64()))
    return pa.schema(fields)


def records_to_table(records: list[dict[str, Any]], scalar_schema):
    """Shard rows -> Arrow table: manifest columns + ragged float16 tensor columns (Ray tensor extension)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowVariableShapedTensorArray

    cols: dict[str, Any] = {}
    for f in scalar_schema:
        vals = [r.get(f.name) for r in records]
        if pa.types.is_string(f.type):
            vals = [None if v is None else str(v) for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    for k in ("bone", "bone_muscle"):
        cols[k] = ArrowVariableShapedTensorArray.from_numpy([np.ascontiguousarray(r[k]) for r in records])
    cols["slice_level"] = pa.array([[str(x) for x in r["slice_level"]] for r in records], type=pa.list_(pa.string()))
    cols["slice_z_mm"] = pa.array([np.asarray(r["slice_z_mm"], np.float32) for r in records], type=pa.list_(pa.float32()))
    cols["n_slices"] = pa.array([int(r["n_slices"]) for r in records], type=pa.int32())
    return pa.table(cols)


def write_shard(plan: ShardPlan, out: str, cfg: CTPreprocessConfig, scalar_schema) -> dict[str, Any]:
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
    _qc_frame(qcs).to_csv(buf, index=False)
    storage.atomic_write_text(storage.join(out, QC_DIR, plan.name + ".csv"), buf.getvalue())
    counts = pd.Series([q["status"] for q in qcs]).value_counts().to_dict()
    return {"shard": plan.name, "studies": len(plan.rows), "rows": len(records),
            "ok": int(counts.get("ok", 0)), "skipped": int(counts.get("skipped", 0)), "error": int(counts.get("error", 0))}


def _qc_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """QC rows with integer counts kept integer where studies were skipped (empty, not 56.0)."""
    df = pd.DataFrame(rows, columns=list(QC_COLUMNS))
    for c in ("n_slices", "padded_slices_bone", "padded_slices_muscle"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    return df


def shard_complete(out: str, name: str) -> bool:
    """A shard is done when its QC part exists (written after the Parquet file)."""
    return storage.exists(storage.join(out, QC_DIR, name + ".csv"))


class _ShardTask:
    """Ray Data row function: one item = one shard plan (JSON), returns the shard's counts."""

    def __init__(self, out: str, cfg_json: str, scalar_schema) -> None:
        self.out = out
        self.cfg_json = cfg_json
        self.schema = scalar_schema

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        cfg = CTPreprocessConfig.model_validate_json(self.cfg_json)
        plan = ShardPlan(index=int(item["index"]), name=str(item["name"]), rows=tuple(json.loads(item["rows"])))
        return write_shard(plan, self.out, cfg, self.schema)


def _run_with_ray(pending: list[ShardPlan], out: str, cfg: CTPreprocessConfig, schema) -> list[dict[str, Any]]:
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


def preprocess_ct(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    config: CTPreprocessConfig | None = None,
    config_path: str | os.PathLike | None = None,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Preprocess every CT study of a manifest into OUT (see module docstring); returns a summary dict.

    `use_ray=False` runs the same shard function in this process (benchmarks, debugging).
    """
    t0 = time.perf_counter()
    cfg = config or (load_config(CTPreprocessConfig, config_path) if config_path else CTPreprocessConfig())
    out_s = str(out)
    table = read_ct_manifest(manifest)
    plans = plan_shards(table, cfg)
    storage.makedirs(out_s)
    dump_config(cfg, storage.join(out_s, "config.yaml"))
    pending = [p for p in plans if not shard_complete(out_s, p.name)]
    log.info("CT preprocessing: %d studies in %d shards, %d already complete, %d to do -> %s",
             len(table), len(plans), len(plans) - len(pending), len(pending), out_s)
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
        "shards": len(plans),
        "shards_written": len(pending),
        "shards_reused": len(plans) - len(pending),
        "parquet_files": shards,
        "config_hash": output_config_hash(cfg),
        "qc_path": storage.join(out_s, "qc.csv"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    storage.atomic_write_json(storage.join(out_s, INDEX_FILE), summary)
    log.info("CT preprocessing done: %d ok, %d skipped, %d error in %.1f s (qc: %s)",
             summary["ok"], summary["skipped"], summary["error"], summary["seconds"], summary["qc_path"])
    return summary


def _collect_qc(out: str, plans: Iterable[ShardPlan]) -> pd.DataFrame:
    """Concatenate the QC parts of this run's shards in manifest order."""
    parts = [pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, QC_DIR, p.name + ".csv"))),
                         dtype={"patient_id": str, "study_id": str}, keep_default_na=False)
             for p in plans]
    return _qc_frame(pd.concat(parts, ignore_index=True).to_dict(orient="records")) if parts else _qc_frame([])


def _warn_stale(out: str, current: set[str]) -> None:
    """Point out shards from other manifests/configs in OUT (kept, but not listed in shards.json)."""
    fs, p = storage.filesystem(out)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    stale = [i.base_name for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
             and i.base_name not in current]
    if stale:
        log.warning("%d shard(s) in %s are from another manifest or config and are ignored: %s",
                    len(stale), out, ", ".join(sorted(stale)[:5]))


# --------------------------------------------------------------------------------------------- read


def shard_files(path: str | os.PathLike) -> list[str]:
    """The Parquet shards of a preprocessing output: those listed in shards.json, else every part-*.parquet."""
    p = str(path)
    if storage.exists(storage.join(p, INDEX_FILE)):
        index = json.loads(storage.read_bytes(storage.join(p, INDEX_FILE)))
        return [storage.join(p, f) for f in index["parquet_files"]]
    fs, lp = storage.filesystem(p)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(lp, recursive=False))
    return sorted(storage.join(p, i.base_name) for i in infos
                  if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))


def load_ct_shards(path: str | os.PathLike, backend: str = "ray", columns: list[str] | None = None) -> Any:
    """Shards for training: a `ray.data.Dataset` (backend="ray") or a pandas DataFrame with ndarray cells."""
    files = shard_files(path)
    if backend == "ray":
        import ray

        from raypipe.ray_utils import init_ray

        init_ray()
        if not files:
            raise FileNotFoundError(f"no CT shards in {path}")
        ds = ray.data.read_parquet(files, override_num_blocks=len(files))  # one block per shard
        return ds.select_columns(columns) if columns else ds
    if backend != "pandas":
        raise ValueError(f"backend must be 'ray' or 'pandas', got {backend!r}")
    frames = [_table_to_pandas(_read_table(f, columns)) for f in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _read_table(path: str, columns: list[str] | None):
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401 - registers the tensor extension type for reading

    fs, p = storage.filesystem(path)
    return pq.read_table(p, filesystem=fs, columns=columns)


def _table_to_pandas(table) -> pd.DataFrame:
    """Arrow shard -> pandas with one numpy array per cell for the tensor and list columns."""
    import pyarrow as pa

    tensor_cols = [f.name for f in table.schema if isinstance(f.type, pa.ExtensionType)]
    rest = table.drop_columns(tensor_cols)
    df = rest.to_pandas() if rest.num_columns else pd.DataFrame(index=range(table.num_rows))
    for c in tensor_cols:
        arr = table[c].combine_chunks()
        df[c] = [np.asarray(v) for v in arr.to_numpy()]
    if "slice_z_mm" in df:
        df["slice_z_mm"] = [np.asarray(v, dtype=np.float32) for v in df["slice_z_mm"]]
    if "slice_level" in df:
        df["slice_level"] = [np.asarray(v, dtype=object) for v in df["slice_level"]]
    return df[[c for c in table.column_names]]
