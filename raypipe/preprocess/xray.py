"""Lateral spine radiograph preprocessing of the X-ray fracture paper (papers/001) as pure numpy functions.

Paper (Kong et al. 2022, Methods): HRNet keypoints = the centres of the L1-L5 vertebral bodies; the
radiograph is aligned "so that each of the two points (L1 and L5) was always in the same position"; the ROI
around the keypoints is extracted "with an external margin"; images are min-max normalised and resized to
384 x 384 "with zero paddings". Six inputs were compared (Table 2, Supplemental Fig. S1): full images of
L1-L5 or L1-L4 with and without masks of the vertebral bodies, and per-body patches of L1-L5 with and
without masks; L1-L5 patches without masks was best (AUROC 0.802) and is the default here.

Conventions and choices (the paper leaves the details open):
- Pixel coordinates are ``(x, y)`` = (column, row) with pixel centres at integer positions, as in the
  keypoints JSON. Affine matrices are 2 x 3 and map *source* (x, y) to *destination* (x, y).
- Alignment is a similarity transform (rotation + translation + one isotropic scale): with only rotation
  and translation, L1 and L5 cannot both land on fixed targets unless every spine has the same length in
  pixels, so the scale is what makes the paper's "always in the same position" possible.
- Distances are in units of the mean L1..L5 centre spacing ``s`` (one vertebral body + one disc, ~35 mm),
  so crops adapt to patient size and pixel spacing without needing a calibrated PixelSpacing.
- Full-image variants: in the aligned frame (spine vertical) the ROI is the keypoints' bounding box plus
  ``roi_margin * s`` above the first and below the last level and ``roi_half_width * s`` on both sides; it
  is min-max normalised, zero padded to a square and resized to 384 x 384 (one channel).
- Patch variant: one square patch per level, centred on the body centre, side ``patch_scale * s_local``
  (``s_local``: mean distance to the neighbouring centres), axes along the aligned spine, each resized to
  384 x 384 -> C = 5 channels (L1-L5); min-max over the whole stack by default, so that a less dense body
  stays darker than its neighbours.
- "With masks" variants: the paper used manually drawn body masks, which routine data lack. Here each body
  is approximated from its keypoints by a superellipse (exponent 4: a box with rounded corners) centred on
  the keypoint, oriented along the local spine tangent, half-height ``mask_half_height * s_local`` along the
  spine and half-depth ``mask_half_depth * s_local`` across it; pixels outside every body are zeroed and the
  min-max runs over the bodies only. This is an approximation of the paper's variant, not a segmentation.
Everything is sampled once from the original image through the composed transform (bilinear, with a
Gaussian pre-filter when downsampling), so alignment, crop and resize cost one interpolation.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from raypipe.io.errors import KeypointsError

log = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
VARIANTS: tuple[str, ...] = (
    "full_l1l5", "full_l1l4", "full_l1l5_masked", "full_l1l4_masked", "patches_l1l5", "patches_l1l5_masked",
)


# ------------------------------------------------------------------------------------------- intensity


def min_max(img: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Scale to [0, 1] by the min and max (over `mask` when given); a constant image becomes zeros."""
    x = np.asarray(img, dtype=np.float32)
    vals = x if mask is None else x[np.asarray(mask, dtype=bool)]
    if vals.size == 0:
        return np.zeros_like(x)
    lo, hi = float(vals.min()), float(vals.max())
    if not hi > lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def clahe(
    img: np.ndarray, clip_limit: float = 0.01, tiles: tuple[int, int] = (8, 8), nbins: int = 256
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (Zuiderveld), float [0, 1] in and out.

    Why: the pVF classifier sees CLAHE-equalised radiographs so that exposure differences between
    scanners do not dominate. Per tile a histogram clipped at ``clip_limit`` (fraction of the tile's pixels
    per bin, like skimage's ``clip_limit``) with the excess redistributed, its CDF as a lookup table, and
    bilinear blending of the four nearest tiles' tables at every pixel.
    """
    x = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if x.ndim != 2:
        raise ValueError(f"clahe expects a 2-D image, got shape {x.shape}")
    ty, tx = (max(1, int(t)) for t in tiles)
    h, w = x.shape
    th, tw = math.ceil(h / ty), math.ceil(w / tx)
    padded = np.pad(x, ((0, th * ty - h), (0, tw * tx - w)), mode="reflect" if min(h, w) > 1 else "edge")
    bins = np.minimum((padded * nbins).astype(np.int64), nbins - 1)
    tile_bins = bins.reshape(ty, th, tx, tw).transpose(0, 2, 1, 3).reshape(ty * tx, th * tw)
    offsets = (np.arange(ty * tx) * nbins)[:, None]
    hist = np.bincount((tile_bins + offsets).ravel(), minlength=ty * tx * nbins).reshape(ty * tx, nbins)
    hist = hist.astype(np.float64)
    n_px = th * tw
    clip = max(1.0, clip_limit * n_px) if clip_limit > 0 else np.inf
    for _ in range(8):  # redistribute the excess until (almost) nothing is above the clip level
        excess = np.clip(hist - clip, 0, None).sum(axis=1, keepdims=True)
        if not np.any(excess > 0.5):
            break
        hist = np.minimum(hist, clip) + excess / nbins
    cdf = np.cumsum(hist, axis=1)
    luts = (cdf / cdf[:, -1:]).reshape(ty, tx, nbins).astype(np.float32)
    # Bilinear blend between tile centres (tile i spans [i*th, (i+1)*th), centre at i*th + (th-1)/2).
    b = bins[:h, :w]
    fy = np.clip((np.arange(h) - (th - 1) / 2) / th, 0, ty - 1)
    fx = np.clip((np.arange(w) - (tw - 1) / 2) / tw, 0, tx - 1)
    y0 = np.minimum(np.floor(fy).astype(int), ty - 1)
    x0 = np.minimum(np.floor(fx).astype(int), tx - 1)
    y1, x1 = np.minimum(y0 + 1, ty - 1), np.minimum(x0 + 1, tx - 1)
    wy, wx = (fy - y0)[:, None].astype(np.float32), (fx - x0)[None, :].astype(np.float32)
    top = luts[y0[:, None], x0[None, :], b] * (1 - wx) + luts[y0[:, None], x1[None, :], b] * wx
    bottom = luts[y1[:, None], x0[None, :], b] * (1 - wx) + luts[y1[:, None], x1[None, :], b] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


# ------------------------------------------------------------------------------------------ keypoints


def as_keypoints(kp: Any) -> np.ndarray:
    """Keypoints as float64 (K, 2) (x, y) from an array, a `Keypoints` tuple or a {"L1": [x, y]} mapping."""
    if hasattr(kp, "xy"):
        kp = kp.xy
    if isinstance(kp, dict):
        kp = [kp[level] for level in LEVELS if level in kp]
    arr = np.asarray(kp, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise KeypointsError("<keypoints>", f"expected keypoints of shape (K, 2), got {arr.shape}")
    return arr


def check_keypoints(
    kp: Any,
    image_shape: tuple[int, int],
    pixel_spacing: tuple[float, float] | float | None = None,
    max_spacing_ratio: float = 2.0,
    spacing_mm_range: tuple[float, float] = (15.0, 60.0),
    max_tilt_deg: float = 60.0,
    max_lateral_deviation: float = 1.0,
    max_bend_deg: float = 45.0,
    min_spacing_px: float = 4.0,
) -> list[str]:
    """Plausibility problems of L1-L5 centres on a lateral radiograph (empty list = usable).

    Why: a keypoint model fails silently (swapped levels, all points on one body, points off the spine);
    using such points would feed the survival model the wrong anatomy. Checks: five finite points inside
    the image; ordered top to bottom along the spine (each step points the same way as L1->L5, which is
    within ``max_tilt_deg`` of image-down); consecutive spacings similar (max/min <= ``max_spacing_ratio``)
    and not collapsed; with a pixel spacing, mean spacing within ``spacing_mm_range``; not degenerate (no
    point farther than ``max_lateral_deviation`` mean spacings from the L1-L5 line, no bend sharper than
    ``max_bend_deg`` between consecutive segments).
    """
    try:
        p = as_keypoints(kp)
    except KeypointsError as e:
        return [e.reason]
    problems: list[str] = []
    if p.shape[0] != len(LEVELS):
        return [f"expected {len(LEVELS)} keypoints (L1-L5), got {p.shape[0]}"]
    if not np.all(np.isfinite(p)):
        bad = [LEVELS[i] for i in np.flatnonzero(~np.isfinite(p).all(axis=1))]
        return [f"non-finite keypoints: {', '.join(bad)}"]
    rows, cols = int(image_shape[0]), int(image_shape[1])
    outside = [LEVELS[i] for i, (x, y) in enumerate(p) if not (-0.5 <= x <= cols - 0.5 and -0.5 <= y <= rows - 0.5)]
    if outside:
        problems.append(f"keypoints outside the {rows}x{cols} image: {', '.join(outside)}")
    steps = np.diff(p, axis=0)
    d = np.linalg.norm(steps, axis=1)
    if np.any(d < min_spacing_px):
        pairs = [f"{LEVELS[i]}-{LEVELS[i + 1]}" for i in np.flatnonzero(d < min_spacing_px)]
        problems.append(f"collapsed keypoints (< {min_spacing_px:g} px apart): {', '.join(pairs)}")
        return problems
    axis = p[-1] - p[0]
    chord = float(np.linalg.norm(axis))
    if chord < min_spacing_px:
        problems.append("L1 and L5 coincide: keypoints collapsed")
        return problems
    u = axis / chord
    tilt = math.degrees(math.atan2(abs(u[0]), u[1]))  # 0 = straight down the image
    if u[1] <= 0 or tilt > max_tilt_deg:
        problems.append(f"L1 is not above L5 (spine axis {tilt:.0f} deg from image-down, limit {max_tilt_deg:g})")
    along = steps @ u
    if np.any(along <= 0):
        pairs = [f"{LEVELS[i]}-{LEVELS[i + 1]}" for i in np.flatnonzero(along <= 0)]
        problems.append(f"levels not ordered top to bottom along the spine: {', '.join(pairs)}")
    ratio = float(d.max() / d.min())
    if ratio > max_spacing_ratio:
        problems.append(
            f"uneven spacing between consecutive centres (max/min {ratio:.2f} > {max_spacing_ratio:g}; "
            f"spacings {', '.join(f'{v:.1f}' for v in d)} px)"
        )
    mean_d = float(d.mean())
    normal = np.array([-u[1], u[0]])
    lateral = np.abs((p - p[0]) @ normal) / mean_d
    if lateral.max() > max_lateral_deviation:
        problems.append(
            f"{LEVELS[int(lateral.argmax())]} lies {lateral.max():.2f} spacings off the L1-L5 line "
            f"(limit {max_lateral_deviation:g})"
        )
    cosines = np.sum(steps[1:] * steps[:-1], axis=1) / (d[1:] * d[:-1])
    bends = np.degrees(np.arccos(np.clip(cosines, -1, 1)))
    if bends.size and bends.max() > max_bend_deg:
        problems.append(f"sharp bend of {bends.max():.0f} deg at {LEVELS[int(bends.argmax()) + 1]} (limit {max_bend_deg:g})")
    if pixel_spacing is not None:
        ps = np.atleast_1d(np.asarray(pixel_spacing, dtype=float))
        if ps.size and np.all(ps > 0):
            # Spacing in mm with separate row/col spacings: scale each step's components.
            col_mm, row_mm = (float(ps[-1]), float(ps[0]))
            mm = float(np.mean(np.hypot(steps[:, 0] * col_mm, steps[:, 1] * row_mm)))
            lo, hi = spacing_mm_range
            if not lo <= mm <= hi:
                problems.append(f"mean spacing {mm:.1f} mm outside the plausible {lo:g}-{hi:g} mm for lumbar bodies")
    return problems


def local_spacing(kp: np.ndarray) -> np.ndarray:
    """Per-level spacing (K,): mean distance to the neighbouring centres (one neighbour at the ends)."""
    p = as_keypoints(kp)
    d = np.linalg.norm(np.diff(p, axis=0), axis=1)
    if d.size == 0:
        raise KeypointsError("<keypoints>", "need at least two keypoints to measure spacing")
    left = np.r_[d[0], d]
    right = np.r_[d, d[-1]]
    return (left + right) / 2


def local_tangent(kp: np.ndarray) -> np.ndarray:
    """Unit spine direction at each level (K, 2), pointing from L1 toward L5 (central differences)."""
    p = as_keypoints(kp)
    t = np.gradient(p, axis=0)
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)


# ----------------------------------------------------------------------------------------- transforms


def similarity_from_pairs(
    src_a: Sequence[float], src_b: Sequence[float], dst_a: Sequence[float], dst_b: Sequence[float]
) -> np.ndarray:
    """2x3 similarity (rotation + translation + isotropic scale) mapping src_a->dst_a and src_b->dst_b exactly."""
    sa, sb = complex(*src_a), complex(*src_b)
    da, db = complex(*dst_a), complex(*dst_b)
    if abs(sb - sa) < 1e-9:
        raise KeypointsError("<keypoints>", "cannot align: the two reference keypoints coincide")
    a = (db - da) / (sb - sa)
    t = da - a * sa
    return np.array([[a.real, -a.imag, t.real], [a.imag, a.real, t.imag]], dtype=np.float64)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 (or 3x3) affine to (N, 2) (x, y) points."""
    m = np.asarray(matrix, dtype=np.float64)[:2]
    p = np.atleast_2d(np.asarray(points, dtype=np.float64))
    return p @ m[:, :2].T + m[:, 2]


def _to3(m: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2] = np.asarray(m, dtype=np.float64)[:2]
    return out


def sample_affine(img: np.ndarray, out_to_src: np.ndarray, out_shape: tuple[int, int], order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sample `img` at src = out_to_src @ (x, y, 1) for every output pixel; returns (values, src xy grid)."""
    h, w = out_shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    m = np.asarray(out_to_src, dtype=np.float64)
    sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    vals = ndi.map_coordinates(img, [sy, sx], order=order, mode="constant", cval=0.0, prefilter=False)
    return vals.astype(np.float32), np.stack([sx, sy])


def warp_affine(img: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Warp `img` by a 2x3 source->destination affine onto `out_shape` (zeros outside the source)."""
    inv = np.linalg.inv(_to3(matrix))
    return sample_affine(np.asarray(img, dtype=np.float32), inv, out_shape, order)[0]


def antialias(img: np.ndarray, src_px_per_out_px: float) -> np.ndarray:
    """Gaussian pre-filter before downsampling (sigma = (factor - 1) / 2, as skimage's resize)."""
    if src_px_per_out_px <= 1.0:
        return img
    return ndi.gaussian_filter(img, (src_px_per_out_px - 1.0) / 2.0, mode="nearest")


@dataclass(frozen=True)
class AlignedSpine:
    """Result of `align_spine`: the warped image, the warped keypoints and the 2x3 source->aligned matrix."""

    image: np.ndarray
    keypoints: np.ndarray
    matrix: np.ndarray


def default_targets(out_size: int, l1_frac: Sequence[float] = (0.5, 0.25), l5_frac: Sequence[float] = (0.5, 0.75)) -> tuple[tuple[float, float], tuple[float, float]]:
    """L1/L5 target pixels for an `out_size` square: on the vertical centre line, a quarter from top/bottom."""
    c = out_size - 1
    return (l1_frac[0] * c, l1_frac[1] * c), (l5_frac[0] * c, l5_frac[1] * c)


def spine_alignment(
    kp: Any, out_size: int = 384, l1_target: Sequence[float] | None = None, l5_target: Sequence[float] | None = None
) -> np.ndarray:
    """The 2x3 similarity taking L1 (first keypoint) and L5 (last) to their targets (see module doc)."""
    p = as_keypoints(kp)
    d1, d5 = default_targets(out_size)
    return similarity_from_pairs(p[0], p[-1], l1_target if l1_target is not None else d1,
                                 l5_target if l5_target is not None else d5)


def align_spine(
    img: np.ndarray,
    kp: Any,
    out_size: int = 384,
    l1_target: Sequence[float] | None = None,
    l5_target: Sequence[float] | None = None,
) -> AlignedSpine:
    """Warp a radiograph so that L1 and L5 land on fixed targets (paper: "always in the same position")."""
    p = as_keypoints(kp)
    m = spine_alignment(p, out_size, l1_target, l5_target)
    scale = math.hypot(m[0, 0], m[1, 0])
    src = antialias(np.asarray(img, dtype=np.float32), 1.0 / scale)
    return AlignedSpine(warp_affine(src, m, (out_size, out_size)), apply_affine(m, p), m)


# ------------------------------------------------------------------------------------------ ROI, masks


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixel coordinates, inclusive of its edges: x0 <= x <= x1, y0 <= y <= y1."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        """Extent in x (pixels)."""
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        """Extent in y (pixels)."""
        return self.y1 - self.y0


def spine_roi(kp: Any, margin: float = 0.6, half_width: float = 0.9) -> Box:
    """ROI around (aligned) keypoints: their bounding box + `margin` spacings above/below, `half_width` at the sides.

    Units are the mean spacing of the given keypoints (see module doc); pass L1-L4 for the L1-L4 variant.
    """
    p = as_keypoints(kp)
    s = float(np.mean(np.linalg.norm(np.diff(p, axis=0), axis=1)))
    return Box(
        float(p[:, 0].min() - half_width * s), float(p[:, 1].min() - margin * s),
        float(p[:, 0].max() + half_width * s), float(p[:, 1].max() + margin * s),
    )


def body_mask_at(
    points_xy: np.ndarray, kp: Any, half_height: float = 0.39, half_depth: float = 0.55, exponent: float = 4.0
) -> np.ndarray:
    """Whether each point (2, ...) (x, y) lies in any keypoint-derived vertebral-body superellipse (module doc)."""
    p = as_keypoints(kp)
    s = local_spacing(p)
    t = local_tangent(p)
    x = np.asarray(points_xy[0], dtype=np.float64)
    y = np.asarray(points_xy[1], dtype=np.float64)
    inside = np.zeros(x.shape, dtype=bool)
    for (cx, cy), (tx, ty), sp in zip(p, t, s):
        along = (x - cx) * tx + (y - cy) * ty
        across = (x - cx) * -ty + (y - cy) * tx
        inside |= np.abs(along / (half_height * sp)) ** exponent + np.abs(across / (half_depth * sp)) ** exponent <= 1.0
    return inside


def body_masks(
    image_shape: tuple[int, int], kp: Any, half_height: float = 0.39, half_depth: float = 0.55, exponent: float = 4.0
) -> np.ndarray:
    """Boolean (rows, cols) mask of the keypoint-derived vertebral bodies: the "with masks" approximation."""
    ys, xs = np.mgrid[0:int(image_shape[0]), 0:int(image_shape[1])]
    return body_mask_at(np.stack([xs, ys]), kp, half_height, half_depth, exponent)


# -------------------------------------------------------------------------------------------- variants


def _roi_to_output(box: Box, size: int) -> np.ndarray:
    """3x3 taking ROI-frame (aligned) coords to output pixels: pad the box to a centred square, resize to size."""
    side = max(box.width, box.height)
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    k = (size - 1) / side if side > 0 else 1.0
    c = (size - 1) / 2
    return np.array([[k, 0, c - k * cx], [0, k, c - k * cy], [0, 0, 1]], dtype=np.float64)


def full_image(
    img: np.ndarray,
    kp: Any,
    levels: int = 5,
    size: int = 384,
    margin: float = 0.6,
    half_width: float = 0.9,
    mask: dict[str, float] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Full-image variant (1, size, size): align on L1/L5, ROI of the first `levels` bodies, min-max, zero pad.

    `mask` (keyword arguments of `body_mask_at`) keeps only the keypoint-derived bodies of those levels.
    """
    p = as_keypoints(kp)
    align = _to3(spine_alignment(p, size))
    box = spine_roi(apply_affine(align, p[:levels]), margin, half_width)
    total = _roi_to_output(box, size) @ align  # original -> output
    inv = np.linalg.inv(total)
    src = antialias(np.asarray(img, dtype=np.float32), math.hypot(inv[0, 0], inv[1, 0]))
    vals, src_xy = sample_affine(src, inv, (size, size))
    h, w = img.shape[:2]
    out_xy = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="xy")).astype(np.float64)
    ax = apply_affine(np.linalg.inv(_roi_to_output(box, size)), out_xy.reshape(2, -1).T).T.reshape(out_xy.shape)
    valid = (ax[0] >= box.x0) & (ax[0] <= box.x1) & (ax[1] >= box.y0) & (ax[1] <= box.y1)
    valid &= (src_xy[0] >= -0.5) & (src_xy[0] <= w - 0.5) & (src_xy[1] >= -0.5) & (src_xy[1] <= h - 0.5)
    if mask is not None:
        valid &= body_mask_at(src_xy, p[:levels], **mask)
    out = np.where(valid, min_max(vals, valid), 0.0).astype(np.float32)
    corners = apply_affine(inv, np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], float))
    info = {"roi_aligned": [box.x0, box.y0, box.x1, box.y1], "matrix": total[:2].tolist(),
            "valid_fraction": float(valid.mean()), "corners_px": [corners.tolist()]}
    return out[None], info


