"""`raypipe inspect`: what an image file is, its geometry and intensities, per-mask stats and QC warnings.

`inspect_path` returns the `inspect --json` schema of DESIGN.md, plus `qc_warnings`; `inspect_picture`
draws the study's preprocessing QC picture (`inspect --png`), as `raypipe preprocess` does per study. CT geometry is
reported as stored (SimpleITK world LPS coordinates, axes x, y, z); intensities are HU after rescale.
Radiograph geometry is `(rows, cols)`; intensities are the [0, 1] display values (bone bright).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raypipe import storage
from raypipe.io.ct import ct_from_image, is_volume_file, read_ct_image
from raypipe.io.errors import ImageReadError, ImageReadWarning, RaypipeInputError
from raypipe.io.masks import LabelSpec, mask_edge_contact, read_masks
from raypipe.io.radiograph import is_raster_file, read_dicom_header, read_radiograph

PathLike = str | os.PathLike[str]

COARSE_SLICE_MM = 5.0


def detect_kind(path: PathLike) -> str:
    """'ct' for a folder, a NIfTI or a DICOM CT that is not a localizer; 'radiograph' otherwise."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(p, "no such file or folder")
    if p.is_dir() or is_volume_file(p):
        return "ct"
    if is_raster_file(p):
        return "radiograph"
    header = read_dicom_header(p)
    if "Rows" not in header:
        raise ImageReadError(p, "not a DICOM image (no Rows/Columns in the header)")
    modality = str(header.get("Modality", "")).strip().upper()
    image_type = [str(v).strip().upper() for v in _as_list(header.get("ImageType", []))]
    return "ct" if modality == "CT" and "LOCALIZER" not in image_type else "radiograph"


def inspect_path(path: PathLike, masks: PathLike | None = None, mask_labels: LabelSpec | None = None) -> dict[str, Any]:
    """Geometry, orientation, intensity and per-mask statistics of an image, JSON-ready, with QC warnings.

    `s3://` / `gs://` inputs are fetched to a task-local temp dir for the call; the result names the URI."""
    from contextlib import ExitStack

    given = (path, masks, mask_labels)
    if any(isinstance(p, (str, os.PathLike)) and storage.is_uri(p) for p in given):
        with ExitStack() as stack:
            local = [stack.enter_context(storage.localize(p)) if isinstance(p, (str, os.PathLike)) and storage.is_uri(p)
                     else p for p in given]
            result = _inspect_local(*local)
        return {**result, "path": str(path)}
    return _inspect_local(path, masks, mask_labels)


