"""Segmentation masks (vertebrae, paraspinal muscles, vertebral bodies) on a CT's canonical grid.

Two layouts are read: a TotalSegmentator-style folder of binary `NAME.nii.gz` files, or one multilabel
file with a label map (`"totalseg"`: TotalSegmentator v2 `total`; `"verse"`: VerSe vertebra numbering
plus subregions 49 + 50 = vertebral body; or a JSON file `{"int": "name"}`). Masks are resampled onto
the reference CT grid with nearest neighbour when the grids differ, so every array lines up with
`CTVolume.hu` voxel for voxel.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from raypipe import storage
from raypipe.io.ct import CANONICAL_ORIENTATION, VOLUME_SUFFIXES, CTVolume, is_nifti_file, is_volume_file
from raypipe.io.errors import ImageReadWarning, MaskError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
LabelSpec = str | os.PathLike[str] | Mapping[int, str]

_TOTALSEG_V2_ORGANS = (
    "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right "
    "adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right "
    "lung_middle_lobe_right lung_lower_lobe_right esophagus trachea thyroid_gland small_bowel duodenum "
    "colon urinary_bladder prostate kidney_cyst_left kidney_cyst_right"
).split()
_TOTALSEG_V2_SPINE = ["sacrum", "vertebrae_S1"] + [f"vertebrae_L{i}" for i in range(5, 0, -1)]
_TOTALSEG_V2_SPINE += [f"vertebrae_T{i}" for i in range(12, 0, -1)] + [f"vertebrae_C{i}" for i in range(7, 0, -1)]
_TOTALSEG_V2_REST = (
    "heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right subclavian_artery_left "
    "common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left "
    "brachiocephalic_vein_right atrial_appendage_left superior_vena_cava inferior_vena_cava "
    "portal_vein_and_splenic_vein iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right "
    "humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right femur_left "
    "femur_right hip_left hip_right spinal_cord gluteus_maximus_left gluteus_maximus_right "
    "gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right "
    "autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain skull"
).split()

# TotalSegmentator v2 `total` task, labels 1-91 (25 sacrum, 26 S1, 27 L5 ... 50 C1, 86-89 muscles).
# Ribs (92-115) are left out: their numbering changed between v2 releases; 116/117 are stable.
TOTALSEG_LABELS: dict[int, str] = {
    i + 1: name for i, name in enumerate(_TOTALSEG_V2_ORGANS + _TOTALSEG_V2_SPINE + _TOTALSEG_V2_REST)
}
TOTALSEG_LABELS.update({116: "sternum", 117: "costal_cartilages"})

# VerSe numbering: 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, 26 sacrum, 28 T13 (transitional);
# subregion files (TPTBox): 49 vertebral body cortex + 50 body interior = the vertebral body.
VERSE_LABELS: dict[int, str] = {i: f"vertebrae_C{i}" for i in range(1, 8)}
VERSE_LABELS.update({7 + i: f"vertebrae_T{i}" for i in range(1, 13)})
VERSE_LABELS.update({19 + i: f"vertebrae_L{i}" for i in range(1, 7)})
VERSE_LABELS.update({26: "sacrum", 28: "vertebrae_T13", 49: "vertebral_body", 50: "vertebral_body"})

LABEL_MAPS: dict[str, dict[int, str]] = {"totalseg": TOTALSEG_LABELS, "verse": VERSE_LABELS}

# Faces of a canonical LPS (z, y, x) array: index 0 / -1 along each axis.
_FACES: tuple[tuple[str, int, int], ...] = (
    ("inferior", 0, 0),
    ("superior", 0, -1),
    ("anterior", 1, 0),
    ("posterior", 1, -1),
    ("right", 2, 0),
    ("left", 2, -1),
)


@storage.localized("path", "labels")  # mask files/folders and label maps on object stores: fetched
def read_masks(
    path: PathLike,
    reference: CTVolume,
    labels: LabelSpec | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Boolean masks by TotalSegmentator name on `reference`'s grid; only non-empty masks are returned."""
    p = Path(path)
    if not p.exists():
        raise MaskError(p, "no such mask file or folder")
    wanted = None if names is None else set(names)
    if p.is_dir():
        return _read_mask_folder(p, reference, wanted)
    image = _read_label_image(p)
    if labels is None:
        label_map = _single_mask_map(p, image)
    else:
        label_map = resolve_label_map(labels, mask_path=p)
    return _split_labels(p, _on_reference(image, reference, p), label_map, wanted)


