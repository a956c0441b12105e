"""QC pictures of a preprocessing run: where each study's PNG goes, how bad a QC row is, the contact sheet.

A pipeline's `process_study` puts the PNG bytes of its picture (`raypipe.preprocess.qc_png`) under
`PICTURE_KEY` in the QC row; `raypipe.data.shards` writes them to `OUT/qc/<hash>.png` (temp then rename),
records that relative path in the QC row's `qc_png` column, and after the run tiles the pictures of the
worst studies into `OUT/qc/contact_sheet.png`. File names hash the patient and study ids, so no identifier
(or patient name) appears in a file name; qc.csv maps studies to their pictures.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from raypipe import storage

log = logging.getLogger(__name__)

PICTURE_KEY = "_qc_picture"
PICTURE_DIR = "qc"
CONTACT_SHEET = "contact_sheet.png"
CONTACT_SHEET_STUDIES = 12


def picture_name(patient_id: Any, study_id: Any) -> str:
    """OUT-relative path of a study's QC picture: `qc/<16 hex digits of a hash of the ids>.png`."""
    digest = hashlib.sha256(f"{patient_id}\x1f{study_id}".encode()).hexdigest()[:16]
    return f"{PICTURE_DIR}/{digest}.png"


def qc_severity(row: Mapping[str, Any]) -> float:
    """How much a study needs a look: errors, then skipped studies, then warnings, padding and low confidence."""
    status = str(row.get("status") or "")
    score = {"error": 100.0, "skipped": 50.0}.get(status, 0.0)
    warnings = str(row.get("warnings") or "")
    score += 10.0 * len([w for w in warnings.split(";") if w.strip()])
    for col in ("padded_slices_bone", "padded_slices_muscle"):
        value = pd.to_numeric(row.get(col), errors="coerce")
        if value is not None and not pd.isna(value):
            score += min(float(value), 10.0)
    conf = pd.to_numeric(row.get("keypoint_confidence"), errors="coerce")
    if conf is not None and not pd.isna(conf) and math.isfinite(float(conf)):
        score += 10.0 * max(0.0, 1.0 - float(conf))
    return score


def write_picture(out: str, qc: dict[str, Any]) -> None:
    """Move a QC row's picture bytes (if any) to OUT/qc/<hash>.png and record the path in `qc_png`."""
    png = qc.pop(PICTURE_KEY, None)
    if not png:
        qc["qc_png"] = ""
        return
    name = picture_name(qc.get("patient_id"), qc.get("study_id"))
    storage.atomic_write_bytes(storage.join(out, *name.split("/")), png)
    qc["qc_png"] = name


def write_contact_sheet(out: str, qc: pd.DataFrame, n: int = CONTACT_SHEET_STUDIES) -> str | None:
    """Tile the pictures of the `n` worst studies (by `qc_severity`) into OUT/qc/contact_sheet.png; its path."""
    from raypipe.preprocess.contact_sheet import contact_sheet

    if "qc_png" not in qc.columns:
        return None
    rows = qc[qc["qc_png"].astype(str).str.len() > 0].copy()
    if rows.empty:
        return None
    rows["_severity"] = [qc_severity(r) for r in rows.to_dict(orient="records")]
    worst = rows.sort_values("_severity", ascending=False, kind="mergesort").head(n)
    items = []
    for r in worst.to_dict(orient="records"):
        path = storage.join(out, *str(r["qc_png"]).split("/"))
        if not storage.exists(path):
            continue
        first = str(r.get("message") or "") or str(r.get("warnings") or "").split(";")[0].strip() or "no warnings"
        items.append((f"{r['study_id']} [{r['status']}] {first}", storage.read_bytes(path)))
    sheet = contact_sheet(items, title=f"{len(items)} studies with the most QC findings (worst first)")
    if sheet is None:
        return None
    path = storage.join(out, PICTURE_DIR, CONTACT_SHEET)
    storage.atomic_write_bytes(path, sheet)
    log.info("QC contact sheet of %d studies: %s", len(items), path)
    return path
