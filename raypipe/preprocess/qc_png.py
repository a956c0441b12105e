"""QC pictures of preprocessing as PNG bytes (PIL only; pure functions, no Ray, no files).

- `ct_qc_picture`: a sagittal view through the spine with the vertebra mask outlines and the chosen axial
  slices marked, and each chosen slice with its bone crop (yellow), bone + muscle crop (cyan, dashed) and the
  vertebra mask outline (red).
- `xray_qc_picture`: the radiograph with the L1-L5 keypoints, the L1-L5 alignment axis and the region(s) cut
  out for the model (ROI or one square per vertebra), next to the model input itself.
Drawn with PIL on a fixed pixel layout: a picture costs a few milliseconds, where a matplotlib figure cost
~0.25 s (X-ray) to ~0.55 s (CT), most of a study's preprocessing time. The contact sheet that tiles them lives
in `raypipe.preprocess.contact_sheet`. Pictures carry study ids and the QC message, never patient names or
other DICOM header text.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# outline colours per vertebra, kept apart from the yellow/cyan/red of boxes, slices and keypoints
LEVEL_COLORS = ("#f032e6", "#f58231", "#bfef45", "#3cb44b", "#4363d8", "#911eb4", "#dcbeff", "#9a6324")
YELLOW, CYAN, RED, ORANGE, WHITE = "#ffd400", "#33d6ff", "#ff3b3b", "#ffa64d", "#ffffff"
PNG_LEVEL = 2            # zlib level: 4 ms less per picture than 3, files ~5 % larger (noisy images compress little)
PAD = 8                  # pixels between panels
CAPTION_H = 16           # caption line above a panel or thumbnail
SAGITTAL_BOX = (320, 520)  # CT sagittal panel (width, height) in pixels
THUMB = 150              # CT thumbnail cell (square, pixels)
XRAY_PANEL_H = 440       # radiograph panel height in pixels
XRAY_CELL = 160          # model-input cell (square, pixels)


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    return ImageFont.load_default(size=size)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def _header(title: str, problem: str | None, width: int) -> list[tuple[str, str, int]]:
    """(text, colour, font size) lines above the panels: the title, then the QC problem (wrapped, 2 lines)."""
    lines = [(title, WHITE, 15)]
    if problem:
        chars = max(40, width // 7)
        lines += [(t, ORANGE, 12) for t in textwrap.wrap(problem, chars)[:2]]
    return lines


def _canvas(width: int, body_h: int, title: str, problem: str | None) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    """A black picture with the header drawn; returns it, its drawing context and the y where panels start."""
    lines = _header(title, problem, width)
    head = PAD + sum(size + 4 for _, _, size in lines)
    img = Image.new("RGB", (width, head + body_h + PAD), "black")
    draw = ImageDraw.Draw(img)
    y = PAD // 2
    for text, colour, size in lines:
        draw.text((PAD, y), text, fill=colour, font=_font(size))
        y += size + 4
    return img, draw, head


def _grey(values01: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A [0, 1] image as an RGB picture of `size` (width, height), bilinear."""
    u8 = (np.clip(np.nan_to_num(np.asarray(values01, dtype=np.float32)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(np.ascontiguousarray(u8), mode="L")
    return im.resize((max(1, size[0]), max(1, size[1])), Image.Resampling.BILINEAR).convert("RGB")


def _outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boundary pixels of a boolean mask shown at `size` (width, height): nearest-neighbour resize, then the
    pixels of the mask with a 4-neighbour outside it (a line one display pixel wide)."""
    m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _paint(img: Image.Image, where: np.ndarray, origin: tuple[int, int], colour: str) -> None:
    """Set the pixels `where` (a boolean array placed at `origin`) to `colour`, thickened to 2 pixels."""
    if not where.any():
        return
    thick = where.copy()
    thick[1:, :] |= where[:-1, :]
    thick[:, 1:] |= where[:, :-1]
    layer = Image.new("RGB", (where.shape[1], where.shape[0]), colour)
    img.paste(layer, origin, Image.fromarray(thick.astype(np.uint8) * 255))


def _dashed(draw: ImageDraw.ImageDraw, p0: Sequence[float], p1: Sequence[float], colour: str, width: int = 1,
            dash: float = 6.0, gap: float = 4.0) -> None:
    x0, y0 = (float(v) for v in p0)
    x1, y1 = (float(v) for v in p1)
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    t = 0.0
    while t < length:
        e = min(t + dash, length)
        draw.line([(x0 + ux * t, y0 + uy * t), (x0 + ux * e, y0 + uy * e)], fill=colour, width=width)
        t = e + gap


def _dashed_rect(draw: ImageDraw.ImageDraw, box: Sequence[float], colour: str) -> None:
    x0, y0, x1, y1 = box
    for p, q in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        _dashed(draw, p, q, colour, width=2, dash=5.0, gap=3.0)


def window(hu: np.ndarray, low: float = -200.0, high: float = 1000.0) -> np.ndarray:
    """HU clipped to a display window and scaled to [0, 1]."""
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def _vertebra_names(masks: Mapping[str, np.ndarray]) -> list[str]:
    """Vertebra mask names, superior first (T1 ... L5)."""
    order = [f"vertebrae_{p}{i}" for p, n in (("C", 7), ("T", 12), ("L", 5)) for i in range(1, n + 1)]
    return [n for n in order if n in masks]


def _fit(width_mm: float, height_mm: float, box: tuple[int, int]) -> tuple[int, int]:
    """Display size (width, height) in pixels of a width x height mm region fitted into `box`, aspect kept."""
    k = min(box[0] / max(width_mm, 1e-6), box[1] / max(height_mm, 1e-6))
    return max(1, int(round(width_mm * k))), max(1, int(round(height_mm * k)))


def ct_qc_picture(
    hu: np.ndarray,
    masks: Mapping[str, np.ndarray],
    spacing_xyz: Sequence[float],
    geometry: Mapping[str, Any] | None = None,
    title: str = "",
    problem: str | None = None,
    hu_window: tuple[float, float] = (-200.0, 1000.0),
) -> bytes:
    """The CT QC picture (module doc) from a (z, y, x) HU volume in LPS order and its boolean masks.

    `geometry` is `preprocess_ct_study`'s `qc["geometry"]`; without it (a study that could not be cropped)
    only the sagittal view with the masks found is drawn, with `problem` under the title.
    """
    hu = np.asarray(hu)
    sx, sy, sz = (float(s) for s in spacing_xyz)
    names = _vertebra_names(masks)
    chosen: list[int] = []
    if geometry:
        from raypipe.preprocess.ct import sample_slices

        idx_all = np.asarray(geometry["slice_indices"], dtype=int)
        centres = np.asarray(geometry["centres_px"], dtype=float)
        chosen = [int(i) for i in sample_slices(len(idx_all), int(geometry.get("n_slices", 14)))]
        col = int(round(float(np.median(centres[:, 1]))))
    else:
        union = np.zeros(hu.shape, dtype=bool)
        for n in names:
            union |= np.asarray(masks[n], dtype=bool)
        col = int(round(float(np.nonzero(union)[2].mean()))) if union.any() else hu.shape[2] // 2
    col = int(np.clip(col, 0, hu.shape[2] - 1))

    thumb_cols = min(7, len(chosen)) if chosen else 0
    thumb_rows = math.ceil(len(chosen) / 7) if chosen else 0
    sag = _Sagittal.of(hu, masks, names, col, (sy, sz), geometry, hu_window)
    left_w = SAGITTAL_BOX[0] + 2 * PAD
    width = left_w + (thumb_cols * (THUMB + PAD) if chosen else 0)
    body_h = max(sag.size[1] + CAPTION_H, thumb_rows * (THUMB + CAPTION_H + PAD))
    img, draw, top = _canvas(width, body_h, title, problem)
    sag.draw(img, draw, (PAD, top), chosen)
    if not chosen:
        return _png(img)
    assert geometry is not None
    bone_h, bone_w = (float(v) for v in geometry["bone_box_px"])
    mus_h, mus_w = (float(v) for v in geometry["muscle_box_px"])
    shift = float(geometry["muscle_shift_px"])
    for k, i in enumerate(chosen):
        r, c = divmod(k, 7)
        x0 = left_w + c * (THUMB + PAD)
        y0 = top + r * (THUMB + CAPTION_H + PAD)
        z = int(geometry["slice_indices"][i])
        cr, cc = (float(v) for v in geometry["centres_px"][i])
        half_r = max(bone_h / 2, mus_h / 2 + abs(shift)) + 6
        half_c = max(bone_w, mus_w) / 2 + 6
        r0, r1 = int(max(0, cr - half_r)), int(min(hu.shape[1], cr + half_r + 1))
        c0, c1 = int(max(0, cc - half_c)), int(min(hu.shape[2], cc + half_c + 1))
        level = str(geometry["slice_levels"][i])
        draw.text((x0, y0), f"{k + 1}: {level}  z={z}", fill=WHITE, font=_font(11))
        if r1 <= r0 or c1 <= c0 or not 0 <= z < hu.shape[0]:  # crop centre outside the volume: caption only
            continue
        size = _fit((c1 - c0) * sx, (r1 - r0) * sy, (THUMB, THUMB))
        ox, oy = x0 + (THUMB - size[0]) // 2, y0 + CAPTION_H + (THUMB - size[1]) // 2
        img.paste(_grey(window(hu[z, r0:r1, c0:c1], *hu_window), size), (ox, oy))
        m = masks.get(f"vertebrae_{level}")
        if m is not None and np.asarray(m[z, r0:r1, c0:c1]).any():
            _paint(img, _outline(np.asarray(m[z, r0:r1, c0:c1], dtype=bool), size), (ox, oy), RED)
        kx, ky = size[0] / (c1 - c0), size[1] / (r1 - r0)

        def px(cx: float, cy: float) -> tuple[float, float]:
            return ox + (cx - c0 + 0.5) * kx, oy + (cy - r0 + 0.5) * ky

        draw.rectangle([*px(cc - bone_w / 2, cr - bone_h / 2), *px(cc + bone_w / 2, cr + bone_h / 2)], outline=YELLOW,
                       width=2)
        _dashed_rect(draw, [*px(cc - mus_w / 2, cr + shift - mus_h / 2), *px(cc + mus_w / 2, cr + shift + mus_h / 2)],
                     CYAN)
    return _png(img)


@dataclass(frozen=True)
class _Sagittal:
    """The sagittal view at x = `col`, cropped to the spine masks and the span: superior up, anterior left."""

    view: np.ndarray                               # (z, y) in [0, 1], superior first
    z1: int                                        # one past the last slice shown
    size: tuple[int, int]                          # display (width, height) in pixels
    col: int
    masks: list[tuple[int, str, np.ndarray]]       # (colour index, name, cropped (z, y) mask, superior first)
    slice_indices: np.ndarray

    @classmethod
    def of(cls, hu: np.ndarray, masks: Mapping[str, np.ndarray], names: Sequence[str], col: int,
           spacing_yz: tuple[float, float], geometry: Mapping[str, Any] | None,
           hu_window: tuple[float, float]) -> "_Sagittal":
        sy, sz = spacing_yz
        found = [(j, n, np.asarray(masks[n][:, :, col], dtype=bool)) for j, n in enumerate(names)]
        found = [(j, n, m) for j, n, m in found if m.any()]
        idx = np.asarray(geometry["slice_indices"], dtype=int) if geometry else np.zeros(0, dtype=int)
        zs = [int(z) for _, _, m in found for z in (np.flatnonzero(m.any(1))[[0, -1]])]
        zs += [int(idx.min()), int(idx.max())] if len(idx) else []
        z0, z1 = 0, hu.shape[0]
        if zs:
            margin = int(40 / sz)
            z0, z1 = max(0, min(zs) - margin), min(hu.shape[0], max(zs) + margin + 1)
        view = window(hu[z0:z1, :, col], *hu_window)[::-1]
        size = _fit(view.shape[1] * sy, view.shape[0] * sz, SAGITTAL_BOX)
        return cls(view, z1, size, col, [(j, n, m[z0:z1][::-1]) for j, n, m in found], idx)

    def draw(self, img: Image.Image, draw: ImageDraw.ImageDraw, origin: tuple[int, int], chosen: Sequence[int]) -> None:
        """Draw into `img` at `origin`: the view, each mask's outline and name, the chosen slices and the span."""
        x_left, y_top = origin
        draw.text((x_left, y_top), f"sagittal x={self.col}: masks, span (yellow), slices (cyan)", fill=WHITE,
                  font=_font(11))
        ox, oy = x_left + (SAGITTAL_BOX[0] - self.size[0]) // 2, y_top + CAPTION_H
        img.paste(_grey(self.view, self.size), (ox, oy))
        kz, ky = self.size[1] / self.view.shape[0], self.size[0] / self.view.shape[1]

        def row_of(z: float) -> float:  # display row of slice z (superior up)
            return oy + (self.z1 - 0.5 - z) * kz

        for j, n, m in self.masks:
            colour = LEVEL_COLORS[j % len(LEVEL_COLORS)]
            _paint(img, _outline(m, self.size), (ox, oy), colour)
            rows, cols = np.nonzero(m)
            x_text = min(ox + (float(cols.max()) + 4) * ky, x_left + SAGITTAL_BOX[0] - 24)
            draw.text((x_text, oy + float(rows.mean()) * kz - 6), n.removeprefix("vertebrae_"), fill=colour,
                      font=_font(11))
        idx = self.slice_indices
        for i in chosen:
            draw.line([(ox, row_of(idx[i])), (ox + self.size[0], row_of(idx[i]))], fill=CYAN, width=1)
        for z in (idx.max(), idx.min()) if len(idx) else ():
            draw.line([(ox, row_of(z)), (ox + self.size[0], row_of(z))], fill=YELLOW, width=2)


def xray_qc_picture(
    pixels: np.ndarray,
    keypoints: np.ndarray | None = None,
    model_input: np.ndarray | None = None,
    corners_px: Sequence[Sequence[Sequence[float]]] = (),
    title: str = "",
    problem: str | None = None,
    level_names: Sequence[str] = ("L1", "L2", "L3", "L4", "L5"),
) -> bytes:
    """The radiograph QC picture (module doc); `model_input` is (C, H, W) in [0, 1], `corners_px` the cut regions."""
    img01 = np.asarray(pixels, dtype=np.float32)
    lo, hi = np.percentile(img01, [1, 99]) if img01.size else (0.0, 1.0)
    shown = np.clip((img01 - lo) / max(float(hi - lo), 1e-6), 0, 1)
    rows, cols = shown.shape[:2]
    channels = 0 if model_input is None else int(np.asarray(model_input).shape[0])
    grid_cols = 3 if channels > 1 else 1
    grid_rows = math.ceil(channels / grid_cols) if channels else 0
    k = min(XRAY_PANEL_H / max(rows, 1), 480 / max(cols, 1))
    size = (max(1, int(round(cols * k))), max(1, int(round(rows * k))))
    left_w = max(size[0], 240) + 2 * PAD
    width = left_w + (grid_cols * (XRAY_CELL + PAD) if channels else 0)
    body_h = max(size[1], grid_rows * (XRAY_CELL + CAPTION_H + PAD)) + CAPTION_H
    pic, draw, top = _canvas(width, body_h, title, problem)
    draw.text((PAD, top), "keypoints (red), L1-L5 axis (yellow), model input (cyan)", fill=WHITE, font=_font(11))
    ox, oy = PAD, top + CAPTION_H
    pic.paste(_grey(shown, size), (ox, oy))

    def px(x: float, y: float) -> tuple[float, float]:
        return ox + (x + 0.5) * k, oy + (y + 0.5) * k

    for poly in corners_px:
        pts = [px(float(x), float(y)) for x, y in np.asarray(poly, float)]
        draw.line(pts + pts[:1], fill=CYAN, width=2)
    if keypoints is not None and len(keypoints):
        kp = np.asarray(keypoints, dtype=float)
        _dashed(draw, px(*kp[0]), px(*kp[-1]), YELLOW)
        for name, (x, y) in zip(level_names, kp):
            cx, cy = px(x, y)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=RED)
            draw.text((cx + 0.02 * size[0] + 4, cy - 6), name, fill=RED, font=_font(11))
    for c in range(channels):
        r, q = divmod(c, grid_cols)
        x0 = left_w + q * (XRAY_CELL + PAD)
        y0 = top + r * (XRAY_CELL + CAPTION_H + PAD)
        chan = np.asarray(model_input[c], dtype=np.float32)
        name = level_names[c] if channels == len(level_names) else "aligned input"
        draw.text((x0, y0), name, fill=WHITE, font=_font(11))
        cell = _fit(chan.shape[1], chan.shape[0], (XRAY_CELL, XRAY_CELL))
        pic.paste(_grey(chan, cell), (x0 + (XRAY_CELL - cell[0]) // 2, y0 + CAPTION_H))
    return _png(pic)
