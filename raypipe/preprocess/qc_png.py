"""QC pictures of preprocessing as PNG bytes (matplotlib Agg, no pyplot state; pure functions, no Ray, no files).

- `ct_qc_picture`: a sagittal view through the spine with the vertebra mask outlines and the chosen axial
  slices marked, and each chosen slice with its bone crop (yellow), bone + muscle crop (cyan) and the
  vertebra mask outline (red).
- `xray_qc_picture`: the radiograph with the L1-L5 keypoints, the L1-L5 alignment axis and the region(s) cut
  out for the model (ROI or one square per vertebra), next to the model input itself.
The contact sheet that tiles them lives in `raypipe.preprocess.contact_sheet` (PIL only: the driver of a Ray
run draws it without importing matplotlib).
Pictures carry study ids and the QC message, never patient names or other DICOM header text.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon, Rectangle

_DPI = 80
# outline colours per vertebra, kept apart from the yellow/cyan/red of boxes, slices and keypoints
LEVEL_COLORS = ("#f032e6", "#f58231", "#bfef45", "#3cb44b", "#4363d8", "#911eb4", "#dcbeff", "#9a6324")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor=fig.get_facecolor())
    return buf.getvalue()


def _title(fig: Figure, title: str, problem: str | None) -> None:
    """Title line, plus the QC problem in orange (wrapped) when there is one."""
    fig.suptitle(title, color="white", fontsize=11, x=0.01, y=0.995, ha="left", va="top")
    if problem:
        text = "\n".join(textwrap.wrap(problem, 170)[:2])
        fig.text(0.01, 0.935, text, color="#ffa64d", fontsize=8.5, ha="left", va="top")


def _dark(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#444444")


def window(hu: np.ndarray, low: float = -200.0, high: float = 1000.0) -> np.ndarray:
    """HU clipped to a display window and scaled to [0, 1]."""
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def _vertebra_names(masks: Mapping[str, np.ndarray]) -> list[str]:
    """Vertebra mask names, superior first (T1 ... L5)."""
    order = [f"vertebrae_{p}{i}" for p, n in (("C", 7), ("T", 12), ("L", 5)) for i in range(1, n + 1)]
    return [n for n in order if n in masks]


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
        pick = sample_slices(len(idx_all), int(geometry.get("n_slices", 14)))
        chosen = [int(i) for i in pick]
        col = int(round(float(np.median(centres[:, 1]))))
    else:
        union = np.zeros(hu.shape, dtype=bool)
        for n in names:
            union |= np.asarray(masks[n], dtype=bool)
        col = int(round(float(np.nonzero(union)[2].mean()))) if union.any() else hu.shape[2] // 2
    col = int(np.clip(col, 0, hu.shape[2] - 1))

    n_thumbs = len(chosen)
    thumb_cols = 7 if n_thumbs > 7 else max(n_thumbs, 1)
    thumb_rows = math.ceil(n_thumbs / thumb_cols) if n_thumbs else 0
    width = 4.2 + 1.9 * thumb_cols * (1 if n_thumbs else 0)
    height = max(4.8, 0.7 + 2.05 * max(thumb_rows, 2))
    fig = _figure(width, height)
    _title(fig, title, problem)
    top = 0.86 if problem else 0.92
    left_w = 4.0 / width
    sag = fig.add_axes((0.01, 0.03, left_w - 0.02, top - 0.05))
    _draw_sagittal(sag, hu, masks, names, col, (sy, sz), geometry, chosen, hu_window)
    if not n_thumbs:
        return _png(fig)
    cell_w = (1.0 - left_w - 0.01) / thumb_cols
    cell_h = (top - 0.03) / thumb_rows
    bone_h, bone_w = (float(v) for v in geometry["bone_box_px"])
    mus_h, mus_w = (float(v) for v in geometry["muscle_box_px"])
    shift = float(geometry["muscle_shift_px"])
    for k, i in enumerate(chosen):
        r, c = divmod(k, thumb_cols)
        ax = fig.add_axes((left_w + c * cell_w + 0.003, top - (r + 1) * cell_h + 0.003, cell_w - 0.006,
                           cell_h - 0.03))
        z = int(geometry["slice_indices"][i])
        cr, cc = (float(v) for v in geometry["centres_px"][i])
        half_r = max(bone_h / 2, mus_h / 2 + abs(shift)) + 6
        half_c = max(bone_w, mus_w) / 2 + 6
        r0, r1 = int(max(0, cr - half_r)), int(min(hu.shape[1], cr + half_r + 1))
        c0, c1 = int(max(0, cc - half_c)), int(min(hu.shape[2], cc + half_c + 1))
        ax.imshow(window(hu[z, r0:r1, c0:c1], *hu_window), cmap="gray", vmin=0, vmax=1, aspect=sy / sx,
                  extent=(c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5), interpolation="bilinear")
        level = str(geometry["slice_levels"][i])
        m = masks.get(f"vertebrae_{level}")
        if m is not None and np.asarray(m[z, r0:r1, c0:c1]).any():
            ax.contour(np.arange(c0, c1), np.arange(r0, r1), np.asarray(m[z, r0:r1, c0:c1], dtype=float),
                       levels=[0.5], colors="#ff3b3b", linewidths=0.9)
        ax.add_patch(Rectangle((cc - bone_w / 2, cr - bone_h / 2), bone_w, bone_h, fill=False, ec="#ffd400", lw=1.1))
        ax.add_patch(Rectangle((cc - mus_w / 2, cr + shift - mus_h / 2), mus_w, mus_h, fill=False, ec="#33d6ff",
                               lw=1.0, ls="--"))
        ax.set_xlim(c0 - 0.5, c1 - 0.5)
        ax.set_ylim(r1 - 0.5, r0 - 0.5)
        ax.set_title(f"{k + 1}: {level}  z={z}", color="white", fontsize=8, pad=2)
        _dark(ax)
    return _png(fig)


def _draw_sagittal(ax: Any, hu: np.ndarray, masks: Mapping[str, np.ndarray], names: Sequence[str], col: int,
                   spacing_yz: tuple[float, float], geometry: Mapping[str, Any] | None, chosen: Sequence[int],
                   hu_window: tuple[float, float]) -> None:
    """Sagittal slice at x = `col`: superior up, anterior left; mask outlines, chosen slices and the span."""
    sy, sz = spacing_yz
    img = window(hu[:, :, col], *hu_window)  # (z, y)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=sz / sy, interpolation="bilinear")
    zs = []
    for j, n in enumerate(names):
        m = np.asarray(masks[n][:, :, col], dtype=float)
        if not m.any():
            continue
        color = LEVEL_COLORS[j % len(LEVEL_COLORS)]
        ax.contour(m, levels=[0.5], colors=color, linewidths=0.9)
        zz, yy = np.nonzero(m)
        ax.text(float(yy.max()) + 4, float(zz.mean()), n.removeprefix("vertebrae_"), color=color, fontsize=8,
                va="center")
        zs += [int(zz.min()), int(zz.max())]
    if geometry:
        idx = np.asarray(geometry["slice_indices"], dtype=int)
        for i in chosen:
            ax.axhline(idx[i], color="#33d6ff", lw=0.6, alpha=0.9)
        for z in (idx.max(), idx.min()):
            ax.axhline(z, color="#ffd400", lw=1.0)
        zs += [int(idx.min()), int(idx.max())]
    if zs:
        margin = int(40 / sz)
        ax.set_ylim(max(-0.5, min(zs) - margin), min(hu.shape[0] - 0.5, max(zs) + margin))
    ax.set_title(f"sagittal x={col}: spine masks, span (yellow), chosen slices (cyan)", color="white", fontsize=8,
                 pad=2)
    _dark(ax)


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
    img = np.asarray(pixels, dtype=np.float32)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    shown = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    channels = 0 if model_input is None else int(np.asarray(model_input).shape[0])
    grid_cols = 3 if channels > 1 else 1
    grid_rows = math.ceil(channels / grid_cols) if channels else 0
    aspect = img.shape[1] / max(img.shape[0], 1)
    left_w_in = min(6.0, max(2.5, 5.0 * aspect))
    right_w_in = 2.1 * grid_cols if channels else 0.0
    height = 5.6
    fig = _figure(left_w_in + right_w_in + 0.2, height)
    _title(fig, title, problem)
    top = 0.86 if problem else 0.92
    total = left_w_in + right_w_in + 0.2
    ax = fig.add_axes((0.01, 0.02, left_w_in / total - 0.01, top - 0.04))
    ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    for poly in corners_px:
        ax.add_patch(Polygon(np.asarray(poly, float), closed=True, fill=False, ec="#33d6ff", lw=1.0))
    if keypoints is not None and len(keypoints):
        kp = np.asarray(keypoints, dtype=float)
        ax.plot([kp[0, 0], kp[-1, 0]], [kp[0, 1], kp[-1, 1]], color="#ffd400", lw=1.0, ls="--")
        ax.plot(kp[:, 0], kp[:, 1], "o", ms=4, color="#ff3b3b")
        for name, (x, y) in zip(level_names, kp):
            ax.text(x + 0.02 * img.shape[1], y, name, color="#ff3b3b", fontsize=8, va="center")
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_title("keypoints (red), L1-L5 axis (yellow), model input region (cyan)", color="white", fontsize=8,
                 pad=2)
    _dark(ax)
    if channels:
        x0 = left_w_in / total + 0.005
        cw = (1.0 - x0 - 0.005) / grid_cols
        ch = (top - 0.03) / max(grid_rows, 1)
        for k in range(channels):
            r, c = divmod(k, grid_cols)
            sub = fig.add_axes((x0 + c * cw + 0.003, top - (r + 1) * ch + 0.003, cw - 0.006, ch - 0.04))
            sub.imshow(np.asarray(model_input[k], dtype=np.float32), cmap="gray", vmin=0, vmax=1)
            name = level_names[k] if channels == len(level_names) else "aligned input"
            sub.set_title(name, color="white", fontsize=8, pad=2)
            _dark(sub)
    return _png(fig)
