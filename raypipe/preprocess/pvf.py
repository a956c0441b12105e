"""Radiograph inputs of the Diff-X branch (papers/004) as pure numpy functions.

- `pvf_input`: the Verte-X pVF classifier's input: the radiograph resized to 1024 x 512 (rows x cols)
  "while preserving the original width and height aspect ratio" (scaled to fit, zero padded, centred),
  CLAHE and a fixed normalisation (paper, Methods 4).
- `ldm_input`: the diffusion models' input: padded to a square (aspect kept) and resized to 512 x 512,
  in [-1, 1] as latent diffusion VAEs expect (Methods 4: "resized to 512x512 pixels").
- `from_ldm_output`: the inverse intensity map for PNGs and for scoring generated images.
- `crop_ldm_content`: a generated square cut back to the box the radiograph occupies in `ldm_input`'s
  square, so GpVF is scored on the geometry BpVF is scored on (`pvf_input` then fits it exactly as it fits
  the baseline; no padding bars enter the CLAHE or the classifier).
All take and return float arrays; images are [0, 1] bone bright (`raypipe.io.radiograph`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raypipe.preprocess.xray import clahe, min_max

__all__ = ["PVF_SIZE", "LDM_SIZE", "PVFPreprocess", "crop_ldm_content", "fit_box", "fit_to_canvas", "from_ldm_output", "ldm_input",
           "pvf_input"]

PVF_SIZE: tuple[int, int] = (1024, 512)
LDM_SIZE: int = 512


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of a 2-D float image (torch, so one code path for up and down)."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def fit_box(src_shape: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Box ``(top, left, height, width)`` an image of ``src_shape`` fills when fitted into ``shape`` (aspect kept, centred)."""
    rows, cols = shape
    scale = min(rows / src_shape[0], cols / src_shape[1])
    h = max(1, min(rows, int(round(src_shape[0] * scale))))
    w = max(1, min(cols, int(round(src_shape[1] * scale))))
    return (rows - h) // 2, (cols - w) // 2, h, w


def fit_to_canvas(img: np.ndarray, shape: tuple[int, int], fill: float = 0.0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Scale `img` to fit `shape` with its aspect ratio kept and pad (centred) with `fill`.

    Returns the canvas and the content box `(top, left, height, width)` so callers can equalise only
    the content (CLAHE on padding would stretch the background).
    """
    x = np.asarray(img, dtype=np.float32)
    if x.ndim != 2 or min(x.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {x.shape}")
    top, left, h, w = fit_box(x.shape, shape)
    canvas = np.full(tuple(shape), fill, dtype=np.float32)
    canvas[top:top + h, left:left + w] = _resize(x, (h, w))
    return canvas, (top, left, h, w)


def pvf_input(
    pixels: np.ndarray,
    size: tuple[int, int] = PVF_SIZE,
    clip_limit: float = 0.01,
    tiles: tuple[int, int] = (8, 8),
    mean: float = 0.5,
    std: float = 0.25,
) -> np.ndarray:
    """(1, rows, cols) float32 classifier input: fit + pad, CLAHE on the content, then (x - mean) / std."""
    canvas, (top, left, h, w) = fit_to_canvas(min_max(pixels), size)
    content = canvas[top:top + h, left:left + w]
    if clip_limit > 0 and min(h, w) >= 2:
        canvas[top:top + h, left:left + w] = clahe(content, clip_limit=clip_limit, tiles=tiles)
    return ((canvas - mean) / std)[None].astype(np.float32)


@dataclass(frozen=True)
class PVFPreprocess:
    """The pVF classifier's input settings, defined once: training writes them into the run artifact
    (`preprocess`), every scorer reads them back, so an image is scored as the training images were made."""

    size: tuple[int, int] = PVF_SIZE
    clip_limit: float = 0.01
    tiles: tuple[int, int] = (8, 8)
    mean: float = 0.5
    std: float = 0.25

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "PVFPreprocess":
        """From a run artifact's `preprocess` block; missing keys keep the defaults above."""
        d = dict(data or {})
        base = cls()
        return cls(size=tuple(int(v) for v in d.get("size", base.size)),  # type: ignore[arg-type]
                   clip_limit=float(d.get("clip_limit", base.clip_limit)),
                   tiles=tuple(int(v) for v in d.get("tiles", base.tiles)),  # type: ignore[arg-type]
                   mean=float(d.get("mean", base.mean)), std=float(d.get("std", base.std)))

    def to_dict(self) -> dict[str, Any]:
        """The artifact's `preprocess` block (JSON-friendly lists)."""
        d = asdict(self)
        return {**d, "size": list(self.size), "tiles": list(self.tiles)}

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """`pvf_input` with these settings."""
        return pvf_input(pixels, size=self.size, clip_limit=self.clip_limit, tiles=self.tiles, mean=self.mean,
                         std=self.std)


def ldm_input(pixels: np.ndarray, size: int = LDM_SIZE) -> np.ndarray:
    """(1, size, size) float32 in [-1, 1]: min-max, padded to a square with the aspect kept, resized."""
    canvas, _ = fit_to_canvas(min_max(pixels), (size, size))
    return (canvas * 2.0 - 1.0)[None].astype(np.float32)


def from_ldm_output(x: np.ndarray) -> np.ndarray:
    """[-1, 1] model space -> [0, 1] image space (clipped), the inverse of `ldm_input`'s scaling."""
    return np.clip((np.asarray(x, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)



def crop_ldm_content(generated: np.ndarray, source_shape: tuple[int, int]) -> np.ndarray:
    """The part of a generated ``(S, S)`` image where ``ldm_input`` put a radiograph of ``source_shape``."""
    g = np.asarray(generated)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"expected a square generated image, got shape {g.shape}")
    top, left, h, w = fit_box(tuple(source_shape), g.shape)
    return g[top:top + h, left:left + w]
