"""CT preprocessing of the CT fracture paper (papers/000) as pure functions on numpy arrays.

Arrays follow docs/CONTRACTS.md: canonical LPS, axis order (z, y, x) = (inferior->superior,
anterior->posterior, right->left); spacing is given as (x, y, z) mm. No Ray and no file I/O here:
`raypipe.data.ct_pipeline` maps `preprocess_ct_study` over a cohort.

Pipeline per study: vertebral bodies T12-L4 (discs excluded) -> axial slices from the top of T12's body to
the bottom of L4's body -> in-plane resampling to 1 x 1 mm (linear; slice thickness kept) -> HU window
[-200, 1000] scaled to [-1, 1] -> per slice a 96 x 96 bone-only crop centred on the body centroid and masked
to the vertebral body (`CTPreprocessConfig.bone_input`; disc slices, which have no body pixels, are all
pad value) and a 96 x 144 bone+muscle box centred on the body centroid (`muscle_crop_centre`; the
posterior shift is a sensitivity option). The 14 model slices are drawn
later (`sample_slices`), so augmentation can change them every epoch without re-reading CTs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from scipy import ndimage as ndi

from raypipe.io.errors import MaskError
from raypipe.preprocess.config import LEVEL_ORDER, CTPreprocessConfig

log = logging.getLogger(__name__)

AUTOCHTHON = ("autochthon_left", "autochthon_right")


class VolumeLike(Protocol):
    """What preprocessing needs from `raypipe.io.ct.CTVolume` (kept structural so tests can pass stubs)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


# --------------------------------------------------------------------------------------------- intensity


def hu_window(hu: np.ndarray, low: float = -200.0, high: float = 1000.0) -> np.ndarray:
    """Clip HU to [low, high] and scale linearly to [-1, 1] (the paper's bone/soft-tissue window)."""
    if high <= low:
        raise ValueError(f"window high ({high}) must exceed low ({low})")
    x = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    return (x - low) * np.float32(2.0 / (high - low)) - np.float32(1.0)


# -------------------------------------------------------------------------------------------- resampling


def _axial_grid(shape_yx: tuple[int, int], spacing_yx: tuple[float, float], target: tuple[float, float]):
    """Output size and index step of an in-plane grid whose pixel i sits at i * target mm from pixel 0."""
    n = [int(np.floor((shape_yx[k] - 1) * spacing_yx[k] / target[k] + 1e-6)) + 1 for k in range(2)]
    step = [target[k] / spacing_yx[k] for k in range(2)]
    return tuple(n), tuple(step)


def _resample(arr: np.ndarray, spacing: Sequence[float], target: tuple[float, float], order: int) -> np.ndarray:
    if arr.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {arr.shape}")
    sx, sy = float(spacing[0]), float(spacing[1])
    (ny, nx), (step_y, step_x) = _axial_grid(arr.shape[1:], (sy, sx), (float(target[0]), float(target[1])))
    if np.isclose(step_y, 1.0) and np.isclose(step_x, 1.0):
        return arr.copy()
    return ndi.affine_transform(
        arr, matrix=np.array([1.0, step_y, step_x]), output_shape=(arr.shape[0], ny, nx),
        order=order, mode="nearest", prefilter=False,
    )


