"""Geometric augmentation as pure numpy functions: radiographs with their keypoints, and image-model batches.

The keypoint model sees a radiograph min-max normalised and zero padded to a square, resized to the input
side (`square_input`), then, while training, a random similarity transform about the image centre:
rotation, isotropic scale, horizontal flip and a small shift (`random_affine`). The same 2 x 3 matrix moves
the image (`warp_affine`) and the keypoints (`apply_affine`), so labels stay on the anatomy. Flipping a
lateral radiograph left-right does not change which body is L1..L5, so keypoint order is kept.
Coordinates follow `raypipe.preprocess.xray`: (x, y) = (column, row), pixel centres at integers.

The image models (CT CNN-RNN, DeepSurv) take `flip_shift`: a per-sample left-right flip and integer translation
of a whole batch at once (every slice or vertebra channel of a sample moves together), edges replicated, no
intensity change (the planted and real signals are in the grey levels: HU, radiographic density). On the
synthetic cohort without it the tiny CT model memorised its ~240 training studies (training AUROC 0.98,
out of fold 0.57-0.70 against a ceiling of 0.80); with it, 0.74-0.76 (bench/RESULTS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raypipe.preprocess.xray import antialias, apply_affine, min_max, warp_affine


@dataclass(frozen=True)
class SquareInput:
    """A model input and the 2 x 3 matrix taking original pixels to input pixels (invert it for predictions)."""

    image: np.ndarray
    keypoints: np.ndarray | None
    matrix: np.ndarray


def square_matrix(shape: tuple[int, int], size: int) -> np.ndarray:
    """Original -> input pixels: zero pad to a square (bottom/right) of side max(shape), resize to `size`."""
    side = float(max(shape))
    s = size / side
    return np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5]])


def square_input(img: np.ndarray, size: int, keypoints: np.ndarray | None = None) -> SquareInput:
    """Paper's keypoint input: min-max to [0, 1], zero padding to a square, resize to size x size."""
    x = min_max(np.asarray(img, dtype=np.float32))
    m = square_matrix(x.shape, size)
    out = warp_affine(antialias(x, 1.0 / m[0, 0]), m, (size, size))
    kp = None if keypoints is None else apply_affine(m, np.asarray(keypoints, dtype=np.float64))
    return SquareInput(out, kp, m)


def to_original(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map input-pixel points back to original pixels through the inverse of a 2 x 3 matrix."""
    full = np.eye(3)
    full[:2] = matrix
    return apply_affine(np.linalg.inv(full), points)


def random_affine(
    size: int,
    rng: np.random.Generator,
    rotation_deg: float = 15.0,
    scale_range: tuple[float, float] = (0.85, 1.15),
    flip_prob: float = 0.5,
    translate_frac: float = 0.05,
) -> np.ndarray:
    """A random 2 x 3 similarity about the centre of a size x size image: rotate, scale, flip, shift."""
    angle = math.radians(rng.uniform(-rotation_deg, rotation_deg)) if rotation_deg > 0 else 0.0
    scale = rng.uniform(*scale_range)
    flip = -1.0 if rng.random() < flip_prob else 1.0
    shift = rng.uniform(-translate_frac, translate_frac, size=2) * size
    c = (size - 1) / 2.0
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.diag([flip, 1.0])
    offset = np.array([c, c]) + shift - linear @ np.array([c, c])
    return np.concatenate([linear, offset[:, None]], axis=1)


def augment(img: np.ndarray, keypoints: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply one 2 x 3 matrix to a square image (zeros outside) and to its keypoints."""
    out = warp_affine(np.asarray(img, dtype=np.float32), matrix, img.shape[:2])
    return out, apply_affine(matrix, keypoints)


def flip_shift(x: np.ndarray, flips: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Flip samples left-right where `flips` (B,) and translate each by `shifts` (B, 2) = (dy, dx) pixels.

    `x` is a batch (B, ..., H, W); the output has its shape, content moved by (+dy, +dx), the border replicated.
    """
    x = np.asarray(x)
    flips = np.asarray(flips, dtype=bool).reshape(-1)
    shifts = np.asarray(shifts, dtype=np.int64).reshape(-1, 2)
    if x.ndim < 3 or len(flips) != x.shape[0] or len(shifts) != x.shape[0]:
        raise ValueError(f"need a batch (B, ..., H, W) with B flips and B (dy, dx) shifts, got x {x.shape}, "
                         f"flips {flips.shape}, shifts {shifts.shape}")
    out = x.copy()
    if flips.any():
        out[flips] = out[flips][..., ::-1]
    m = int(np.abs(shifts).max()) if len(shifts) else 0
    if m == 0:
        return out
    h, w = x.shape[-2:]
    if m >= min(h, w):
        raise ValueError(f"shift of {m} px does not fit an image of {h} x {w}")
    pad = [(0, 0)] * (x.ndim - 2) + [(m, m), (m, m)]
    padded = np.pad(out, pad, mode="edge")
    lead = (x.shape[0],) + (1,) * (x.ndim - 3)
    rows = (np.arange(h)[None, :] - shifts[:, :1] + m).reshape(*lead, h, 1)
    cols = (np.arange(w)[None, :] - shifts[:, 1:] + m).reshape(*lead, 1, w)
    return np.take_along_axis(np.take_along_axis(padded, rows, axis=-2), cols, axis=-1)
