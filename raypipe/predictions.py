"""The prediction-file schema that every training and scoring path writes and `raypipe evaluate` reads.

One row per (model, split, fold, study). Required columns:

- ``patient_id``, ``study_id`` (strings; integer ids are read as strings),
- ``fold`` (int, -1 when the prediction does not come from cross-validation),
- ``split`` (e.g. ``train``, ``val``, ``test``, ``external``), ``model`` (the model's display name),
- ``score`` (finite float: a probability in [0, 1] or a log-risk), ``score_kind`` (``probability`` | ``log_risk``).

Optional columns: ``time_days`` (> 0) and ``event`` (0/1) for survival metrics, binary labels
(``label``, ``fracture_5y`` or any ``fracture_<N>y``; 0/1, missing allowed), ``group`` (risk group name)
and the manifest's clinical columns (``age``, ``sex``, ``bmi``, ...), which the report tabulates.

Run metadata (model name/version, config hash, created time, ...) lives in the Parquet schema metadata
under the key ``raypipe.predictions`` and, for CSV files, in a sidecar ``<file>.meta.json``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import storage
from raypipe.config import jsonable

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SCHEMA_VERSION = 1
METADATA_KEY = b"raypipe.predictions"
SIDECAR_SUFFIX = ".meta.json"
SCORE_KINDS = ("probability", "log_risk")
REQUIRED_COLUMNS = ("patient_id", "study_id", "fold", "split", "model", "score", "score_kind")
STRING_COLUMNS = ("patient_id", "study_id", "split", "model", "score_kind")
LABEL_COLUMNS = ("label", "fracture_5y")
CLINICAL_COLUMNS = (
    "age", "sex", "height_cm", "weight_kg", "bmi", "smoker", "alcohol", "glucocorticoid",
    "secondary_osteoporosis", "rheumatoid_arthritis", "prior_fracture", "prevalent_fracture", "t2dm",
    "hiv", "hcv", "renal_failure", "frax_mof", "frax_hip",
)
_LABEL_PATTERN = re.compile(r"^(label|fracture_\d+y)$")
_TEXT_DTYPES = {c: "string" for c in (*STRING_COLUMNS, "group", "sex", "site")}


class PredictionSchemaError(ValueError):
    """A prediction file (or frame) does not follow the prediction schema; the message names file and column."""


def label_columns(columns: Sequence[str]) -> list[str]:
    """Binary label columns present in `columns`, `label` first, then `fracture_<N>y` in file order."""
    found = [c for c in columns if _LABEL_PATTERN.match(str(c))]
    return sorted(found, key=lambda c: (c != "label", c != "fracture_5y"))




# ---------------------------------------------------------------------------------------------- storage
def _is_file(path: str) -> bool:
    """Whether a file (not a folder) exists at a local path or URI."""
    fs, inner = storage.filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def _format(path: PathLike) -> str:
    """`parquet` or `csv` from the file name."""
    name = os.fspath(path).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise PredictionSchemaError(f"predictions file '{os.fspath(path)}': unknown format (use .parquet or .csv)")


# ---------------------------------------------------------------------------------------------- validation
def validate_predictions(df: pd.DataFrame, source: str = "<frame>") -> pd.DataFrame:
    """Check `df` against the schema and return it with normalised dtypes; raise PredictionSchemaError naming `source`."""
    where = f"predictions file '{source}'"
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise PredictionSchemaError(
            f"{where}: missing required column(s) {', '.join(repr(c) for c in missing)} "
            f"(required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(map(str, df.columns))})"
        )
    out = df.reset_index(drop=True).copy()

    for col in STRING_COLUMNS:
        out[col] = _as_string(out[col], where, col, allow_missing=False)
    if "group" in out.columns:
        out["group"] = _as_string(out["group"], where, "group", allow_missing=True)

    out["fold"] = _as_int(out["fold"], where, "fold")

    score = out["score"]
    if not (pd.api.types.is_numeric_dtype(score) and not pd.api.types.is_bool_dtype(score)):
        raise PredictionSchemaError(f"{where}: column 'score' must be numeric, got dtype {score.dtype}")
    score = score.astype("float64")
    bad = ~np.isfinite(score.to_numpy())
    if bad.any():
        raise PredictionSchemaError(
            f"{where}: column 'score' has {int(bad.sum())} NaN/infinite value(s) "
            f"(first at study_id {out.loc[bad, 'study_id'].iloc[0]!r})"
        )
    out["score"] = score

    kinds = set(out["score_kind"].unique())
    unknown = kinds - set(SCORE_KINDS)
    if unknown:
        raise PredictionSchemaError(
            f"{where}: column 'score_kind' has value(s) {sorted(unknown)}; expected one of {list(SCORE_KINDS)}"
        )
    per_model = out.groupby("model")["score_kind"].nunique()
    mixed = per_model[per_model > 1]
    if len(mixed):
        raise PredictionSchemaError(f"{where}: column 'score_kind' mixes kinds within model(s) {list(mixed.index)}")
    prob = out["score_kind"] == "probability"
    outside = prob & ((out["score"] < 0) | (out["score"] > 1))
    if outside.any():
        raise PredictionSchemaError(
            f"{where}: column 'score' has {int(outside.sum())} probability value(s) outside [0, 1] "
            f"(first at study_id {out.loc[outside, 'study_id'].iloc[0]!r})"
        )

    if "time_days" in out.columns:
        t = out["time_days"]
        if not pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t):
            raise PredictionSchemaError(f"{where}: column 'time_days' must be numeric, got dtype {t.dtype}")
        t = t.astype("float64")
        bad = ~np.isfinite(t.to_numpy()) | (t.to_numpy() <= 0)
        if bad.any():
            raise PredictionSchemaError(
                f"{where}: column 'time_days' has {int(bad.sum())} missing or non-positive value(s) "
                f"(first at study_id {out.loc[bad, 'study_id'].iloc[0]!r})"
            )
        out["time_days"] = t
    if "event" in out.columns:
        out["event"] = _as_binary(out["event"], where, "event", allow_missing=False).astype("int64")
    if ("time_days" in out.columns) != ("event" in out.columns):
        have, lack = ("time_days", "event") if "time_days" in out.columns else ("event", "time_days")
        raise PredictionSchemaError(f"{where}: column '{have}' is present but '{lack}' is missing")
    for col in label_columns(list(out.columns)):
        out[col] = _as_binary(out[col], where, col, allow_missing=True)

    key = ["model", "split", "fold", "patient_id", "study_id"]
    dup = out.duplicated(key, keep=False)
    if dup.any():
        first = out.loc[dup].iloc[0]
        raise PredictionSchemaError(
            f"{where}: {int(dup.sum())} duplicated rows for key ({', '.join(key)}), "
            f"e.g. model {first['model']!r} split {first['split']!r} fold {int(first['fold'])} "
            f"study_id {first['study_id']!r}"
        )
    return out


def _as_string(col: pd.Series, where: str, name: str, allow_missing: bool) -> pd.Series:
    """Column as pandas string dtype; integer ids are accepted and converted."""
    if pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col):
        col = col.astype("int64").astype(str)
    elif not (pd.api.types.is_string_dtype(col) or pd.api.types.is_object_dtype(col)
              or isinstance(col.dtype, pd.CategoricalDtype)):
        raise PredictionSchemaError(f"{where}: column '{name}' must hold strings, got dtype {col.dtype}")
    values = col.astype("object")
    present = values.notna()
    non_text = present & ~values.map(lambda v: isinstance(v, (str, np.str_, int, np.integer)))
    if non_text.any():
        example = values[non_text].iloc[0]
        raise PredictionSchemaError(
            f"{where}: column '{name}' must hold strings, found {type(example).__name__} value {example!r}"
        )
    if not allow_missing and (~present | (values.astype(str).str.len() == 0)).any():
        n = int((~present | (values.astype(str).str.len() == 0)).sum())
        raise PredictionSchemaError(f"{where}: column '{name}' has {n} missing/empty value(s)")
    return values.where(~present, values.astype(str)).astype("string")


def _as_int(col: pd.Series, where: str, name: str) -> pd.Series:
    """Column as int64; floats are accepted only when every value is a whole number."""
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        raise PredictionSchemaError(f"{where}: column '{name}' must be an integer, got dtype {col.dtype}")
    values = col.to_numpy(dtype="float64", na_value=np.nan)
    if np.isnan(values).any():
        raise PredictionSchemaError(f"{where}: column '{name}' has {int(np.isnan(values).sum())} missing value(s)")
    if not np.all(values == np.round(values)):
        raise PredictionSchemaError(f"{where}: column '{name}' must be an integer, found non-integer values")
    return pd.Series(values.astype("int64"), index=col.index, name=col.name)


def _as_binary(col: pd.Series, where: str, name: str, allow_missing: bool) -> pd.Series:
    """Column as float64 with values in {0, 1} (NaN allowed when `allow_missing`)."""
    if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
        raise PredictionSchemaError(f"{where}: column '{name}' must be 0/1, got dtype {col.dtype}")
    values = col.to_numpy(dtype="float64", na_value=np.nan)
    nan = np.isnan(values)
    if nan.any() and not allow_missing:
        raise PredictionSchemaError(f"{where}: column '{name}' has {int(nan.sum())} missing value(s)")
    bad = ~nan & ~np.isin(values, (0.0, 1.0))
    if bad.any():
        raise PredictionSchemaError(
            f"{where}: column '{name}' must be 0/1, found value {values[bad][0]!r}"
        )
    return pd.Series(values, index=col.index, name=col.name)


# ---------------------------------------------------------------------------------------------- write / read
def write_predictions(df: pd.DataFrame, path: PathLike, metadata: Mapping[str, Any] | None = None) -> str:
    """Validate and write predictions to Parquet or CSV (local or s3/gs), atomically; return the path written."""
    target = os.fspath(path)
    fmt = _format(target)
    table_df = validate_predictions(df, source=target)
    meta = {"schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    meta.update(jsonable(dict(metadata or {})))
    meta_json = json.dumps(meta, sort_keys=True)

    if fmt == "parquet":
        table = pa.Table.from_pandas(table_df, preserve_index=False)
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[METADATA_KEY] = meta_json.encode("utf-8")
        table = table.replace_schema_metadata(schema_meta)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.atomic_write_bytes(target, sink.getvalue().to_pybytes())
    else:
        # The sidecar goes first so that a reader never sees a data file without its metadata.
        storage.atomic_write_bytes(target + SIDECAR_SUFFIX, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        buf = io.StringIO()
        table_df.to_csv(buf, index=False)
        storage.atomic_write_bytes(target, buf.getvalue().encode("utf-8"))
    logger.info("wrote %d predictions (%d model(s)) to %s", len(table_df), table_df["model"].nunique(), target)
    return target


def read_prediction_metadata(path: PathLike) -> dict[str, Any]:
    """Run metadata of one prediction file (empty dict when the file carries none)."""
    target = os.fspath(path)
    if _format(target) == "parquet":
        fs, inner = storage.filesystem(target)
        with fs.open_input_file(inner) as f:
            raw = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
        return json.loads(raw.decode("utf-8")) if raw else {}
    sidecar = target + SIDECAR_SUFFIX
    return json.loads(storage.read_bytes(sidecar).decode("utf-8")) if _is_file(sidecar) else {}


def _read_one(path: str) -> tuple[pd.DataFrame, str]:
    """Read and validate one prediction file (or a folder's predictions.parquet/.csv); return it and its file path."""
    fs, inner = storage.filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        for name in ("predictions.parquet", "predictions.csv"):
            candidate = path.rstrip("/") + "/" + name
            if _is_file(candidate):
                return _read_one(candidate)
        raise PredictionSchemaError(f"predictions folder '{path}': holds no predictions.parquet or predictions.csv")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"predictions file '{path}' does not exist")
    fmt = _format(path)
    try:
        if fmt == "parquet":
            with fs.open_input_file(inner) as f:
                df = pq.read_table(f).to_pandas()
        else:
            data = storage.read_bytes(path)
            if path.lower().endswith(".gz"):
                import gzip

                data = gzip.decompress(data)
            header = list(pd.read_csv(io.BytesIO(data), nrows=0).columns)
            dtypes = {c: t for c, t in _TEXT_DTYPES.items() if c in header}
            df = pd.read_csv(io.BytesIO(data), dtype=dtypes)
    except (pa.ArrowInvalid, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PredictionSchemaError(f"predictions file '{path}': cannot be parsed as {fmt}: {exc}") from exc
    out = validate_predictions(df, source=path)
    out.attrs = {}
    return out, path


def read_predictions(paths: PathLike | Sequence[PathLike]) -> pd.DataFrame:
    """Read, validate and concatenate prediction files; `attrs["sources"]` maps each file to its metadata."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("read_predictions: no prediction files given")
    frames: list[pd.DataFrame] = []
    sources: dict[str, dict[str, Any]] = {}
    for item in items:
        df, path = _read_one(os.fspath(item))
        df["_source"] = path
        frames.append(df)
        sources[path] = read_prediction_metadata(path)
    combined = pd.concat(frames, ignore_index=True, sort=False)
    key = ["model", "split", "fold", "patient_id", "study_id"]
    dup = combined.duplicated(key, keep=False)
    if dup.any():
        first = combined.loc[dup].iloc[0]
        files = sorted(combined.loc[dup & (combined["model"] == first["model"]), "_source"].unique())
        raise PredictionSchemaError(
            f"predictions files {', '.join(repr(f) for f in files)}: model {first['model']!r} has the same "
            f"study_id {first['study_id']!r} (split {first['split']!r}, fold {int(first['fold'])}) in more than one file"
        )
    combined = combined.rename(columns={"_source": "source_file"})
    combined.attrs = {"sources": sources}
    return combined

