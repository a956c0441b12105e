"""Cohort manifest: read a CSV/Parquet of imaging studies and report every problem at once.

Nothing downstream runs on an invalid manifest: `load_manifest` raises `ManifestError` listing each
problem with its row (1-based data row; the CSV line is row + 1), column and value.
The manifest and every path in it may be local or an `s3://` / `gs://` URI (`raypipe.storage`); relative
paths resolve against the manifest's own folder, local or remote.
"""
from __future__ import annotations

import difflib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from raypipe import storage
from raypipe.clinical import SEX_CODES, ClinicalValueError, clinical_value
from raypipe.io.errors import RaypipeInputError

REQUIRED_COLUMNS = ("patient_id", "study_id", "modality", "image_path", "time_days", "event")
PATH_COLUMNS = ("image_path", "mask_path", "body_mask_path", "keypoints_path", "followup_image_path")
BINARY_COLUMNS = (
    "event", "prevalent_fracture", "smoker", "alcohol", "glucocorticoid", "secondary_osteoporosis",
    "rheumatoid_arthritis", "prior_fracture", "t2dm", "hiv", "hcv", "renal_failure",
)
NUMERIC_COLUMNS = ("time_days", "age", "height_cm", "weight_kg", "bmi", "frax_mof", "frax_hip", "followup_years")
OPTIONAL_COLUMNS = (
    "mask_path", "mask_labels", "body_mask_path", "keypoints_path", "site", "split", "prevalent_fracture",
    "age", "sex", "height_cm", "weight_kg", "bmi", "smoker", "alcohol", "glucocorticoid",
    "secondary_osteoporosis", "rheumatoid_arthritis", "prior_fracture", "t2dm", "hiv", "hcv",
    "renal_failure", "frax_mof", "frax_hip",
    "followup_image_path", "followup_years",  # XR: a real follow-up radiograph and its years after baseline (Diff-X)
)
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
MODALITIES = ("CT", "XR")
MASK_LABEL_CONVENTIONS = ("verse", "totalseg")


@dataclass(frozen=True)
class ManifestProblem:
    """One problem in a manifest: where it is and what is wrong."""

    row: int | None  # 1-based data row, None for whole-file problems
    column: str | None
    value: object
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        loc = ", ".join(where) or "manifest"
        val = "" if self.value is None else f" (value {self.value!r})"
        return f"{loc}: {self.message}{val}"


