"""`raypipe manifest build`: a DICOM export + a clinical CSV (+ TotalSegmentator masks) -> a valid manifest.

The series choice is `raypipe.io.export`; this module joins the clinical CSV (one row per patient), matches
mask folders to studies, writes `manifest.csv` and `selection.csv` (every series/image: taken or why not),
then validates the manifest. The schema and the rules are in docs/MANIFEST.md.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from raypipe.io.errors import RaypipeInputError
from raypipe.io.export import DicomFile, scan_export
from raypipe.io.series_selection import Decision, SelectionRules, select_series
from raypipe.io.manifest import (
    KNOWN_COLUMNS, PATH_COLUMNS, ManifestReport, validate_manifest, value_problems,
)

OWNED_COLUMNS = ("study_id", "modality", "mask_labels") + PATH_COLUMNS   # written by the build, not the CSV
OUTCOME_COLUMNS = ("time_days", "event")
SELECTION_COLUMNS = (
    "patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality", "series_number",
    "series_description", "files", "decision", "reason", "study_id", "image_path", "kernel", "slice_mm",
    "coverage_mm", "view_position", "body_part", "location",
)


@dataclass
class BuildResult:
    """What `build_manifest` wrote and found."""

    manifest: Path
    selection: Path
    report: ManifestReport
    studies: int
    decisions: list[Decision]
    non_dicom: int
    unreadable: int
    unmatched_masks: list[str] = field(default_factory=list)
    link_folders: int = 0

    def summary(self) -> str:
        """A few lines for the terminal: counts, warnings and the validation result."""
        taken = sum(d.taken for d in self.decisions)
        lines = [
            f"{len(self.decisions)} series/images read, {taken} taken, {len(self.decisions) - taken} skipped "
            f"(reasons: {self.selection}); {self.non_dicom} non-DICOM file(s) ignored"
            + (f", {self.unreadable} unreadable DICOM file(s) listed there" if self.unreadable else ""),
        ]
        if self.link_folders:
            lines.append(f"{self.link_folders} series shared a folder with other series: linked into "
                         f"{self.manifest.parent / 'series'}")
        if self.unmatched_masks:
            lines.append(f"mask entries matching no study: {', '.join(self.unmatched_masks)}")
        lines.append(self.report.summary())
        return "\n".join(lines)


def read_clinical(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The clinical CSV, one row per patient_id; any bad row/column/value is one RaypipeInputError listing all."""
    p = Path(path)
    if not p.is_file():
        raise RaypipeInputError("clinical CSV not found", path=str(p))
    try:
        t = pd.read_csv(p, dtype={"patient_id": str, "sex": str, "site": str, "split": str}, keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - any parser error becomes one clear message
        raise RaypipeInputError(f"cannot read clinical CSV: {e}", path=str(p)) from e
    t.columns = [str(c).strip() for c in t.columns]
    problems: list[str] = []
    if "patient_id" not in t:
        lowered = {re.sub(r"[^a-z]", "", c.lower()): c for c in t.columns}
        guess = difflib.get_close_matches("patientid", list(lowered), n=1, cutoff=0.6)
        hint = f" (did you mean to rename '{lowered[guess[0]]}'?)" if guess else ""
        raise RaypipeInputError(f"column 'patient_id' missing{hint}; columns: {list(t.columns)}", path=str(p))
    for c in OUTCOME_COLUMNS:
        if c not in t:
            problems.append(f"column '{c}': required column missing (outcome per patient)")
    for c in OWNED_COLUMNS:
        if c in t:
            problems.append(f"column '{c}': written by `manifest build` from the export; remove it from the CSV")
    if len(t) == 0:
        problems.append("no rows")
    cols = list(t.columns)
    for i, row in enumerate(t.itertuples(index=False), start=1):
        r = dict(zip(cols, row))
        pid = r["patient_id"]
        if not isinstance(pid, str) or not pid.strip():
            problems.append(f"row {i}, column 'patient_id': empty value")
        problems += [str(x) for x in value_problems(i, r)]
    ids = t["patient_id"].astype(str).str.strip()
    for i in [int(k) for k in (ids.duplicated(keep="first") & t["patient_id"].notna()).to_numpy().nonzero()[0]]:
        first = int((ids == ids.iloc[i]).to_numpy().nonzero()[0][0]) + 1
        problems.append(f"row {i + 1}, column 'patient_id': duplicate patient (first in row {first}) "
                        f"(value {ids.iloc[i]!r}); the CSV has one row per patient")
    if problems:
        raise RaypipeInputError(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems), path=str(p))
    t["patient_id"] = ids
    return t


