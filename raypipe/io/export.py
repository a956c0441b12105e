"""A DICOM export (PACS/CD dump): read every file's header and group the files by study and series.

Pure header work: files are read with pydicom `stop_before_pixels`, never decoded. `scan_export` finds every
DICOM file under a folder (any nesting, any file names; other files are counted and ignored) and groups them
into `SeriesInfo`; `raypipe.io.series_selection` then decides which series the models get.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
HEADER_TAGS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "StudyID", "AccessionNumber", "StudyDate", "SeriesNumber", "InstanceNumber", "SeriesDescription",
    "ProtocolName", "ImageType", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
    "PixelSpacing", "ConvolutionKernel", "ViewPosition", "ImageLaterality", "Laterality", "BodyPartExamined",
    "Rows", "Columns", "NumberOfFrames", "PresentationIntentType", "FrameOfReferenceUID",
]
FOLDER_KEY = "folder:"   # prefix of the study/series keys made up for files without UIDs


@dataclass(frozen=True)
class DicomFile:
    """The header fields of one DICOM file that the selection rules look at."""

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    study_id: str
    frame_of_reference: str
    accession: str
    study_date: str
    series_number: int | None
    instance_number: int | None
    description: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    slice_thickness: float | None
    kernel: str
    view_position: str
    laterality: str
    body_part: str
    rows: int | None
    columns: int | None
    frames: int
    presentation_intent: str


@dataclass
class SeriesInfo:
    """One SeriesInstanceUID: its files (duplicates of one SOPInstanceUID dropped) and shared header fields."""

    files: list[DicomFile]
    duplicates: list[Path] = field(default_factory=list)   # further copies of an instance already in `files`

    @property
    def first(self) -> DicomFile:
        """The file whose header stands for the series (lowest instance number)."""
        return self.files[0]

    @property
    def folders(self) -> set[Path]:
        """The folders holding this series' files."""
        return {f.path.parent for f in self.files}


@dataclass
class ExportScan:
    """Everything found under an export folder."""

    root: Path
    series: list[SeriesInfo]
    non_dicom: list[Path]
    unreadable: list[tuple[Path, str]]


def _text(ds: object, name: str) -> str:
    v = getattr(ds, name, None) if ds is not None else None
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x).strip() for x in v)
    return str(v).strip()


def _floats(ds: object, name: str) -> tuple[float, ...] | None:
    v = getattr(ds, name, None)
    if v is None or v == "":
        return None
    try:
        items = [v] if isinstance(v, (str, bytes)) else list(v)
    except TypeError:
        items = [v]
    try:
        vals = tuple(float(x) for x in items)
    except (TypeError, ValueError):
        return None
    return vals if all(math.isfinite(x) for x in vals) else None


def _int(ds: object, name: str) -> int | None:
    try:
        v = getattr(ds, name, None)
        return None if v is None or v == "" else int(v)
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> DicomFile | None:
    """The selection fields of one file; None when it is not DICOM (raises ValueError when DICOM but broken)."""
    with warnings.catch_warnings():  # odd but readable headers (invalid UIDs, VR mix-ups) are common in exports
        warnings.simplefilter("ignore")
        return _read_header(path)


def _read_header(path: Path) -> DicomFile | None:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise ValueError(f"cannot open file: {exc}") from exc
    has_magic = head[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_magic, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, OverflowError) as exc:
        if has_magic:
            raise ValueError(f"broken DICOM header: {exc}") from exc
        return None
    try:
        study_uid, series_uid = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
        modality = _text(ds, "Modality").upper()
    except Exception as exc:  # noqa: BLE001 - a forced read of a non-DICOM file can fail anywhere
        if has_magic:
            raise ValueError(f"broken DICOM header: {exc}") from exc
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    if sop_class == DICOMDIR_SOP_CLASS:
        return None
    if not has_magic and not (study_uid and series_uid and modality):
        return None  # forced read of an arbitrary file: only accept it when it looks like an image header
    if not (modality or sop_class):
        raise ValueError("DICOM preamble but no Modality or SOP class in the header")
    kernel = getattr(ds, "ConvolutionKernel", None)
    if kernel is not None and not isinstance(kernel, str):
        kernel = next((str(k) for k in kernel if str(k).strip()), "")
    return DicomFile(
        path=path, patient_id=_text(ds, "PatientID"), study_uid=study_uid, series_uid=series_uid,
        sop_uid=_text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID") or str(path),
        sop_class=sop_class, modality=modality, study_id=_text(ds, "StudyID"),
        frame_of_reference=_text(ds, "FrameOfReferenceUID"),
        accession=_text(ds, "AccessionNumber"), study_date=_text(ds, "StudyDate"),
        series_number=_int(ds, "SeriesNumber"), instance_number=_int(ds, "InstanceNumber"),
        description=" ".join(x for x in (_text(ds, "SeriesDescription"), _text(ds, "ProtocolName")) if x),
        image_type=tuple(x.strip().upper() for x in _text(ds, "ImageType").split("\\") if x.strip()),
        orientation=_floats(ds, "ImageOrientationPatient"), position=_floats(ds, "ImagePositionPatient"),
        slice_thickness=(_floats(ds, "SliceThickness") or (None,))[0], kernel=str(kernel or "").strip(),
        view_position=_text(ds, "ViewPosition").upper(),
        laterality=(_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper(),
        body_part=_text(ds, "BodyPartExamined").upper(), rows=_int(ds, "Rows"), columns=_int(ds, "Columns"),
        frames=_int(ds, "NumberOfFrames") or 1, presentation_intent=_text(ds, "PresentationIntentType").upper(),
    )


def scan_export(root: str | os.PathLike[str]) -> ExportScan:
    """Read every file's header under `root` (any nesting) and group the DICOM ones by series."""
    base = Path(root)
    if not base.is_dir():
        from raypipe.io.errors import RaypipeInputError

        raise RaypipeInputError("export folder not found", path=str(base))
    by_series: dict[str, dict[str, DicomFile]] = defaultdict(dict)
    dups: dict[str, list[Path]] = defaultdict(list)
    non_dicom: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not p.is_file():
                continue
            try:
                f = read_header(p)
            except ValueError as exc:
                unreadable.append((p, str(exc)))
                continue
            if f is None:
                non_dicom.append(p)
                continue
            if not (f.study_uid and f.series_uid):
                f = _with_folder_keys(f, base)
            if f.sop_uid in by_series[f.series_uid]:
                dups[f.series_uid].append(p)  # the same instance exported twice
                continue
            by_series[f.series_uid][f.sop_uid] = f
    series = []
    for uid, files in by_series.items():
        ordered = sorted(files.values(), key=lambda f: (f.instance_number is None, f.instance_number or 0,
                                                        str(f.path)))
        series.append(SeriesInfo(files=ordered, duplicates=dups[uid]))
    series.sort(key=lambda s: (s.first.patient_id, s.first.study_uid, s.first.series_number or 0,
                               s.first.series_uid))
    return ExportScan(root=base, series=series, non_dicom=non_dicom, unreadable=unreadable)


def _with_folder_keys(f: DicomFile, root: Path) -> DicomFile:
    """Anonymised files without Study/SeriesInstanceUID: group them by folder (+ frame of reference, series no.)."""
    rel = os.path.relpath(f.path.parent, root)
    study = f.study_uid or f"{FOLDER_KEY}{rel}"
    series = f.series_uid or f"{FOLDER_KEY}{rel}:{f.frame_of_reference}:{f.series_number}:{f.modality}"
    return replace(f, study_uid=study, series_uid=series)