def _inspect_local(path: PathLike, masks: PathLike | None, mask_labels: LabelSpec | None) -> dict[str, Any]:
    """`inspect_path` on local files."""
    kind = detect_kind(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImageReadWarning)
        if kind == "ct":
            result = _inspect_ct(path, masks, mask_labels)
        else:
            if masks is not None:
                raise RaypipeInputError("masks apply to CT only, not to radiographs", path=masks, field="masks")
            result = _inspect_radiograph(path)
    read_warnings = [str(w.message) for w in caught if issubclass(w.category, ImageReadWarning)]
    for w in caught:
        if not issubclass(w.category, ImageReadWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    result["qc_warnings"] = read_warnings + result["qc_warnings"]
    return result


@storage.localized("path", "masks", "mask_labels", "keypoints")  # inputs on object stores: fetched for the call
def inspect_picture(
    path: PathLike,
    out_png: PathLike,
    masks: PathLike | None = None,
    mask_labels: LabelSpec | None = None,
    keypoints: PathLike | None = None,
) -> str:
    """Write the preprocessing QC picture of one study (`raypipe.preprocess.qc_png`) to `out_png`; its path.

    CT: with masks, the chosen T12-L4 slices with crop boxes and mask outlines (default CT preprocessing
    config), or the sagittal view with the problem when the crops cannot be made; without masks, the
    sagittal view. Radiograph: with keypoints, the keypoints, alignment axis, patches and model input.
    """
    from raypipe.preprocess.qc_png import ct_qc_picture, xray_qc_picture

    kind = detect_kind(path)
    problem: str | None = None
    if kind == "ct":
        if keypoints is not None:
            raise RaypipeInputError("keypoints apply to radiographs only, not to CT", path=keypoints, field="keypoints")
        from raypipe.preprocess.ct import preprocess_ct_study

        volume = ct_from_image(read_ct_image(path), path)
        found = read_masks(masks, volume, labels=mask_labels) if masks is not None else {}
        geometry = None
        if found:
            try:
                _, info = preprocess_ct_study(volume, found, found.get("vertebral_body"))
                geometry, problem = info["geometry"], "; ".join(info["warnings"]) or None
            except RaypipeInputError as exc:
                problem = str(exc)
        else:
            problem = "no masks given: sagittal view only (pass --masks to see the crops)"
        title = f"CT {'x'.join(str(n) for n in volume.hu.shape[::-1])} voxels"
        png = ct_qc_picture(volume.hu, found, volume.spacing, geometry, title=title, problem=problem)
    else:
        if masks is not None:
            raise RaypipeInputError("masks apply to CT only, not to radiographs", path=masks, field="masks")
        from raypipe.io.keypoints import read_keypoints
        from raypipe.preprocess.xray import preprocess_radiograph

        image = read_radiograph(path)
        xy = arr = None
        corners: list = []
        if keypoints is not None:
            xy = read_keypoints(keypoints).xy
            try:
                arr, info = preprocess_radiograph(image, xy)
                corners, problem = info["corners_px"], "; ".join(info["warnings"]) or None
            except RaypipeInputError as exc:
                problem = str(exc)
        else:
            problem = "no keypoints given: radiograph only (pass --keypoints to see the patches)"
        title = f"radiograph {image.shape[0]}x{image.shape[1]} pixels"
        png = xray_qc_picture(image.pixels, xy, None if arr is None else np.asarray(arr, np.float32), corners,
                              title=title, problem=problem)
    storage.atomic_write_bytes(out_png, png)
    return str(out_png)


def format_inspection(d: dict[str, Any]) -> str:
    """Human-readable text for an `inspect_path` result (what `raypipe inspect` prints without --json)."""
    lines = [f"{d['path']}", f"  kind:        {d['kind']}"]
    if d["kind"] == "ct":
        lines += [
            f"  size:        {_fmt_seq(d['shape'], '{:d}')} voxels (x, y, z)",
            f"  spacing:     {_fmt_seq(d['spacing'], '{:.4g}')} mm",
            f"  origin:      ({_fmt_seq(d['origin'], '{:.2f}', ', ')}) mm, world LPS",
            f"  orientation: {d['orientation']} as stored (read as LPS)",
        ]
        unit = "HU"
    else:
        spacing = "unknown" if d["spacing"] is None else f"{_fmt_seq(d['spacing'], '{:.4g}')} mm (row, col)"
        lines += [
            f"  size:        {_fmt_seq(d['shape'], '{:d}')} pixels (rows, cols)",
            f"  spacing:     {spacing}",
            f"  photometric: {d.get('photometric', '')}  modality: {d.get('modality', '') or '-'}",
        ]
        unit = "display [0, 1], bone bright"
    s = d["intensity"]
    lines.append(f"  intensity:   min {s['min']:.4g}  mean {s['mean']:.4g}  max {s['max']:.4g} ({unit})")
    if d["masks"]:
        width = max(len(name) for name in d["masks"])
        lines.append(f"  masks:       {'name'.ljust(width)}  {'voxels':>8}  {'mean HU':>8}")
        for name, m in d["masks"].items():
            lines.append(f"               {name.ljust(width)}  {m['voxels']:>8d}  {m['mean']:>8.1f}")
    for w in d.get("qc_warnings", []):
        lines.append(f"  warning:     {w}")
    return "\n".join(lines)


def _inspect_ct(path: PathLike, masks: PathLike | None, mask_labels: LabelSpec | None) -> dict[str, Any]:
    image = read_ct_image(path)
    volume = ct_from_image(image, path)
    qc: list[str] = []
    result: dict[str, Any] = {
        "path": str(path),
        "kind": "ct",
        "shape": [int(n) for n in image.GetSize()],
        "spacing": [float(s) for s in image.GetSpacing()],
        "origin": [float(o) for o in image.GetOrigin()],
        "orientation": volume.source_orientation,
        "intensity": _stats(volume.hu),
        "masks": {},
        "qc_warnings": qc,
    }
    if result["intensity"]["min"] >= 0:
        qc.append("minimum intensity >= 0: values may not be HU (rescale missing?)")
    if volume.spacing[2] > COARSE_SLICE_MM:
        qc.append(f"coarse slice spacing {volume.spacing[2]:.3g} mm (> {COARSE_SLICE_MM:g} mm)")
    if masks is not None:
        for name, mask in read_masks(masks, volume, labels=mask_labels).items():
            result["masks"][name] = {"voxels": int(mask.sum()), "mean": float(volume.hu[mask].mean(dtype=np.float64))}
            qc += [f"{name} touches the {face} edge" for face in mask_edge_contact(mask)]
    return result


def _inspect_radiograph(path: PathLike) -> dict[str, Any]:
    image = read_radiograph(path)
    qc = [] if image.pixel_spacing is not None else ["no usable pixel spacing: sizes are in pixels only"]
    return {
        "path": str(path),
        "kind": "radiograph",
        "shape": [int(n) for n in image.shape],
        "spacing": None if image.pixel_spacing is None else [float(v) for v in image.pixel_spacing],
        "origin": None,
        "orientation": None,
        "intensity": _stats(image.pixels),
        "masks": {},
        "photometric": image.photometric,
        "modality": image.modality,
        "qc_warnings": qc,
    }


def _stats(values: np.ndarray) -> dict[str, float]:
    return {
        "min": float(np.min(values)),
        "mean": float(np.mean(values, dtype=np.float64)),
        "max": float(np.max(values)),
    }


def _as_list(value: Any) -> Sequence[Any]:
    if isinstance(value, str):
        return value.split("\\")
    try:
        return list(value)
    except TypeError:
        return [value]


def _fmt_seq(values: Sequence[Any], fmt: str, sep: str = " x ") -> str:
    return sep.join(fmt.format(v) for v in values)
