"""A DICOM export (PACS/CD dump): scan headers, group by study and series, and pick what the models need.

Pure header work: files are read with pydicom `stop_before_pixels`, never decoded. `scan_export` finds every
DICOM file under a folder (any nesting, any file names; other files are counted and ignored) and groups them
into `SeriesInfo`; `select_series` applies `SelectionRules` (docs/MANIFEST.md, "How `manifest build` picks
series") and returns one `Decision` per CT series or radiograph image, taken or skipped with a reason.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
SR_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.88."          # structured reports (dose reports among them)
SC_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"            # secondary capture (screenshots, dose screens)
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")
NON_IMAGE_MODALITIES = ("SR", "PR", "KO", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "AU", "ECG")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLAT", "RLAT")
FRONTAL_VIEWS = ("AP", "PA", "APL", "PAL", "AP ERECT", "PA ERECT")
LUMBAR_WORDS = ("LSPINE", "LUMBAR", "TLSPINE", "LSPINE", "LWS", "LUMBOSACRAL", "LSSPINE")
SPINE_WORDS = ("SPINE", "WIRBELSAEULE")
LOCALIZER_WORDS = re.compile(r"\b(scout|topogram|surview|locali[sz]er|scanogram|scanoscope|pilot|survey)\b", re.I)
LATERAL_WORDS = re.compile(r"(\blat\b|\blateral|\bseitl|\blat\.)", re.I)
FRONTAL_WORDS = re.compile(r"\b(ap|pa|frontal)\b", re.I)
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


@dataclass(frozen=True)
class SelectionRules:
    """Limits of the series selection (defaults: docs/MANIFEST.md)."""

    min_slice_mm: float = 0.5         # thinnest reconstruction accepted (slice thickness or spacing)
    max_slice_mm: float = 5.0         # thickest accepted; T12-L4 levels need several slices per vertebra
    min_coverage_mm: float = 150.0    # z extent needed for T12 to L4 (about 5 vertebrae + 4 discs)
    max_tilt_deg: float = 20.0        # angle between the slice normal and the patient's z axis
    min_slices: int = 10


@dataclass
class Decision:
    """What `select_series` decided for one CT series or one radiograph image, and why."""

    series: SeriesInfo
    taken: bool
    reason: str
    file: DicomFile | None = None         # radiographs: the image decided on
    kind: str = ""                        # CT | XR | "" (neither)
    kernel_class: str = ""
    slice_mm: float | None = None
    coverage_mm: float | None = None
    n_slices: int | None = None
    notes: list[str] = field(default_factory=list)


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


def kernel_class(kernel: str) -> str:
    """soft | bone | lung | unknown, from ConvolutionKernel (Siemens Bxx/Brxx numbers, GE/Philips/Canon names)."""
    k = kernel.strip().upper()
    if not k:
        return "unknown"
    if any(w in k for w in ("LUNG", "CHEST", "PULM")):
        return "lung"
    if any(w in k for w in ("BONE", "EDGE", "DETAIL", "SHARP", "ULTRA", "SPINE")):
        return "bone"
    if any(w in k for w in ("STANDARD", "STND", "SOFT", "BODY", "ABDOMEN", "SMOOTH")):
        return "soft"
    m = re.fullmatch(r"[BIQDHJ][A-Z]?(\d{2})[A-Z]?\d?", k)          # Siemens: B31f, Br38f, I40f, Qr40...
    if m:
        n = int(m.group(1))
        return "soft" if n < 50 else "bone" if n < 70 else "lung"
    if k in ("A", "B", "C", "UA", "UB", "UC"):                        # Philips body kernels
        return "soft"
    if k in ("D", "E", "YB", "YC", "YD", "EB"):                       # Philips sharp / bone
        return "bone"
    if k in ("L", "LA", "YA", "F"):                                   # Philips lung
        return "lung"
    m = re.fullmatch(r"FC(\d{2})", k)                                 # Canon/Toshiba
    if m:
        n = int(m.group(1))
        return "lung" if 50 <= n < 60 or n >= 80 else "bone" if n >= 30 else "soft"
    return "unknown"


KERNEL_RANK = {"soft": 0, "bone": 1, "unknown": 2}


def _non_image_reason(f: DicomFile) -> str | None:
    if f.sop_class.startswith(SR_SOP_PREFIX) or f.modality == "SR":
        return "structured report (e.g. a dose report), not an image"
    if f.sop_class.startswith(SC_SOP_PREFIX):
        return "secondary capture (screenshot or dose screen), not an acquired image"
    if f.modality in NON_IMAGE_MODALITIES:
        return f"not an image series (Modality {f.modality})"
    if f.rows is None or f.columns is None:
        return "no pixel matrix (Rows/Columns missing): not an image"
    return None


def _ct_geometry(s: SeriesInfo) -> tuple[np.ndarray | None, str | None]:
    """Slice positions along the normal (sorted) or the reason they cannot be had."""
    ious = {f.orientation for f in s.files}
    if None in ious or any(o is None or len(o) != 6 for o in ious):
        return None, "ImageOrientationPatient missing"
    if len({tuple(round(v, 3) for v in o) for o in ious}) > 1:  # type: ignore[union-attr]
        return None, "slices with different orientations in one series"
    o = np.asarray(s.first.orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    if any(f.position is None or len(f.position) != 3 for f in s.files):
        return None, "ImagePositionPatient missing"
    z = np.sort(np.array([float(np.dot(f.position, normal)) for f in s.files]))  # type: ignore[arg-type]
    return z, None


def judge_ct(s: SeriesInfo, rules: SelectionRules) -> Decision:
    """Whether one CT series is usable (taken=True means eligible; `select_series` then ranks them)."""
    f = s.first
    d = Decision(series=s, taken=False, reason="", kind="CT", n_slices=len(s.files))
    reason = _non_image_reason(f)
    if reason:
        d.reason = reason
        return d
    if "LOCALIZER" in f.image_type or LOCALIZER_WORDS.search(f.description):
        d.reason = "scout/localiser (ImageType LOCALIZER or a scout description)"
        return d
    if f.sop_class and f.sop_class != CT_IMAGE_STORAGE:
        d.reason = f"not a CT Image Storage series (SOP class {f.sop_class}): enhanced/multi-frame CT is not read"
        return d
    if f.image_type and f.image_type[0] != "ORIGINAL":
        d.reason = f"ImageType {'/'.join(f.image_type)}: derived (reformat, MIP, ...), not an ORIGINAL reconstruction"
        return d
    if len(s.files) < rules.min_slices:
        d.reason = f"{len(s.files)} slice(s) < {rules.min_slices}: not a volume"
        return d
    z, problem = _ct_geometry(s)
    if problem or z is None:
        d.reason = problem or "no geometry"
        return d
    o = np.asarray(f.orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / max(1e-9, float(np.linalg.norm(normal))))))
    if tilt > rules.max_tilt_deg:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        d.reason = (f"not axial: slice normal {tilt:.0f} deg from the z axis ({plane} plane; "
                    f"limit {rules.max_tilt_deg:g})")
        return d
    gaps = np.diff(z)
    if np.any(gaps < 1e-3):
        n = int(np.sum(gaps < 1e-3))
        d.reason = f"{n} slice(s) share a position with another (several phases or echoes in one series)"
        return d
    spacing = float(np.median(gaps))
    if float(np.max(gaps)) > 1.5 * spacing:
        d.reason = f"gap of {float(np.max(gaps)):.1f} mm between slices (median {spacing:.2f} mm): missing slices"
        return d
    thick = max(spacing, f.slice_thickness or 0.0)
    d.slice_mm = round(thick, 3)
    d.coverage_mm = round(float(z[-1] - z[0]) + spacing, 1)
    if thick > rules.max_slice_mm:
        d.reason = f"slices {thick:.2f} mm thick > {rules.max_slice_mm:g} mm"
        return d
    if thick < rules.min_slice_mm:
        d.reason = f"slices {thick:.2f} mm thick < {rules.min_slice_mm:g} mm"
        return d
    if d.coverage_mm < rules.min_coverage_mm:
        d.reason = (f"z coverage {d.coverage_mm:.0f} mm < {rules.min_coverage_mm:g} mm needed for T12-L4")
        return d
    d.kernel_class = kernel_class(f.kernel)
    if d.kernel_class == "lung":
        d.reason = f"lung/sharp kernel {f.kernel!r}: too noisy for bone density and muscle"
        return d
    if d.kernel_class == "unknown":
        d.notes.append(f"kernel {f.kernel!r} not recognised as soft tissue or bone" if f.kernel
                       else "no ConvolutionKernel in the header")
    if tilt > 1.0:
        d.notes.append(f"gantry tilt {tilt:.1f} deg")
    d.taken = True
    return d


def judge_radiograph(s: SeriesInfo, f: DicomFile) -> Decision:
    """Whether one radiograph image is a lateral lumbar spine view; unsure cases are skipped saying why."""
    d = Decision(series=s, taken=False, reason="", file=f, kind="XR")
    reason = _non_image_reason(f)
    if reason:
        d.reason = reason
        return d
    if f.presentation_intent == "FOR PROCESSING":
        d.reason = "FOR PROCESSING (raw detector) image; the FOR PRESENTATION one is used"
        return d
    if f.frames > 1:
        d.reason = f"{f.frames} frames (fluoroscopy/cine), not a single radiograph"
        return d
    bp = re.sub(r"[^A-Z]", "", f.body_part)
    desc = f.description
    desc_up = re.sub(r"[^A-Z]", "", desc.upper())
    if bp:
        if any(w in bp for w in LUMBAR_WORDS):
            region = "lumbar"
        elif any(w in bp for w in SPINE_WORDS):
            region = "spine"
            d.notes.append(f"BodyPartExamined {f.body_part}: lumbar level not stated")
        else:
            d.reason = f"BodyPartExamined {f.body_part}: not the lumbar spine"
            return d
    elif any(w in desc_up for w in LUMBAR_WORDS):
        region = "lumbar"
        d.notes.append(f"no BodyPartExamined; lumbar from the description {desc!r}")
    else:
        d.reason = (f"unsure: no BodyPartExamined and no lumbar word in the description {desc!r}; "
                    "add the image by hand if it is a lateral lumbar spine")
        return d
    if f.laterality in ("L", "R") and region != "lumbar":
        d.reason = f"ImageLaterality {f.laterality}: a paired body part, not the spine"
        return d
    vp = f.view_position
    if vp in LATERAL_VIEWS:
        pass
    elif vp in FRONTAL_VIEWS:
        d.reason = f"frontal view (ViewPosition {vp}); the models need the lateral view"
        return d
    elif vp:
        d.reason = f"unsure: ViewPosition {vp!r} is neither lateral nor frontal"
        return d
    elif LATERAL_WORDS.search(desc):
        d.notes.append(f"no ViewPosition; lateral from the description {desc!r}")
    elif FRONTAL_WORDS.search(desc):
        d.reason = f"frontal view by its description {desc!r}; the models need the lateral view"
        return d
    else:
        d.reason = (f"unsure: no ViewPosition and no view in the description {desc!r}; "
                    "add the image by hand if it is a lateral view")
        return d
    d.taken = True
    return d


def select_series(scan: ExportScan, rules: SelectionRules | None = None) -> list[Decision]:
    """One decision per CT series and per radiograph image: at most one CT and one radiograph taken per study."""
    rules = rules or SelectionRules()
    decisions: list[Decision] = []
    by_study: dict[str, list[Decision]] = defaultdict(list)
    for s in scan.series:
        f = s.first
        if f.modality == "CT" or f.sop_class == CT_IMAGE_STORAGE:
            found = [judge_ct(s, rules)]
            if f.series_uid.startswith(FOLDER_KEY):
                found[0].notes.append("no Study/SeriesInstanceUID in the headers: grouped by folder")
        elif f.modality in RADIOGRAPH_MODALITIES:
            found = [judge_radiograph(s, img) for img in s.files]
        else:
            reason = _non_image_reason(f) or f"Modality {f.modality or '(empty)'}: neither CT nor radiograph (CR/DX)"
            found = [Decision(series=s, taken=False, reason=reason)]
        for d in found:
            if d.taken and not f.patient_id:
                d.taken = False
                d.reason = "usable, but no PatientID in the header: cannot be matched to the clinical CSV"
            decisions.append(d)
            if d.taken:
                by_study[f.study_uid].append(d)
    for study in by_study.values():
        _rank_ct([d for d in study if d.kind == "CT" and d.taken])
        _rank_xr([d for d in study if d.kind == "XR" and d.taken])
    for d in decisions:
        if d.taken and not d.reason:
            d.reason = "taken" + (f" ({'; '.join(d.notes)})" if d.notes else "")
    return decisions


def _ct_key(d: Decision) -> tuple:
    f = d.series.first
    return (KERNEL_RANK[d.kernel_class], d.slice_mm, -(d.coverage_mm or 0), -(d.n_slices or 0),
            f.series_number if f.series_number is not None else 1 << 30, f.series_uid)


def _rank_ct(cands: list[Decision]) -> None:
    if not cands:
        return
    cands.sort(key=_ct_key)
    best = cands[0]
    b = best.series.first
    for d in cands[1:]:
        f = d.series.first
        d.taken = False
        same = (d.kernel_class == best.kernel_class and d.slice_mm == best.slice_mm
                and d.coverage_mm == best.coverage_mm and d.n_slices == best.n_slices)
        if same:
            d.reason = f"duplicate of series {b.series_uid} (same kernel class, slice thickness, coverage and slices)"
        elif KERNEL_RANK[d.kernel_class] != KERNEL_RANK[best.kernel_class]:
            d.reason = (f"not chosen: series {b.series_uid} has a preferred kernel ({best.kernel_class} "
                        f"{b.kernel!r} over {d.kernel_class} {f.kernel!r})")
        elif d.slice_mm != best.slice_mm:
            d.reason = (f"not chosen: series {b.series_uid} has thinner slices ({best.slice_mm:g} mm vs "
                        f"{d.slice_mm:g} mm)")
        else:
            d.reason = (f"not chosen: series {b.series_uid} covers more ({best.coverage_mm:g} mm, "
                        f"{best.n_slices} slices vs {d.coverage_mm:g} mm, {d.n_slices})")


def _rank_xr(cands: list[Decision]) -> None:
    if not cands:
        return

    def key(d: Decision) -> tuple:
        f = d.file
        assert f is not None
        return (bool(f.image_type) and f.image_type[0] != "ORIGINAL", -((f.rows or 0) * (f.columns or 0)),
                f.series_number if f.series_number is not None else 1 << 30, f.instance_number or 0, f.sop_uid)

    cands.sort(key=key)
    best = cands[0].file
    assert best is not None
    for d in cands[1:]:
        f = d.file
        assert f is not None
        d.taken = False
        if (f.rows, f.columns, f.description) == (best.rows, best.columns, best.description):
            d.reason = f"duplicate of image {best.sop_uid} (same size and description); one lateral view per study"
        else:
            d.reason = (f"not chosen: image {best.sop_uid} preferred (ORIGINAL first, then the larger matrix); "
                        "one lateral view per study")
