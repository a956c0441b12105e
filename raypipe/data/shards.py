"""The shard runner both preprocessing pipelines share: plan, fan out on Ray Data, write, collect QC.

Layout of an output folder:
  part-00000-<hash>.parquet  one row per preprocessed study
  _qc/part-00000-<hash>.csv  the shard's QC rows; written last, so it marks the shard complete
  qc.csv                     one row per study of the manifest (status ok | skipped | error, warnings, qc_png)
  qc/<hash>.png              a QC picture per study (`raypipe.data.qc_pictures`; config `qc_pictures`)
  qc/contact_sheet.png       the pictures of the worst QC studies side by side
  shards.json                the shards of this run (what `load_shards` reads), counts, config hash
  config.yaml                the resolved preprocessing config

Studies are grouped into shards of `shard_size` in manifest order, the last few smaller (`shard_sizes`) so that
the writers finish together; a shard's name hashes its studies and
the output-relevant config, so a re-run (after a kill, or on a grown manifest) skips every shard whose QC
part exists and never mixes outputs of different configs. Every file is written temp-then-rename.
A pipeline supplies a `ShardSpec`: how to turn one manifest row into (record | None, QC row) and how to
turn records into an Arrow table.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
from pydantic import BaseModel

from raypipe import storage
from raypipe.config import config_hash, dump_config
from raypipe.data.qc_pictures import write_contact_sheet, write_picture

log = logging.getLogger(__name__)

QC_DIR = "_qc"
INDEX_FILE = "shards.json"
# Manifest columns that point at inputs; they are not copied into shards (paths do not travel with data).
INPUT_COLUMNS = ("image_path", "mask_path", "mask_labels", "body_mask_path", "keypoints_path", "modality")
# Config fields that never change the shards' content, left out of the shard hash.
NON_OUTPUT_FIELDS = {"cpus_per_task", "shard_size", "qc_pictures"}


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its deterministic name and the manifest rows it holds."""

    index: int
    name: str
    rows: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class ShardSpec:
    """What a pipeline plugs into the runner (module-level functions, so Ray can pickle them)."""

    kind: str  # "CT" | "X-ray", for logs
    config_cls: type[BaseModel]
    process_study: Callable[[dict[str, Any], Any], tuple[dict[str, Any] | None, dict[str, Any]]]
    records_to_table: Callable[[list[dict[str, Any]], Any], Any]
    qc_frame: Callable[[list[dict[str, Any]]], pd.DataFrame]
    study_key: Callable[[dict[str, Any]], str] = lambda r: str(r["study_id"])
    warm_up: Callable[[Any], None] | None = None  # given the config, run once when a writer actor starts