@storage.localized("path")
def read_body_mask(path: PathLike, reference: CTVolume, body_label: int | Iterable[int] = 1) -> np.ndarray:
    """The `vertebral_body` mask (bodies without discs) from e.g. TotalSegmentator's `vertebrae_body` task."""
    p = Path(path)
    if not p.exists():
        raise MaskError(p, "no such mask file")
    if p.is_dir():
        raise MaskError(p, "expected one body-mask file, got a folder")
    wanted = [int(body_label)] if isinstance(body_label, (int, np.integer)) else [int(v) for v in body_label]
    body = np.isin(_on_reference(_read_label_image(p), reference, p), wanted)
    if not body.any():
        warnings.warn(f"{p}: no voxel with label {wanted} on the CT grid", ImageReadWarning, stacklevel=2)
    return body


@storage.localized("labels")
def resolve_label_map(labels: LabelSpec, mask_path: PathLike | None = None) -> dict[int, str]:
    """Turn `"totalseg"`, `"verse"`, a JSON label-map path or a mapping into `{label: name}`."""
    where = mask_path if mask_path is not None else "<labels>"
    if isinstance(labels, Mapping):
        return _validated_map(labels, where)
    key = str(labels)
    if key.lower() in LABEL_MAPS:
        return dict(LABEL_MAPS[key.lower()])
    json_path = Path(key)
    if not json_path.is_file():
        raise MaskError(
            where,
            f"unknown label convention {key!r}: expected 'totalseg', 'verse' or a JSON label-map file",
            field="mask_labels",
            value=key,
        )
    try:
        raw = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskError(json_path, f"cannot parse label map JSON: {exc}", field="mask_labels") from exc
    if not isinstance(raw, dict):
        raise MaskError(json_path, 'label map must be a JSON object {"label": "name"}', field="mask_labels")
    return _validated_map(raw, json_path)


def mask_edge_contact(mask: np.ndarray) -> list[str]:
    """Faces of the volume a canonical (z, y, x) mask touches, e.g. ['superior']: a hint it is cut off."""
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D (z, y, x) mask, got shape {mask.shape}")
    return [face for face, axis, index in _FACES if np.take(mask, index, axis=axis).any()]


def _validated_map(raw: Mapping[object, object], where: PathLike) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, name in raw.items():
        try:
            label = int(str(key))
        except ValueError:
            raise MaskError(where, f"label map key {key!r} is not an integer", field=str(key), value=key) from None
        if not isinstance(name, str) or not name:
            raise MaskError(where, f"label {label} must map to a non-empty name", field=str(key), value=name)
        if label <= 0:
            raise MaskError(where, f"label {label} must be positive (0 is background)", field=str(key), value=label)
        out[label] = name
    if not out:
        raise MaskError(where, "label map is empty", field="mask_labels")
    return out


def _mask_name(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_mask_folder(folder: Path, reference: CTVolume, wanted: set[str] | None) -> dict[str, np.ndarray]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and is_volume_file(f))
    if not files:
        raise MaskError(folder, "no mask files (NAME.nii.gz) in folder")
    out: dict[str, np.ndarray] = {}
    for f in files:
        name = _mask_name(f)
        if wanted is not None and name not in wanted:
            continue
        mask = _on_reference(_read_label_image(f), reference, f) > 0.5
        if mask.any():
            out[name] = mask
        else:
            logger.debug("mask %s is empty on the CT grid", name)
    return out


def _single_mask_map(path: Path, image: sitk.Image) -> dict[int, str]:
    """A binary file without a label map is one mask named after the file; anything else is ambiguous."""
    arr = sitk.GetArrayViewFromImage(image)
    values = np.unique(arr)
    nonzero = [int(v) for v in values if v != 0]
    if nonzero in ([], [1], [255]):
        return {(nonzero or [1])[0]: _mask_name(path)}
    raise MaskError(
        path,
        f"multilabel mask (labels {_label_summary(values)}) needs a label convention: "
        "mask_labels = 'totalseg', 'verse' or a JSON label map",
        field="mask_labels",
    )


def _split_labels(
    path: Path, arr: np.ndarray, label_map: Mapping[int, str], wanted: set[str] | None
) -> dict[str, np.ndarray]:
    present = [int(v) for v in np.unique(arr) if v != 0]
    unknown = [v for v in present if v not in label_map]
    if present and len(unknown) == len(present):
        raise MaskError(
            path,
            f"none of the labels in the file ({_label_summary(present)}) is in the label map: wrong convention?",
            field="mask_labels",
        )
    if unknown:
        logger.debug("%s: labels without a name ignored: %s", path, _label_summary(unknown))
    out: dict[str, np.ndarray] = {}
    for label in present:
        name = label_map.get(label)
        if name is None or (wanted is not None and name not in wanted):
            continue
        hit = arr == label
        out[name] = out[name] | hit if name in out else hit
    return out


