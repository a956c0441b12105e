"""Report figures as PNG bytes (matplotlib Agg, no pyplot state): ROC, Kaplan-Meier, td-AUROC, calibration, Grad-CAM."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25
_DPI = 110
COLORS = ("#1f5fa8", "#d1495b", "#2e933c", "#edae49", "#7b4fa0", "#00798c", "#8c564b", "#555555")


@dataclass(frozen=True)
class Curve:
    """One labelled line: x and y values, with an optional number for the legend (e.g. AUROC)."""

    label: str
    x: np.ndarray
    y: np.ndarray
    value: float | None = None


def new_figure(width: float = 5.6, height: float = 4.6) -> Figure:
    """A fresh Agg figure (thread-safe: no pyplot global state)."""
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _fmt_p(p: float) -> str:
    """P value for a plot title."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def roc_curves(curves: Sequence[Curve], title: str = "ROC curves") -> bytes:
    """ROC curves (x = 1 - specificity, y = sensitivity), one per model, AUROC in the legend."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="chance")
    for i, c in enumerate(curves):
        label = c.label if c.value is None else f"{c.label} (AUROC {c.value:.3f})"
        ax.plot(c.x, c.y, color=COLORS[i % len(COLORS)], lw=1.8, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 \u2212 specificity", ylabel="Sensitivity", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return png_bytes(fig)


def km_curves(curves: Sequence[Curve], title: str, logrank_p: float | None = None) -> bytes:
    """Kaplan-Meier cumulative incidence (1 - S) by risk group, time in years, log-rank p in the title."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, c in enumerate(curves):
        t = np.concatenate([[0.0], np.asarray(c.x, float)]) / DAYS_PER_YEAR
        s = np.concatenate([[1.0], np.asarray(c.y, float)])
        label = c.label if c.value is None else f"{c.label} (n={int(c.value)})"
        ax.step(t, 1.0 - s, where="post", color=COLORS[i % len(COLORS)], lw=1.8, label=label)
    full = title if logrank_p is None else f"{title}\nlog-rank {_fmt_p(logrank_p)}"
    ax.set(xlabel="Years since baseline", ylabel="Cumulative fracture incidence", title=full)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return png_bytes(fig)


def td_auroc_curves(curves: Sequence[Curve], title: str = "Time-dependent AUROC") -> bytes:
    """Cumulative/dynamic AUROC against time (years), one line per model, mean AUROC in the legend."""
    fig = new_figure()
    ax = fig.add_subplot()
    for i, c in enumerate(curves):
        label = c.label if c.value is None else f"{c.label} (mean {c.value:.3f})"
        ax.plot(np.asarray(c.x, float) / DAYS_PER_YEAR, c.y, marker="o", ms=3, lw=1.8,
                color=COLORS[i % len(COLORS)], label=label)
    ax.axhline(0.5, color="#999999", lw=1, ls="--")
    ax.set(xlabel="Years since baseline", ylabel="AUROC(t)", title=title, ylim=(0.3, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return png_bytes(fig)


def calibration_plot(curves: Sequence[Curve], title: str = "Calibration (5-year risk, deciles)") -> bytes:
    """Observed against predicted risk per decile of predicted risk, one line per model."""
    fig = new_figure()
    ax = fig.add_subplot()
    top = 0.0
    for i, c in enumerate(curves):
        ax.plot(c.x, c.y, marker="o", ms=4, lw=1.5, color=COLORS[i % len(COLORS)], label=c.label)
        top = max(top, float(np.nanmax(c.x)), float(np.nanmax(c.y)))
    top = min(1.0, max(0.05, top * 1.1))
    ax.plot([0, top], [0, top], color="#999999", lw=1, ls="--", label="ideal")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="Predicted risk", ylabel="Observed risk", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return png_bytes(fig)


def gradcam_gallery(images: Sequence[tuple[str, bytes]], title: str = "Grad-CAM", columns: int = 4) -> bytes | None:
    """A grid of Grad-CAM PNGs (name, PNG bytes) with their names as titles; None when none can be read."""
    from PIL import Image

    decoded: list[tuple[str, np.ndarray]] = []
    for name, data in images:
        try:
            with Image.open(io.BytesIO(data)) as im:
                decoded.append((name, np.asarray(im.convert("RGB"))))
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable Grad-CAM image %s: %s", name, exc)
    if not decoded:
        return None
    cols = min(columns, len(decoded))
    rows = math.ceil(len(decoded) / cols)
    fig = new_figure(2.6 * cols, 2.8 * rows + 0.4)
    for i, (name, arr) in enumerate(decoded):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(arr)
        ax.set_title(name if len(name) <= 28 else name[:25] + "...", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    return png_bytes(fig)