def find_masks(masks_dir: str | os.PathLike[str] | None) -> dict[str, Path]:
    """Mask entries of DIR by name: TotalSegmentator folders (KEY/) or multilabel files (KEY.nii[.gz])."""
    if masks_dir is None:
        return {}
    d = Path(masks_dir)
    if not d.is_dir():
        raise RaypipeInputError("masks folder not found", path=str(d), field="--masks")
    out: dict[str, Path] = {}
    for e in sorted(d.iterdir()):
        if e.name.startswith("."):
            continue
        if e.is_dir():
            out[e.name] = e
        elif e.name.endswith((".nii.gz", ".nii")):
            out[e.name.removesuffix(".gz").removesuffix(".nii")] = e
    return out


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base))


def _series_folder(d: Decision, others_by_folder: dict[Path, set[str]], out_dir: Path,
                   study_id: str) -> tuple[Path, bool]:
    """The folder that holds exactly this series: its own, or a folder of links made beside the manifest.

    Links are made when the series is spread over folders, shares one with other series, or a file is there twice.
    """
    s = d.series
    folders = s.folders
    if len(folders) == 1 and not s.duplicates:
        folder = next(iter(folders))
        if others_by_folder.get(folder, set()) <= {s.first.series_uid}:
            return folder, False
    link_dir = out_dir / "series" / study_id
    link_dir.mkdir(parents=True, exist_ok=True)
    for old in link_dir.iterdir():
        old.unlink()
    for k, f in enumerate(s.files):
        (link_dir / f"{k:05d}_{f.path.name}").symlink_to(os.path.relpath(os.path.abspath(f.path), link_dir))
    return link_dir, True


def _match_mask(f: DicomFile, masks: dict[str, Path], ct_studies_of: dict[str, int]) -> tuple[Path | None, str | None]:
    """The mask entry of a CT study: by StudyInstanceUID, accession/study id, else PatientID when unambiguous."""
    for key in (f.study_uid, f.accession, f.study_id):
        if key and key in masks:
            return masks[key], key
    if f.patient_id in masks and ct_studies_of.get(f.patient_id, 0) == 1:
        return masks[f.patient_id], f.patient_id
    return None, None


