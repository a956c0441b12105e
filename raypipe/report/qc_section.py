"""The report's preprocessing QC section: counts from qc.csv and the contact sheet of the worst studies.

Preprocessing folders are the ones given (`raypipe.evaluate.evaluate(..., qc_dirs=...)`) plus those the
prediction files point to: a `data` entry in their run metadata, or in the `cv.json` beside them.
"""
from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from raypipe import storage
from raypipe.report import html as H

log = logging.getLogger(__name__)

CONTACT_SHEET = ("qc", "contact_sheet.png")


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if storage.is_uri(path) else os.path.dirname(path)


def preprocessing_dirs(sources: Mapping[str, Mapping[str, Any]], given: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Preprocessing output folders: `given` first, then the `data` folders named by the prediction files' runs."""
    found = [str(g) for g in given]
    for path, meta in sources.items():
        if isinstance(meta.get("data"), str):
            found.append(meta["data"])
        cv = storage.join(_parent(str(path)), "cv.json")
        try:
            if storage.exists(cv):
                data = json.loads(storage.read_bytes(cv)).get("data")
                if isinstance(data, str):
                    found.append(data)
        except (OSError, ValueError) as exc:
            log.warning("could not read %s: %s", cv, exc)
    return list(dict.fromkeys(found))


def _counts(folder: str) -> list[str] | None:
    """One table row of qc.csv counts for a folder, or None without a qc.csv."""
    path = storage.join(folder, "qc.csv")
    if not storage.exists(path):
        return None
    qc = pd.read_csv(io.BytesIO(storage.read_bytes(path)), keep_default_na=False, dtype=str)
    status = qc["status"].value_counts() if "status" in qc.columns else pd.Series(dtype=int)
    warned = int((qc.get("warnings", pd.Series(dtype=str)).str.len() > 0).sum())
    pictures = int((qc.get("qc_png", pd.Series(dtype=str)).str.len() > 0).sum())
    return [folder, str(len(qc)), str(int(status.get("ok", 0))), str(warned), str(int(status.get("skipped", 0))),
            str(int(status.get("error", 0))), str(pictures)]


def qc_section_parts(folders: Sequence[str], out_dir: str) -> list[str]:
    """HTML parts of the QC section (empty when no folder has a qc.csv); contact sheets are copied to `out_dir`."""
    rows, figures = [], []
    for k, folder in enumerate(folders):
        try:
            row = _counts(folder)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("QC of %s not shown: %s", folder, exc)
            continue
        if row is None:
            continue
        rows.append(row)
        sheet = storage.join(folder, *CONTACT_SHEET)
        if storage.exists(sheet):
            png = storage.read_bytes(sheet)
            name = f"qc_contact_sheet_{k}.png"
            storage.atomic_write_bytes(storage.join(out_dir, name), png)
            figures.append(H.figure(png, f"Studies with the most QC findings in {folder} (worst first): chosen "
                                         "slices, crop boxes and mask outlines (CT) or keypoints, alignment axis "
                                         "and patches (radiographs). One picture per study is in its qc/ folder, "
                                         "listed in qc.csv.", filename=name))
    if not rows:
        return []
    table = H.table(["Preprocessing output", "Studies", "OK", "With warnings", "Skipped", "Errors", "Pictures"],
                    rows, caption="Preprocessing quality control (qc.csv)",
                    note="Skipped: input problems named in qc.csv (missing files, missing vertebrae, implausible "
                         "keypoints); errors: unexpected failures.")
    return [table, f'<div class="figures">{"".join(figures)}</div>' if figures else ""]