def _label_summary(values: Iterable[object]) -> str:
    vals = [int(v) for v in values if int(v) != 0]  # type: ignore[call-overload]
    shown = ", ".join(str(v) for v in vals[:12])
    return shown + (f", ... ({len(vals)} labels)" if len(vals) > 12 else "")


def _read_label_image(path: Path) -> sitk.Image:
    if not is_nifti_file(path):
        raise MaskError(path, "not a NIfTI mask file (masks are identified by their header; MetaImage and NRRD "
                              "files are not read because they can reference other files)")
    try:
        image = sitk.ReadImage(str(path), imageIO="NiftiImageIO")
    except RuntimeError as exc:
        raise MaskError(path, f"cannot read mask file: {str(exc).strip().splitlines()[-1]}") from exc
    geometry = (*image.GetSpacing(), *image.GetOrigin(), *image.GetDirection())
    if not all(np.isfinite(v) for v in geometry) or min(image.GetSpacing()) <= 0:
        raise MaskError(path, "mask header has non-finite or non-positive spacing/origin/direction")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MaskError(path, f"expected a 3-D label volume, got a {image.GetDimension()}-D image")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(sitk.Round(image), sitk.sitkInt32)
    return image


def _same_grid(image: sitk.Image, reference: CTVolume) -> bool:
    size_ok = tuple(image.GetSize()) == tuple(reversed(reference.hu.shape))
    min_spacing = float(min(reference.spacing))
    return (
        size_ok
        and np.allclose(image.GetSpacing(), reference.spacing, rtol=1e-4, atol=1e-5)
        and np.allclose(image.GetOrigin(), reference.origin, atol=1e-2 * min_spacing)
        and np.allclose(image.GetDirection(), reference.direction, atol=1e-4)
    )


def _on_reference(image: sitk.Image, reference: CTVolume, path: Path) -> np.ndarray:
    """The label image as a (z, y, x) array on the reference grid (nearest neighbour when grids differ)."""
    try:
        canonical = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
    except RuntimeError as exc:
        raise MaskError(path, f"cannot reorient mask: {str(exc).strip().splitlines()[-1][:200]}") from exc
    if _same_grid(canonical, reference):
        return sitk.GetArrayFromImage(canonical)
    fg_before = _foreground_box(image)
    ref_box = _grid_box(reference)
    if fg_before is not None:
        lo, hi = fg_before
        if np.any(hi < ref_box[0]) or np.any(lo > ref_box[1]):
            raise MaskError(
                path,
                "mask does not overlap the CT in world space "
                f"(mask foreground {_fmt_box(lo, hi)} mm, CT {_fmt_box(*ref_box)} mm, LPS): wrong CT or header?",
            )
    resampled = sitk.Resample(
        image,
        tuple(int(n) for n in reversed(reference.hu.shape)),
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        tuple(float(o) for o in reference.origin),
        tuple(float(s) for s in reference.spacing),
        tuple(float(d) for d in reference.direction),
        0,
        image.GetPixelID(),
    )
    arr = sitk.GetArrayFromImage(resampled)
    if fg_before is not None:
        before_ml = np.count_nonzero(sitk.GetArrayViewFromImage(image)) * float(np.prod(image.GetSpacing()))
        after_ml = np.count_nonzero(arr) * float(np.prod(reference.spacing))
        if before_ml > 0 and after_ml < 0.9 * before_ml:
            warnings.warn(
                f"{path}: {100 * (1 - after_ml / before_ml):.0f}% of the mask lies outside the CT",
                ImageReadWarning,
                stacklevel=4,
            )
    logger.debug("resampled %s onto the CT grid", path)
    return arr


def _grid_box(reference: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    shape_xyz = np.asarray(list(reversed(reference.hu.shape)), dtype=float)
    corners = _index_corners(np.zeros(3) - 0.5, shape_xyz - 0.5)
    d = np.asarray(reference.direction, dtype=float).reshape(3, 3)
    world = np.asarray(reference.origin) + (corners * np.asarray(reference.spacing)) @ d.T
    return world.min(axis=0), world.max(axis=0)


def _foreground_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    arr = sitk.GetArrayViewFromImage(image)
    idx = np.nonzero(arr)
    if idx[0].size == 0:
        return None
    lo = np.array([idx[2].min(), idx[1].min(), idx[0].min()], dtype=float) - 0.5
    hi = np.array([idx[2].max(), idx[1].max(), idx[0].max()], dtype=float) + 0.5
    world = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in _index_corners(lo, hi)])
    return world.min(axis=0), world.max(axis=0)


def _index_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])


def _fmt_box(lo: np.ndarray, hi: np.ndarray) -> str:
    return " x ".join(f"[{a:.0f}, {b:.0f}]" for a, b in zip(lo, hi, strict=True))
