"""Which series of a DICOM export the models need: stated rules, one decision with a reason per series/image.

`select_series` applies `SelectionRules` (docs/MANIFEST.md, "`raypipe manifest build`") to an `ExportScan`
and returns one `Decision` per CT series or radiograph image, taken or skipped with a reason.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from raypipe.io.export import CT_IMAGE_STORAGE, FOLDER_KEY, DicomFile, ExportScan, SeriesInfo

SR_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.88."          # structured reports (dose reports among them)
SC_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"            # secondary capture (screenshots, dose screens)
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")
NON_IMAGE_MODALITIES = ("SR", "PR", "KO", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "AU", "ECG")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLAT", "RLAT")
FRONTAL_VIEWS = ("AP", "PA", "APL", "PAL", "AP ERECT", "PA ERECT")
LUMBAR_WORDS = ("LSPINE", "LUMBAR", "TLSPINE", "LWS", "LUMBOSACRAL", "LSSPINE")
SPINE_WORDS = ("SPINE", "WIRBELSAEULE")
LOCALIZER_WORDS = re.compile(r"\b(scout|topogram|surview|locali[sz]er|scanogram|scanoscope|pilot|survey)\b", re.I)
LATERAL_WORDS = re.compile(r"(\blat\b|\blateral|\bseitl|\blat\.)", re.I)
FRONTAL_WORDS = re.compile(r"\b(ap|pa|frontal)\b", re.I)


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