def build_manifest(export: str | os.PathLike[str], clinical: str | os.PathLike[str], out: str | os.PathLike[str],
                   masks: str | os.PathLike[str] | None = None, rules: SelectionRules | None = None,
                   selection: str | os.PathLike[str] | None = None) -> BuildResult:
    """Scan `export`, choose the series, join `clinical`, match `masks`, write and validate the manifest `out`."""
    out_p = Path(out)
    if out_p.suffix.lower() != ".csv":
        raise RaypipeInputError("the manifest is written as CSV: give a path ending in .csv", path=str(out_p),
                                field="--out")
    table = read_clinical(clinical)
    mask_entries = find_masks(masks)
    scan = scan_export(export)
    decisions = select_series(scan, rules)
    out_dir = out_p.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    sel_p = Path(selection) if selection is not None else out_dir / "selection.csv"

    taken = [d for d in decisions if d.taken]
    known = set(table["patient_id"])
    missing = sorted({d.series.first.patient_id for d in taken} - known)
    by_folder: dict[Path, set[str]] = {}
    for s in scan.series:
        for f in s.files:
            by_folder.setdefault(f.path.parent, set()).add(s.first.series_uid)
    ct_studies_of: dict[str, int] = {}
    for d in taken:
        if d.kind == "CT":
            ct_studies_of[d.series.first.patient_id] = ct_studies_of.get(d.series.first.patient_id, 0) + 1
    kinds_of_study: dict[str, set[str]] = {}
    for d in taken:
        kinds_of_study.setdefault(d.series.first.study_uid, set()).add(d.kind)

    rows: list[dict[str, object]] = []
    image_of: dict[int, tuple[str, str]] = {}
    used_masks: set[str] = set()
    links = 0
    clinical_by_id = table.set_index("patient_id")
    for d in taken:
        f = d.file or d.series.first
        if f.patient_id not in known:
            continue
        study_id = re.sub(r"[^A-Za-z0-9._-]+", "_", f.study_uid).strip("_")
        study_id = study_id if len(kinds_of_study[f.study_uid]) == 1 else f"{study_id}_{d.kind}"
        row: dict[str, object] = {"patient_id": f.patient_id, "study_id": study_id, "modality": d.kind}
        if d.kind == "CT":
            folder, linked = _series_folder(d, by_folder, out_dir, study_id)
            links += linked
            row["image_path"] = _rel(folder, out_dir)
            mpath, key = _match_mask(f, mask_entries, ct_studies_of)
            if mpath is not None and key is not None:
                used_masks.add(key)
                row["mask_path"] = _rel(mpath, out_dir)
                if mpath.is_file():
                    row["mask_labels"] = "totalseg"
                elif (mpath / "vertebrae_body.nii.gz").is_file():
                    row["body_mask_path"] = _rel(mpath / "vertebrae_body.nii.gz", out_dir)
        else:
            row["image_path"] = _rel(f.path, out_dir)
        row.update({k: v for k, v in clinical_by_id.loc[f.patient_id].items()})
        image_of[id(d)] = (study_id, str(row["image_path"]))
        rows.append(row)

    _write_selection(sel_p, decisions, image_of, scan.root, missing, scan.unreadable)
    if missing:
        raise RaypipeInputError(
            f"{len(missing)} patient(s) of the export have no row in the clinical CSV: {', '.join(missing[:20])}"
            + (" ..." if len(missing) > 20 else "") + f" (their series are listed in {sel_p})",
            path=str(clinical), field="patient_id")
    if not rows:
        raise RaypipeInputError(f"no usable CT series or lateral lumbar radiograph found; see {sel_p} for why "
                                "each series was skipped", path=str(export))
    columns = ["patient_id", "study_id", "modality", "image_path", "time_days", "event"]
    columns += [c for c in ("mask_path", "mask_labels", "body_mask_path") if any(c in r for r in rows)]
    columns += [c for c in table.columns if c not in columns]
    frame = pd.DataFrame(rows).reindex(columns=columns).sort_values(["patient_id", "study_id"], kind="stable")
    tmp = out_p.with_name(f".{out_p.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, out_p)
    report = validate_manifest(out_p)
    unknown = [c for c in table.columns if c not in KNOWN_COLUMNS and c != "patient_id"]
    if unknown:
        report.warnings.append(f"clinical columns copied as they are (not in the schema): {', '.join(unknown)}")
    return BuildResult(manifest=out_p, selection=sel_p, report=report, studies=len(rows), decisions=decisions,
                       non_dicom=len(scan.non_dicom), unreadable=len(scan.unreadable),
                       unmatched_masks=[_unmatched(k, ct_studies_of) for k in sorted(set(mask_entries) - used_masks)],
                       link_folders=links)


def _unmatched(key: str, ct_studies_of: dict[str, int]) -> str:
    n = ct_studies_of.get(key, 0)
    return f"{key} (patient with {n} CT studies: name each by its StudyInstanceUID)" if n > 1 else key


def _write_selection(path: Path, decisions: list[Decision], image_of: dict[int, tuple[str, str]], root: Path,
                     missing: list[str], unreadable: list[tuple[Path, str]]) -> None:
    recs = []
    for d in decisions:
        s, f = d.series, d.file or d.series.first
        study_id, image = image_of.get(id(d), ("", ""))
        reason = d.reason
        if d.taken and f.patient_id in missing:
            reason = "eligible, but the patient has no row in the clinical CSV"
        recs.append({
            "patient_id": f.patient_id, "study_instance_uid": f.study_uid, "series_instance_uid": f.series_uid,
            "sop_instance_uid": d.file.sop_uid if d.file is not None else "", "modality": f.modality,
            "series_number": f.series_number, "series_description": f.description,
            "files": 1 if d.file is not None else len(s.files) + len(s.duplicates),
            "decision": "taken" if d.taken and image else "skipped", "reason": reason, "study_id": study_id,
            "image_path": image, "kernel": f.kernel if d.kind == "CT" else "", "slice_mm": d.slice_mm,
            "coverage_mm": d.coverage_mm, "view_position": f.view_position, "body_part": f.body_part,
            "location": _rel(f.path if d.file is not None else f.path.parent, root),
        })
    for p, why in unreadable:
        recs.append({"decision": "skipped", "reason": f"unreadable DICOM file: {why}", "files": 1,
                     "location": _rel(p, root)})
    frame = pd.DataFrame(recs).reindex(columns=list(SELECTION_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def manifest_build_cli(a: argparse.Namespace) -> int:
    """`raypipe manifest build`: build, print the summary, exit 1 when the manifest is invalid."""
    rules = SelectionRules(min_slice_mm=a.min_slice_mm, max_slice_mm=a.max_slice_mm,
                           min_coverage_mm=a.min_coverage_mm, max_tilt_deg=a.max_tilt_deg)
    result = build_manifest(a.export, a.clinical, a.out, masks=a.masks, rules=rules, selection=a.selection)
    print(result.summary())
    print(f"manifest: {result.manifest}")
    return 0 if result.report.ok else 1