@dataclass
class ManifestReport:
    """Result of validation: the parsed table and every problem found."""

    path: Path | str  # str for URIs
    table: pd.DataFrame
    problems: list[ManifestProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the manifest can be used downstream."""
        return not self.problems

    def summary(self) -> str:
        """Human-readable report: counts and each problem on its own line."""
        t = self.table
        head = f"{self.path}: {len(t)} studies"
        if "patient_id" in t:
            head += f", {t['patient_id'].nunique()} patients"
        if "modality" in t:
            counts = t["modality"].value_counts().to_dict()
            head += ", " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        if "event" in t and pd.api.types.is_numeric_dtype(t["event"]):
            head += f", {int(np.nansum(t['event']))} events"
        lines = [head]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems]
        else:
            lines.append("valid")
        return "\n".join(lines)


class ManifestError(RaypipeInputError):
    """An invalid manifest; `problems` holds every issue found."""

    def __init__(self, report: ManifestReport):
        self.report = report
        super().__init__(report.summary())
        self.path = str(report.path)


def read_manifest_table(path: str | Path) -> pd.DataFrame:
    """Read the raw manifest table (CSV or Parquet) with identifiers kept as strings."""
    p = _manifest_path(path)
    if not _is_file(p):
        raise RaypipeInputError("manifest not found", path=str(p))
    try:
        src = io.BytesIO(storage.read_bytes(p)) if storage.is_uri(p) else p
        if str(p).lower().endswith((".parquet", ".pq")):
            return pd.read_parquet(src)
        return pd.read_csv(src, dtype={"patient_id": str, "study_id": str, "site": str, "split": str,
                                     "sex": str, "mask_labels": str, "modality": str},
                           keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - any parser error becomes one clear message
        raise RaypipeInputError(f"cannot read manifest: {e}", path=str(p)) from e


def resolve_path(value: object, base: str | os.PathLike) -> str | None:
    """Resolve a manifest path cell (local or URI) against the manifest's folder (local or URI); None for empty cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return storage.resolve(str(value), base)


def _manifest_path(path: str | os.PathLike) -> Path | str:
    return str(path) if storage.is_uri(path) else Path(storage.local_path(path))


def _is_file(path: str | os.PathLike) -> bool:
    if not storage.is_uri(path):
        return Path(path).is_file()
    fs, p = storage.filesystem(path)
    import pyarrow.fs as pafs

    return fs.get_file_info(p).type == pafs.FileType.File


def validate_manifest(path: str | Path, check_files: bool = True) -> ManifestReport:
    """Check a manifest against docs/MANIFEST.md; every problem is collected, none raised."""
    p = _manifest_path(path)
    table = read_manifest_table(p)
    rep = ManifestReport(path=p, table=table)
    add = rep.problems.append
    cols = list(table.columns)

    for c in REQUIRED_COLUMNS:
        if c not in table:
            guess = difflib.get_close_matches(c, [x for x in cols if x not in KNOWN_COLUMNS], n=1)
            hint = f" (did you mean to rename '{guess[0]}'?)" if guess else ""
            add(ManifestProblem(None, c, None, f"required column missing{hint}"))
    for c in cols:
        if c in KNOWN_COLUMNS:
            continue
        guess = difflib.get_close_matches(c, [k for k in KNOWN_COLUMNS if k not in cols], n=1, cutoff=0.8)
        if guess:
            add(ManifestProblem(None, c, None, f"unknown column, did you mean '{guess[0]}'?"))
    if len(table) == 0:
        add(ManifestProblem(None, None, None, "manifest has no rows"))
        return rep

    base = storage.parent(p)
    no_masks: list[int] = []
    for i, row in enumerate(table.itertuples(index=False), start=1):
        r = dict(zip(cols, row))
        _check_row(i, r, base, check_files, add, no_masks.append)
    if no_masks:
        shown = ", ".join(str(i) for i in no_masks[:10]) + (" ..." if len(no_masks) > 10 else "")
        rep.warnings.append(f"{len(no_masks)} CT stud{'y' if len(no_masks) == 1 else 'ies'} without mask_path "
                            f"(rows {shown}): preprocessing skips them (status 'skipped' in qc.csv) until "
                            "vertebra masks are added")

    if "study_id" in table:
        dup = table["study_id"].astype(str)
        for i in np.flatnonzero(dup.duplicated(keep="first").to_numpy()):
            first = int(np.flatnonzero((dup == dup.iloc[i]).to_numpy())[0]) + 1
            add(ManifestProblem(int(i) + 1, "study_id", dup.iloc[i], f"duplicate study (first seen in row {first})"))
    if "split" in table and "patient_id" in table:
        sub = table[["patient_id", "split"]].dropna()
        per = sub.groupby("patient_id")["split"].nunique()
        for pid in per[per > 1].index:
            rows = [int(i) + 1 for i in np.flatnonzero((table["patient_id"] == pid).to_numpy())]
            splits = sorted(set(sub.loc[sub["patient_id"] == pid, "split"]))
            add(ManifestProblem(rows[0], "split", pid,
                                f"patient is in several splits {splits} (rows {rows}); splits are by patient"))
    if "patient_id" in table and "time_days" in table and "event" in table:
        per = table.groupby("patient_id")[["time_days", "event"]].nunique(dropna=False)
        for pid in per[(per["time_days"] > 1) | (per["event"] > 1)].index:
            rep.warnings.append(f"patient {pid!r} has different outcomes on different studies")
    return rep


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def value_problems(i: int, r: dict) -> list[ManifestProblem]:
    """Problems with the numeric, 0/1 and sex values of one row (row `i`, 1-based); shared with clinical CSVs."""
    out: list[ManifestProblem] = []
    add = out.append
    for c in NUMERIC_COLUMNS:
        if c not in r or _is_missing(r[c]):
            if c == "time_days" and c in r:
                add(ManifestProblem(i, c, None, "empty value"))
            continue
        try:
            v = float(r[c])
        except (TypeError, ValueError):
            add(ManifestProblem(i, c, r[c], "not a number"))
            continue
        if not math.isfinite(v):
            add(ManifestProblem(i, c, r[c], "not a finite number"))
        elif c == "time_days" and v <= 0:
            add(ManifestProblem(i, c, r[c], "time must be > 0 days"))
        elif c == "followup_years" and v <= 0:
            add(ManifestProblem(i, c, r[c], "follow-up must be > 0 years after baseline"))
        elif c == "age" and not 0 <= v <= 120:
            add(ManifestProblem(i, c, r[c], "age outside 0-120 years"))
        elif c in ("frax_mof", "frax_hip") and not 0 <= v <= 100:
            add(ManifestProblem(i, c, r[c], "FRAX probability must be in 0-100 %"))
    for c in BINARY_COLUMNS:
        if c not in r or (_is_missing(r[c]) and c != "event"):
            continue
        if _is_missing(r[c]) or str(r[c]).strip() not in ("0", "1", "0.0", "1.0", "True", "False"):
            add(ManifestProblem(i, c, None if _is_missing(r[c]) else r[c], "must be 0 or 1"))
    if "sex" in r and not _is_missing(r["sex"]):
        try:  # the one clinical encoder decides, as in training and serving
            clinical_value("sex", str(r["sex"]))
        except ClinicalValueError:
            add(ManifestProblem(i, "sex", r["sex"], f"unknown sex code, expected one of {list(SEX_CODES)}"))
    return out


def _check_row(i: int, r: dict, base: Path, check_files: bool, add, warn) -> None:
    for c in ("patient_id", "study_id", "image_path"):
        if c in r and _is_missing(r[c]):
            add(ManifestProblem(i, c, None, "empty value"))
    mod = r.get("modality")
    if "modality" in r and (not isinstance(mod, str) or mod.strip().upper() not in MODALITIES):
        add(ManifestProblem(i, "modality", mod, f"modality must be one of {list(MODALITIES)}"))
    for problem in value_problems(i, r):
        add(problem)
    ml = r.get("mask_labels")
    if ml is not None and not _is_missing(ml) and str(ml) not in MASK_LABEL_CONVENTIONS:
        lp = _resolve_or_none(ml, base)
        if not (str(ml).endswith(".json") and lp is not None and (not check_files or _is_file(lp))):
            add(ManifestProblem(i, "mask_labels", ml,
                                f"must be one of {list(MASK_LABEL_CONVENTIONS)} or a path to a JSON label map"))
    if check_files:
        for c in PATH_COLUMNS:
            if c not in r:
                continue
            try:
                fp = resolve_path(r[c], base)
            except ValueError as e:
                add(ManifestProblem(i, c, r[c], str(e)))
                continue
            if fp is not None and not storage.exists(fp):
                add(ManifestProblem(i, c, r[c], f"file not found ({fp})"))
    if isinstance(mod, str) and mod.strip().upper() == "CT" and _is_missing(r.get("mask_path")):
        warn(i)


def load_manifest(path: str | Path, check_files: bool = True) -> pd.DataFrame:
    """Validated manifest with normalised types and absolute paths; raises ManifestError if invalid."""
    rep = validate_manifest(path, check_files=check_files)
    if not rep.ok:
        raise ManifestError(rep)
    t = rep.table.copy()
    base = storage.parent(_manifest_path(path))
    t["patient_id"] = t["patient_id"].astype(str)
    t["study_id"] = t["study_id"].astype(str)
    t["modality"] = t["modality"].str.strip().str.upper()
    t["time_days"] = t["time_days"].astype(float)
    for c in BINARY_COLUMNS:
        if c in t:
            t[c] = t[c].map(lambda v: np.nan if _is_missing(v) else float(str(v) in ("1", "1.0", "True")))
    t["event"] = t["event"].astype(int)
    if "sex" in t:
        t["sex"] = t["sex"].map(lambda v: None if _is_missing(v) else str(v).strip().upper())
    for c in PATH_COLUMNS:
        if c in t:
            t[c] = [_resolve_or_none(v, base) for v in t[c]]
    if "mask_labels" in t:  # a JSON label map given by path resolves like the other paths
        t["mask_labels"] = [v if _is_missing(v) or str(v) in MASK_LABEL_CONVENTIONS else _resolve_or_none(v, base)
                            for v in t["mask_labels"]]
    return t


def _resolve_or_none(value: object, base: str) -> str | None:
    """`resolve_path`, with paths that cannot resolve (absolute local paths in a remote manifest) as None."""
    try:
        return resolve_path(value, base)
    except ValueError:
        return None