def resample_axial(hu: np.ndarray, spacing: Sequence[float], target: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Linearly resample each axial slice to `target` (row, col) mm, keeping slice thickness (paper: 1 x 1 mm)."""
    return _resample(np.asarray(hu, dtype=np.float32), spacing, target, order=1)


def resample_axial_mask(mask: np.ndarray, spacing: Sequence[float], target: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Nearest-neighbour twin of `resample_axial` for label masks (no new label values)."""
    m = np.asarray(mask)
    out = _resample(m.astype(np.uint8) if m.dtype == bool else m, spacing, target, order=0)
    return out.astype(bool) if m.dtype == bool else out


# ------------------------------------------------------------------------------------------ vertebrae


def level_mask_name(level: str) -> str:
    """TotalSegmentator's mask name for a vertebral level (CONTRACTS.md)."""
    return f"vertebrae_{level}"


def _canal_front_row(vertebra: np.ndarray) -> int | None:
    """Most anterior row of the vertebral canal: the largest hole in the vertebra's axial projection."""
    proj = vertebra.any(axis=0)
    holes = ndi.binary_fill_holes(proj) & ~proj
    lab, n = ndi.label(holes)
    if n == 0:
        return None
    sizes = ndi.sum(holes, lab, index=np.arange(1, n + 1))
    canal = lab == (int(np.argmax(sizes)) + 1)
    return int(np.nonzero(canal.any(axis=1))[0].min())


def geometric_body(vertebra: np.ndarray, fraction: float = 0.5) -> tuple[np.ndarray, str]:
    """Vertebral body from a whole-vertebra mask when no body mask exists; returns (mask, rule used).

    Rule "canal": the arch encloses the canal, so projected along z the vertebra is a ring whose hole is
    the canal; the body is every vertebra voxel anterior to the canal's front row (posterior elements,
    pedicles and the arch lie at or behind it). Rule "fraction" (fallback when the projection has no hole,
    e.g. a truncated arch): voxels in the anterior `fraction` of the vertebra's AP extent. Discs are
    never in a vertebra mask, so both exclude them. Dice against TotalSegmentator's body mask on the
    example CT: 0.98-0.99 (canal) per level, tested in tests/test_preprocess_ct.py.
    """
    v = np.asarray(vertebra, dtype=bool)
    out = np.zeros_like(v)
    rows = np.nonzero(v.any(axis=(0, 2)))[0]
    if rows.size == 0:
        return out, "empty"
    front = _canal_front_row(v)
    rule = "canal"
    if front is None or front <= rows.min():
        front = int(np.ceil(rows.min() + fraction * (rows.max() - rows.min() + 1)))
        rule = "fraction"
    out[:, :front, :] = v[:, :front, :]
    return out, rule


def vertebral_bodies(
    masks: Mapping[str, np.ndarray],
    levels: Sequence[str] = ("T12", "L1", "L2", "L3", "L4"),
    body_mask: np.ndarray | None = None,
    fraction: float = 0.5,
) -> dict[str, np.ndarray]:
    """Body-only mask per level (discs and posterior elements excluded), for the levels present.

    With `body_mask` (TotalSegmentator `vertebrae_body` label 1, or VerSe subregions 49 + 50) each vertebra
    is intersected with it; otherwise `geometric_body` removes the posterior elements.
    """
    out: dict[str, np.ndarray] = {}
    bm = None if body_mask is None else np.asarray(body_mask, dtype=bool)
    for lvl in levels:
        m = masks.get(level_mask_name(lvl))
        if m is None:
            continue
        v = np.asarray(m, dtype=bool)
        if not v.any():
            continue
        if bm is not None:
            if bm.shape != v.shape:
                raise ValueError(f"body mask shape {bm.shape} differs from vertebra mask shape {v.shape}")
            out[lvl] = v & bm
        else:
            out[lvl] = geometric_body(v, fraction)[0]
    return out


# ------------------------------------------------------------------------------------------- slices


@dataclass(frozen=True)
class SliceSpan:
    """Axial slices covering the requested vertebral bodies, superior first."""

    indices: np.ndarray  # int, z indices into the volume, descending (superior -> inferior)
    levels: tuple[str, ...]  # level label per slice (nearest body for disc slices)
    z_mm: np.ndarray  # float32 world z (LPS, superior positive) per slice


def slices_spanning(
    bodies: Mapping[str, np.ndarray], z_origin_mm: float = 0.0, z_spacing_mm: float = 1.0
) -> SliceSpan:
    """Slices from the top of the first level's body to the bottom of the last one's, labelled by level.

    `bodies` is ordered top (e.g. T12) to bottom (L4). Disc slices between two bodies take the level of the
    nearest body (the upper one on ties), so every slice carries one of the requested level names.
    """
    names = list(bodies)
    if not names:
        raise ValueError("no vertebral bodies to span")
    zr: dict[str, tuple[int, int]] = {}
    for n in names:
        z = np.nonzero(np.asarray(bodies[n]).any(axis=(1, 2)))[0]
        if z.size == 0:
            raise ValueError(f"vertebral body {n} is empty")
        zr[n] = (int(z.min()), int(z.max()))
    top, bottom = zr[names[0]][1], zr[names[-1]][0]
    if top < bottom:
        raise ValueError(
            f"{names[0]} lies below {names[-1]} (z {zr[names[0]]} vs {zr[names[-1]]}): volume not in LPS order"
        )
    idx = np.arange(top, bottom - 1, -1)
    counts = np.stack([np.asarray(bodies[n]).sum(axis=(1, 2))[idx] for n in names], axis=1)
    labels: list[str] = []
    for i, k in enumerate(idx):
        if counts[i].max() > 0:
            labels.append(names[int(np.argmax(counts[i]))])
            continue
        dist = [0 if lo <= k <= hi else min(abs(k - lo), abs(k - hi)) for lo, hi in (zr[n] for n in names)]
        labels.append(names[int(np.argmin(dist))])  # argmin keeps the first (upper) level on ties
    z_mm = (z_origin_mm + idx * z_spacing_mm).astype(np.float32)
    return SliceSpan(indices=idx, levels=tuple(labels), z_mm=z_mm)


def sample_slices(n_available: int, n: int = 14, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of `n` equidistant slices over `n_available` (paper: 14, random start when training).

    The span is cut into `n` equal bins of width w = n_available / n and slice floor(o + i * w) is taken,
    with o = w / 2 for evaluation (deterministic, centred) and o ~ U[0, w) for training (the paper's random
    starting slice). With fewer than `n` slices the same rule repeats slices in order (nearest neighbour,
    deterministic for evaluation), so the model always sees `n` slices, superior to inferior.
    """
    if n_available < 1:
        raise ValueError("no slices to sample from")
    if n < 1:
        raise ValueError("n must be >= 1")
    w = n_available / n
    offset = w / 2.0 if rng is None else float(rng.uniform(0.0, w))
    idx = np.floor(offset + np.arange(n) * w).astype(np.int64)
    return np.clip(idx, 0, n_available - 1)


# --------------------------------------------------------------------------------------------- crops


def vertebra_crop_centre(body_mask_slice: np.ndarray) -> tuple[float, float] | None:
    """Centroid (row, col) in pixels of a body mask slice; None when the slice has no body voxels."""
    m = np.asarray(body_mask_slice, dtype=bool)
    if not m.any():
        return None
    r, c = ndi.center_of_mass(m)
    return float(r), float(c)


def crop_padding(shape: tuple[int, int], centre: tuple[float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixels (top, bottom, left, right) of a crop that fall outside a slice of `shape`."""
    r0 = int(round(centre[0])) - size[0] // 2
    c0 = int(round(centre[1])) - size[1] // 2
    return (max(0, -r0), max(0, r0 + size[0] - shape[0]), max(0, -c0), max(0, c0 + size[1] - shape[1]))


def vertebra_crop(
    image: np.ndarray, centre: tuple[float, float], size: tuple[int, int] = (96, 96), pad_value: float = -1.0
) -> np.ndarray:
    """Fixed-size crop of a 1 mm slice around `centre` (row, col), padded with `pad_value` outside the field."""
    img = np.asarray(image)
    h, w = int(size[0]), int(size[1])
    r0 = int(round(centre[0])) - h // 2
    c0 = int(round(centre[1])) - w // 2
    out = np.full((h, w), pad_value, dtype=img.dtype)
    rs, re = max(r0, 0), min(r0 + h, img.shape[0])
    cs, ce = max(c0, 0), min(c0 + w, img.shape[1])
    if rs < re and cs < ce:
        out[rs - r0: re - r0, cs - c0: ce - c0] = img[rs:re, cs:ce]
    return out


def _slice_centres(union: np.ndarray) -> np.ndarray:
    """Per-slice body centroid (row, col); disc slices without body voxels are interpolated along z."""
    cents = [vertebra_crop_centre(s) for s in union]
    have = np.array([c is not None for c in cents])
    if not have.any():
        raise ValueError("no body voxels in the span")
    pos = np.nonzero(have)[0]
    vals = np.array([cents[i] for i in pos])
    k = np.arange(len(cents))
    return np.stack([np.interp(k, pos, vals[:, 0]), np.interp(k, pos, vals[:, 1])], axis=1)


# --------------------------------------------------------------------------------------------- study


_EDGES = (  # (axis, side, name) for truncation warnings in (z, y, x) LPS arrays
    (0, -1, "superior"), (0, 0, "inferior"), (1, 0, "anterior"), (1, -1, "posterior"), (2, 0, "right"), (2, -1, "left"),
)


def _edge_warnings(name: str, level: str, m: np.ndarray) -> list[str]:
    out = []
    for axis, side, edge in _EDGES:
        if np.take(m, side, axis=axis).any():
            what = "volume" if axis == 0 else "field of view"
            out.append(f"{name} touches the {edge} edge of the {what}: {level} may be truncated")
    return out


def preprocess_ct_study(
    ct: VolumeLike,
    masks: Mapping[str, np.ndarray],
    body_mask: np.ndarray | None = None,
    config: CTPreprocessConfig | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One study -> (arrays: bone, bone_muscle, slice_level, slice_z_mm; qc dict).

    Raises MaskError when a requested level is missing (or a body mask is required and absent): a study is
    never cropped around the wrong vertebrae. `body_mask` falls back to `masks["vertebral_body"]`.
    """
    cfg = config or CTPreprocessConfig()
    src = str(getattr(ct, "path", None) or "<ct>")
    hu = np.asarray(ct.hu)
    sx, sy, sz = (float(s) for s in ct.spacing)
    voxel_ml = sx * sy * sz / 1000.0
    warnings: list[str] = []

    found = [
        lvl for lvl in LEVEL_ORDER
        if (m := masks.get(level_mask_name(lvl))) is not None and np.count_nonzero(m) * voxel_ml >= cfg.min_vertebra_ml
    ]
    missing = [lvl for lvl in cfg.levels if lvl not in found]
    if missing:
        raise MaskError(
            src,
            f"vertebrae {missing} missing or smaller than {cfg.min_vertebra_ml:g} ml (found {found or 'none'}); "
            f"cannot crop {cfg.levels[0]}-{cfg.levels[-1]}",
            field="mask_path",
            value=missing,
        )
    for m in masks.values():
        if np.shape(m) != hu.shape:
            raise MaskError(src, f"mask shape {np.shape(m)} differs from the CT's {hu.shape}", field="mask_path")

    bm = body_mask if body_mask is not None else masks.get("vertebral_body")
    if cfg.body_rule == "mask" and bm is None:
        raise MaskError(src, "body_rule 'mask' needs a vertebral body mask and none was given", field="body_mask_path")
    use_mask = bm is not None and cfg.body_rule != "geometric"
    bodies = vertebral_bodies(masks, cfg.levels, bm if use_mask else None, cfg.geometric_fraction)
    empty = [lvl for lvl in cfg.levels if lvl not in bodies or not bodies[lvl].any()]
    if empty:
        raise MaskError(src, f"the vertebral body mask has no voxels inside {empty}", field="body_mask_path")
    for lvl in cfg.levels:
        warnings += _edge_warnings(level_mask_name(lvl), lvl, np.asarray(masks[level_mask_name(lvl)], dtype=bool))

    span = slices_spanning(bodies, z_origin_mm=float(ct.origin[2]), z_spacing_mm=sz)
    union = np.zeros((len(span.indices),) + hu.shape[1:], dtype=bool)
    for b in bodies.values():
        union |= b[span.indices]
    centres_mm = _slice_centres(union) * np.array([sy, sx])

    ty, tx = cfg.spacing_mm
    shift = cfg.muscle_crop_shift_mm if cfg.muscle_crop_centre == "posterior_shift" else 0.0
    half_r = max(cfg.bone_crop[0] / 2 * ty, cfg.muscle_crop[0] / 2 * ty + abs(shift)) + 2 * max(ty, sy)
    half_c = max(cfg.bone_crop[1], cfg.muscle_crop[1]) / 2 * tx + 2 * max(tx, sx)
    # Resample only the window that the crops can reach: full 512^2 x 600 volumes would not fit a worker.
    r0 = max(0, int(np.floor((centres_mm[:, 0].min() - half_r) / sy)))
    r1 = min(hu.shape[1], int(np.ceil((centres_mm[:, 0].max() + half_r) / sy)) + 1)
    c0 = max(0, int(np.floor((centres_mm[:, 1].min() - half_c) / sx)))
    c1 = min(hu.shape[2], int(np.ceil((centres_mm[:, 1].max() + half_c) / sx)) + 1)
    sub = resample_axial(hu[span.indices, r0:r1, c0:c1], (sx, sy, sz), (ty, tx))
    win = hu_window(sub, cfg.window_low, cfg.window_high)
    body_1mm = resample_axial_mask(union[:, r0:r1, c0:c1], (sx, sy, sz), (ty, tx))
    rc = (centres_mm - np.array([r0 * sy, c0 * sx])) / np.array([ty, tx])

    n = len(span.indices)
    bone = np.empty((n,) + tuple(cfg.bone_crop), dtype=np.float16)
    muscle = np.empty((n,) + tuple(cfg.muscle_crop), dtype=np.float16)
    pad_b = pad_m = 0
    for i in range(n):
        cb = (rc[i, 0], rc[i, 1])
        cm = (rc[i, 0] + shift / ty, rc[i, 1])
        bone_i = vertebra_crop(win[i], cb, cfg.bone_crop, cfg.pad_value)
        if cfg.bone_input == "body_masked":
            inside = vertebra_crop(body_1mm[i], cb, cfg.bone_crop, False)
            bone_i = np.where(inside, bone_i, np.float32(cfg.pad_value))
        bone[i] = bone_i
        muscle[i] = vertebra_crop(win[i], cm, cfg.muscle_crop, cfg.pad_value)
        pad_b += any(_outside_volume(cb, cfg.bone_crop, win.shape[1:], (r0, r1, c0, c1), hu.shape[1:]))
        pad_m += any(_outside_volume(cm, cfg.muscle_crop, win.shape[1:], (r0, r1, c0, c1), hu.shape[1:]))

    fov_lr_mm, fov_ap_mm = hu.shape[2] * sx, hu.shape[1] * sy
    mw_mm, mh_mm = cfg.muscle_crop[1] * tx, cfg.muscle_crop[0] * ty
    if pad_m:
        if fov_lr_mm < mw_mm or fov_ap_mm < mh_mm:
            warnings.append(
                f"field of view ({fov_lr_mm:.0f} x {fov_ap_mm:.0f} mm, LR x AP) narrower than the "
                f"{mw_mm:.0f} x {mh_mm:.0f} mm bone+muscle crop: padded on {pad_m} of {n} slices"
            )
        else:
            warnings.append(f"bone+muscle crop extends beyond the field of view: padded on {pad_m} of {n} slices")
    if pad_b:
        warnings.append(f"bone crop extends beyond the field of view: padded on {pad_b} of {n} slices")
    if n < cfg.n_slices:
        warnings.append(f"only {n} slices span {cfg.levels[0]}-{cfg.levels[-1]}: fewer than {cfg.n_slices}, slices repeat")

    arrays = {
        "bone": bone,
        "bone_muscle": muscle,
        "slice_level": np.array(span.levels, dtype=object),
        "slice_z_mm": span.z_mm,
    }
    qc: dict[str, Any] = {
        "status": "ok",
        "vertebrae_found": found,
        "missing_levels": [],
        "n_slices": n,
        "spacing_mm": [sx, sy, sz],
        "source_orientation": getattr(ct, "source_orientation", None),
        "body_rule": "mask" if use_mask else "geometric",
        "bone_input": cfg.bone_input,
        "muscle_crop_centre": cfg.muscle_crop_centre,
        "muscle_crop_shift_mm": float(shift),
        "slices_without_body": int((~union.any(axis=(1, 2))).sum()),
        "span_mm": float(abs(span.z_mm[0] - span.z_mm[-1]) + sz),
        "padded_slices_bone": int(pad_b),
        "padded_slices_muscle": int(pad_m),
        "warnings": warnings,
        # where the crops sit in the source voxel grid, for QC pictures (raypipe.preprocess.qc_png)
        "geometry": {
            "slice_indices": [int(k) for k in span.indices],
            "slice_levels": list(span.levels),
            "centres_px": (centres_mm / np.array([sy, sx])).tolist(),
            "bone_box_px": [cfg.bone_crop[0] * ty / sy, cfg.bone_crop[1] * tx / sx],
            "muscle_box_px": [cfg.muscle_crop[0] * ty / sy, cfg.muscle_crop[1] * tx / sx],
            "muscle_shift_px": shift / sy,
            "n_slices": int(cfg.n_slices),
        },
    }
    for w in warnings:
        log.debug("%s: %s", src, w)
    return arrays, qc


def _outside_volume(
    centre: tuple[float, float], size: tuple[int, int], sub_shape: tuple[int, ...],
    window: tuple[int, int, int, int], full_shape: tuple[int, ...],
) -> tuple[int, int, int, int]:
    """Padding of a crop that is due to the volume's edge (not to the resampling window's own cut)."""
    top, bottom, left, right = crop_padding(tuple(sub_shape), centre, size)
    r0, r1, c0, c1 = window
    return (top if r0 == 0 else 0, bottom if r1 == full_shape[0] else 0,
            left if c0 == 0 else 0, right if c1 == full_shape[1] else 0)