def clean_record(r: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe manifest row (NaN -> None, numpy scalars -> Python)."""
    out = {}
    for k, v in r.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and np.isnan(v):
            v = None
        out[k] = v
    return out


def output_config_hash(cfg: BaseModel) -> str:
    """Hash of the config fields that shape the shards' content."""
    return config_hash(cfg.model_dump(mode="json", exclude=NON_OUTPUT_FIELDS))


def shard_sizes(n: int, shard_size: int) -> list[int]:
    """Studies per shard for `n` studies: `shard_size`, but never more than half of the studies left.

    The last wave of a run is where writers idle: with equal shards, one writer still works on a whole shard
    while the others have nothing left. Taking at most half of what is left (16, ..., 16, 12, 6, 3, 2, 1) lets
    the writers finish together whatever their number, for a few more small files. Depends on `n` and
    `shard_size` only, so the plan (and a re-run's skipping) never depends on the cluster.
    """
    sizes, left = [], n
    while left > 0:
        sizes.append(min(max(1, int(shard_size)), (left + 1) // 2))
        left -= sizes[-1]
    return sizes


def plan_shards(table: pd.DataFrame, cfg: Any, study_key: Callable[[dict[str, Any]], str]) -> list[ShardPlan]:
    """Group studies into shards of `shard_sizes` in manifest order, named by index + hash of content."""
    chash = output_config_hash(cfg)
    records = [clean_record(r) for r in table.to_dict(orient="records")]
    plans, start = [], 0
    for i, size in enumerate(shard_sizes(len(records), cfg.shard_size)):
        rows = tuple(records[start: start + size])
        start += size
        key = chash + "\n" + "\n".join(study_key(r) for r in rows)
        h = hashlib.sha1(key.encode()).hexdigest()[:10]
        plans.append(ShardPlan(index=i, name=f"part-{i:05d}-{h}", rows=rows))
    return plans


def scalar_schema(table: pd.DataFrame):
    """Arrow schema of the copied manifest columns, fixed once so every shard has the same types."""
    import pyarrow as pa

    fields = []
    for c in (c for c in table.columns if c not in INPUT_COLUMNS):
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


def scalar_columns(records: list[dict[str, Any]], schema) -> dict[str, Any]:
    """The manifest columns of a shard's records as Arrow arrays of the fixed schema."""
    import pyarrow as pa

    cols: dict[str, Any] = {}
    for f in schema:
        vals = [r.get(f.name) for r in records]
        if pa.types.is_string(f.type):
            vals = [None if v is None else str(v) for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    return cols


def tensor_column(arrays: Iterable[np.ndarray]):
    """Ragged tensors as one Arrow column (Ray's tensor extension type, readable by Ray Data)."""
    from ray.data.extensions import ArrowVariableShapedTensorArray

    return ArrowVariableShapedTensorArray.from_numpy([np.ascontiguousarray(a) for a in arrays])


def strip_inputs(row: dict[str, Any]) -> dict[str, Any]:
    """A manifest row without the input-path columns: what a shard record starts from."""
    return {k: v for k, v in row.items() if k not in INPUT_COLUMNS}


def write_shard(plan: ShardPlan, out: str, spec: ShardSpec, cfg: Any, schema) -> dict[str, Any]:
    """Preprocess one shard's studies and write its Parquet file, then its QC part (the completion mark)."""
    records, qcs = [], []
    for row in plan.rows:
        rec, qc = spec.process_study(row, cfg)
        write_picture(out, qc)
        qc["shard"] = plan.name if rec is not None else ""
        qcs.append(qc)
        if rec is not None:
            records.append(rec)
    if records:
        storage.atomic_write_parquet(spec.records_to_table(records, schema), storage.join(out, plan.name + ".parquet"))
    buf = io.StringIO()
    spec.qc_frame(qcs).to_csv(buf, index=False)
    storage.atomic_write_text(storage.join(out, QC_DIR, plan.name + ".csv"), buf.getvalue())
    counts = pd.Series([q["status"] for q in qcs]).value_counts().to_dict()
    return {"shard": plan.name, "studies": len(plan.rows), "rows": len(records),
            "ok": int(counts.get("ok", 0)), "skipped": int(counts.get("skipped", 0)), "error": int(counts.get("error", 0))}


def shard_complete(out: str, name: str) -> bool:
    """A shard is done when its QC part exists (written after the Parquet file)."""
    return storage.exists(storage.join(out, QC_DIR, name + ".csv"))


class ShardWriter:
    """Ray Data actor: writes shards one after another in a long-lived worker.

    Start-up (imports of the readers and transforms, the validated config, thread limits) is paid once per
    actor instead of once per shard task, so a small cohort on few cores is not dominated by it. Each actor
    pins its native thread pools to its CPU share (`cpus_per_task`), as a single Ray task would be.
    """

    def __init__(self, out: str, spec: ShardSpec, cfg_json: str, schema: Any) -> None:
        from raypipe.ray_utils import limit_threads

        self.out, self.spec, self.schema = out, spec, schema
        self.cfg = spec.config_cls.model_validate_json(cfg_json)
        limit_threads(max(1, int(getattr(self.cfg, "cpus_per_task", 1))))
        if spec.warm_up is not None:
            spec.warm_up(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write every shard plan of the batch (columns index, name, rows as JSON); return their counts."""
        import ray

        node = ray.get_runtime_context().get_node_id()  # which node wrote it (multi-node runs)
        counts = []
        for index, name, rows in zip(batch["index"], batch["name"], batch["rows"]):
            plan = ShardPlan(index=int(index), name=str(name), rows=tuple(json.loads(str(rows))))
            counts.append({**write_shard(plan, self.out, self.spec, self.cfg, self.schema), "node_id": node})
        return {k: np.asarray([c[k] for c in counts]) for k in counts[0]} if counts else {}


def _run_with_ray(pending: list[ShardPlan], out: str, spec: ShardSpec, cfg: Any, schema) -> dict[str, str]:
    """Fan the pending shards out to a pool of `ShardWriter` actors, one per CPU share; returns shard -> node id."""
    import ray

    from raypipe.ray_utils import cpu_worker_slots, init_ray

    init_ray()
    actors = min(len(pending), cpu_worker_slots(cfg.cpus_per_task))
    items = [{"index": p.index, "name": p.name, "rows": json.dumps(list(p.rows), default=str)} for p in pending]
    log.info("%s preprocessing on Ray Data: %d shards over %d actor(s) of %g CPU", spec.kind, len(items), actors,
             cfg.cpus_per_task)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # two shards in flight per actor: the next shard is queued at the actor when it finishes one, so it never waits
    # ~0.2 s for Ray Data's scheduling loop between shards; the least-loaded actor gets the next shard
    pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2)
    ds = ds.map_batches(ShardWriter, fn_constructor_args=(out, spec, cfg.model_dump_json(), schema), batch_size=1,
                        batch_format="numpy", compute=pool, num_cpus=cfg.cpus_per_task)
    nodes: dict[str, str] = {}
    for i, r in enumerate(ds.iter_rows(), start=1):
        nodes[str(r["shard"])] = str(r["node_id"])
        log.info("shard %s done (%d/%d) on node %s: %d ok, %d skipped, %d error",
                 r["shard"], i, len(pending), str(r["node_id"])[:8], r["ok"], r["skipped"], r["error"])
    return nodes


def run_shards(spec: ShardSpec, table: pd.DataFrame, out: str | os.PathLike, cfg: Any, use_ray: bool = True,
               extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preprocess every study of `table` into OUT (see module docstring); returns the run summary.

    `use_ray=False` runs the same shard function in this process (benchmarks, debugging).
    """
    t0 = time.perf_counter()
    out_s = str(out)
    plans = plan_shards(table, cfg, spec.study_key)
    storage.makedirs(out_s)
    dump_config(cfg, storage.join(out_s, "config.yaml"))
    pending = [p for p in plans if not shard_complete(out_s, p.name)]
    log.info("%s preprocessing: %d studies in %d shards, %d already complete, %d to do -> %s",
             spec.kind, len(table), len(plans), len(plans) - len(pending), len(pending), out_s)
    schema = scalar_schema(table)
    shard_nodes: dict[str, str] = {}
    if pending and use_ray:
        shard_nodes = _run_with_ray(pending, out_s, spec, cfg, schema)
    elif pending:
        for i, p in enumerate(pending, start=1):
            r = write_shard(p, out_s, spec, cfg, schema)
            log.info("shard %s done (%d/%d): %d ok, %d skipped", p.name, i, len(pending), r["ok"], r["skipped"])
    qc = collect_qc(out_s, plans, spec.qc_frame)
    buf = io.StringIO()
    qc.to_csv(buf, index=False)
    storage.atomic_write_text(storage.join(out_s, "qc.csv"), buf.getvalue())
    counts = qc["status"].value_counts().to_dict() if len(qc) else {}
    sheet = write_contact_sheet(out_s, qc) if getattr(cfg, "qc_pictures", False) else None
    shards = [p.name + ".parquet" for p in plans if storage.exists(storage.join(out_s, p.name + ".parquet"))]
    _warn_stale(out_s, set(shards))
    summary = {
        "out": out_s,
        "studies": int(len(table)),
        "ok": int(counts.get("ok", 0)),
        "skipped": int(counts.get("skipped", 0)),
        "error": int(counts.get("error", 0)),
        **(extra_summary or {}),
        "shards": len(plans),
        "shards_written": len(pending),
        "shards_reused": len(plans) - len(pending),
        "parquet_files": shards,
        "config_hash": output_config_hash(cfg),
        "shard_nodes": shard_nodes,  # shards written by this run -> Ray node id (empty without Ray)
        "qc_path": storage.join(out_s, "qc.csv"),
        "qc_contact_sheet": sheet,  # OUT/qc/contact_sheet.png: pictures of the worst QC studies (None without)
        "seconds": round(time.perf_counter() - t0, 2),
    }
    storage.atomic_write_json(storage.join(out_s, INDEX_FILE), summary)
    log.info("%s preprocessing done: %d ok, %d skipped, %d error in %.1f s (qc: %s)", spec.kind,
             summary["ok"], summary["skipped"], summary["error"], summary["seconds"], summary["qc_path"])
    return summary


def collect_qc(out: str, plans: Iterable[ShardPlan], qc_frame: Callable[[list[dict]], pd.DataFrame]) -> pd.DataFrame:
    """Concatenate the QC parts of this run's shards in manifest order."""
    parts = [pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(out, QC_DIR, p.name + ".csv"))),
                         dtype={"patient_id": str, "study_id": str}, keep_default_na=False)
             for p in plans]
    return qc_frame(pd.concat(parts, ignore_index=True).to_dict(orient="records") if parts else [])


def _warn_stale(out: str, current: set[str]) -> None:
    """Point out shards from other manifests/configs in OUT (kept, but not listed in shards.json)."""
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(out)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    stale = [i.base_name for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
             and i.base_name not in current]
    if stale:
        log.warning("%d shard(s) in %s are from another manifest or config and are ignored: %s",
                    len(stale), out, ", ".join(sorted(stale)[:5]))


def shard_files(path: str | os.PathLike) -> list[str]:
    """The Parquet shards of a preprocessing output: those listed in shards.json, else every part-*.parquet."""
    import pyarrow.fs as pafs

    p = str(path)
    if storage.exists(storage.join(p, INDEX_FILE)):
        index = json.loads(storage.read_bytes(storage.join(p, INDEX_FILE)))
        return [storage.join(p, f) for f in index["parquet_files"]]
    fs, lp = storage.filesystem(p)
    infos = fs.get_file_info(pafs.FileSelector(lp, recursive=False))
    return sorted(storage.join(p, i.base_name) for i in infos
                  if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))


def load_shards(path: str | os.PathLike, backend: str = "ray", columns: list[str] | None = None) -> Any:
    """Shards for training: a `ray.data.Dataset` (backend="ray") or a pandas DataFrame with ndarray cells."""
    files = shard_files(path)
    if backend == "ray":
        import ray

        from raypipe.ray_utils import init_ray

        init_ray()
        if not files:
            raise FileNotFoundError(f"no preprocessed shards in {path}")
        ds = ray.data.read_parquet(files, override_num_blocks=len(files))  # one block per shard
        return ds.select_columns(columns) if columns else ds
    if backend != "pandas":
        raise ValueError(f"backend must be 'ray' or 'pandas', got {backend!r}")
    frames = [table_to_pandas(_read_table(f, columns)) for f in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _read_table(path: str, columns: list[str] | None):
    import pyarrow.parquet as pq
    import ray.data.extensions  # noqa: F401 - registers the tensor extension type for reading

    fs, p = storage.filesystem(path)
    return pq.read_table(p, filesystem=fs, columns=columns)


def table_to_pandas(table) -> pd.DataFrame:
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


def read_modality_rows(manifest: str | os.PathLike, modality: str) -> pd.DataFrame:
    """Rows of one modality from a schema-validated manifest; missing files are left to per-study QC."""
    from raypipe.io.manifest import load_manifest

    table = load_manifest(manifest, check_files=False)
    rows = table[table["modality"].astype(str).str.upper() == modality].reset_index(drop=True)
    if len(rows) < len(table):
        log.info("manifest: %d %s studies (%d other rows ignored)", len(rows), modality, len(table) - len(rows))
    return rows