def vertebra_patches(
    img: np.ndarray,
    kp: Any,
    size: int = 384,
    levels: int = 5,
    patch_scale: float = 1.3,
    mask: dict[str, float] | None = None,
    per_channel: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-body patches (levels, size, size): square of side `patch_scale` x local spacing on each centre.

    Patch axes follow the L1->L5 direction (the aligned frame); min-max over the stack (or per channel).
    """
    p = as_keypoints(kp)
    if levels > p.shape[0]:
        raise KeypointsError("<keypoints>", f"{levels} patches requested but only {p.shape[0]} keypoints given")
    axis = p[-1] - p[0]
    u = axis / max(float(np.linalg.norm(axis)), 1e-9)  # image-down in the patch frame
    right = np.array([u[1], -u[0]])  # patch x axis: perpendicular, keeps the image's handedness
    spacing = local_spacing(p)
    h, w = img.shape[:2]
    src_img = np.asarray(img, dtype=np.float32)
    stack, valid_all, sides, corners = [], [], [], []
    filtered: dict[int, np.ndarray] = {}
    for i in range(levels):
        side = float(patch_scale * spacing[i])
        k = side / (size - 1)  # source pixels per output pixel
        c = (size - 1) / 2
        inv = np.array([
            [right[0] * k, u[0] * k, p[i, 0] - c * k * (right[0] + u[0])],
            [right[1] * k, u[1] * k, p[i, 1] - c * k * (right[1] + u[1])],
            [0, 0, 1],
        ])
        key = int(round(max(k, 1.0) * 4))  # share pre-filtered copies between similar scales
        if key not in filtered:
            filtered[key] = antialias(src_img, key / 4)
        vals, src_xy = sample_affine(filtered[key], inv, (size, size))
        valid = (src_xy[0] >= -0.5) & (src_xy[0] <= w - 0.5) & (src_xy[1] >= -0.5) & (src_xy[1] <= h - 0.5)
        if mask is not None:
            valid &= body_mask_at(src_xy, p, **mask)
        stack.append(vals)
        valid_all.append(valid)
        sides.append(side)
        corners.append(apply_affine(inv, np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]],
                                                  float)).tolist())
    arr, ok = np.stack(stack), np.stack(valid_all)
    if per_channel:
        out = np.stack([np.where(v, min_max(a, v), 0.0) for a, v in zip(arr, ok)])
    else:
        out = np.where(ok, min_max(arr, ok), 0.0)
    return out.astype(np.float32), {"patch_side_px": sides, "valid_fraction": float(ok.mean()), "corners_px": corners}


def preprocess_radiograph(rad: Any, kp: Any, config: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The paper's model input: (C, 384, 384) float16 in [0, 1] for `config.variant`, plus a QC dict.

    Raises `KeypointsError` (a `RaypipeInputError`) listing every plausibility problem, so implausible
    keypoints end up in QC as "skipped" instead of silently producing a wrong crop.
    """
    from raypipe.preprocess.config import XrayPreprocessConfig

    cfg = config if config is not None else XrayPreprocessConfig()
    pixels = np.asarray(getattr(rad, "pixels", rad), dtype=np.float32)
    spacing = getattr(rad, "pixel_spacing", None)
    if pixels.ndim != 2:
        raise KeypointsError(getattr(rad, "path", "<image>"), f"expected a 2-D radiograph, got shape {pixels.shape}")
    p = as_keypoints(kp)
    problems = check_keypoints(p, pixels.shape, spacing, **cfg.check_kwargs())
    if problems:
        raise KeypointsError(getattr(rad, "path", "<keypoints>"), "implausible keypoints: " + "; ".join(problems),
                             field="keypoints", value=problems)
    if cfg.apply_clahe:
        pixels = clahe(pixels, cfg.clahe_clip_limit, cfg.clahe_tiles)
    mask = cfg.mask_kwargs() if cfg.variant.endswith("_masked") else None
    if cfg.variant.startswith("full_"):
        levels = 4 if "l1l4" in cfg.variant else 5
        image, info = full_image(pixels, p, levels, cfg.out_size, cfg.roi_margin, cfg.roi_half_width, mask)
    elif cfg.variant.startswith("patches_"):
        image, info = vertebra_patches(pixels, p, cfg.out_size, 5, cfg.patch_scale, mask, cfg.minmax_per_channel)
    else:  # pragma: no cover - the config validates the name
        raise ValueError(f"unknown variant {cfg.variant!r}")
    d = np.linalg.norm(np.diff(p, axis=0), axis=1)
    warnings = []
    if info["valid_fraction"] < 0.05:
        warnings.append(f"only {info['valid_fraction']:.1%} of the output holds image content")
    qc = {
        "variant": cfg.variant,
        "channels": int(image.shape[0]),
        "mean_spacing_px": float(d.mean()),
        "spacing_ratio": float(d.max() / d.min()),
        "warnings": warnings,
        **info,
    }
    return image.astype(np.float16), qc
