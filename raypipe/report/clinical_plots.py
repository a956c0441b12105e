"""Figures clinicians read (PNG bytes, matplotlib Agg): Kaplan-Meier with CI bands and a numbers-at-risk table,
calibration at each horizon, and the decision curve. The numbers come from `raypipe.metrics`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from raypipe.report.plots import COLORS, DAYS_PER_YEAR, new_figure, png_bytes


def _years_label(days: float) -> str:
    """`5-year` for whole years, else days."""
    years = days / 365.0
    return f"{years:g}-year" if abs(years - round(years)) < 1e-9 else f"{days:g}-day"


def _risk_ticks(max_years: float) -> np.ndarray:
    """Whole-year ticks (every 1, 2 or 5 years) from 0 to the end of follow-up."""
    step = 1 if max_years <= 8 else 2 if max_years <= 16 else 5
    return np.arange(0, math.floor(max_years) + 1e-9, step, dtype=float)


def km_with_risk_table(fits: Sequence[tuple[str, Any]], title: str, logrank_p: float | None = None) -> bytes:
    """Cumulative incidence (1 - KM) per group with its pointwise 95% band, numbers at risk in a table below.

    `fits` holds (label, `raypipe.metrics.KaplanMeier`) pairs; the band is the KM log(-log) CI.
    """
    max_days = max(float(km.time.max()) for _, km in fits)
    ticks = _risk_ticks(max_days / DAYS_PER_YEAR)
    fig = new_figure(6.4, 4.9 + 0.24 * len(fits))
    grid = fig.add_gridspec(2, 1, height_ratios=[4.2, 0.55 + 0.26 * len(fits)], hspace=0.12)
    ax = fig.add_subplot(grid[0])
    top = 0.0
    for i, (label, km) in enumerate(fits):
        color = COLORS[i % len(COLORS)]
        t = np.concatenate([[0.0], km.time]) / DAYS_PER_YEAR
        inc = 1.0 - np.concatenate([[1.0], km.survival])
        lo = 1.0 - np.concatenate([[1.0], km.ci_high])
        hi = 1.0 - np.concatenate([[1.0], km.ci_low])
        ax.fill_between(t, lo, hi, step="post", color=color, alpha=0.15, lw=0)
        n = int(km.n_at_risk[0]) if len(km.n_at_risk) else 0
        ax.step(t, inc, where="post", color=color, lw=1.9, label=f"{label} (n={n}, events={int(km.n_events.sum())})")
        top = max(top, float(np.nanmax(hi)))
    if logrank_p is not None:
        title += "\nlog-rank " + ("p < 0.001" if logrank_p < 0.001 else f"p = {logrank_p:.3f}")
    head = title
    ax.set_title(head, fontsize=11)
    ax.set_ylabel("Cumulative fracture incidence")
    ax.set_xlim(0, max_days / DAYS_PER_YEAR)
    ax.set_ylim(0, min(1.0, max(0.05, top * 1.08)))
    ax.set_xticks(ticks)
    ax.tick_params(labelbottom=False)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, frameon=False)

    tab = fig.add_subplot(grid[1], sharex=ax)
    for i, (label, km) in enumerate(fits):
        y = len(fits) - 1 - i
        for x, count in zip(ticks, km.at_risk(ticks * DAYS_PER_YEAR)):
            tab.text(x, y, str(int(count)), ha="center", va="center", fontsize=8.5)
        tab.text(-0.05, y, label, ha="right", va="center", fontsize=8.5, color=COLORS[i % len(COLORS)],
                 fontweight="bold", transform=tab.get_yaxis_transform())
    tab.set_ylim(-0.6, len(fits) - 0.4)
    tab.set_yticks([])
    tab.set_xlabel("Years since baseline")
    tab.text(-0.05, len(fits) - 0.1, "Number at risk", ha="right", va="bottom", fontsize=8.5, style="italic",
             transform=tab.get_yaxis_transform())
    for side in ("top", "right", "left"):
        tab.spines[side].set_visible(False)
    return png_bytes(fig)


def calibration_panels(models: Sequence[tuple[str, Sequence[Any]]]) -> bytes | None:
    """Observed (KM, 95% CI) against mean predicted risk per quantile group: one panel per horizon.

    `models` holds (model name, list of `raypipe.metrics.CalibrationGroups`) pairs; None when there is nothing.
    """
    horizons = sorted({c.horizon for _, cals in models for c in cals})
    if not horizons:
        return None
    cols = min(len(horizons), 3)
    rows = math.ceil(len(horizons) / cols)
    fig = new_figure(3.9 * cols, 3.9 * rows + (0.5 if rows * cols > len(horizons) else 0.9))
    for k, h in enumerate(horizons):
        ax = fig.add_subplot(rows, cols, k + 1)
        top = 0.0
        for i, (name, cals) in enumerate(models):
            cal = next((c for c in cals if c.horizon == h), None)
            if cal is None:
                continue
            ok = np.isfinite(cal.observed)
            err = np.vstack([cal.observed - cal.ci_low, cal.ci_high - cal.observed])[:, ok]
            ax.errorbar(cal.predicted[ok], cal.observed[ok], yerr=np.clip(err, 0, None), marker="o", ms=4, lw=1.3,
                        capsize=2, elinewidth=0.8, color=COLORS[i % len(COLORS)], label=name)
            top = max(top, float(np.nanmax(cal.predicted)), float(np.nanmax(np.where(ok, cal.observed, 0))))
        top = min(1.0, max(0.05, top * 1.15))
        ax.plot([0, top], [0, top], color="#999999", lw=1, ls="--", label="ideal")
        ax.set(xlim=(0, top), ylim=(0, top), title=f"{_years_label(h)} risk")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_xlabel("Predicted risk", fontsize=9)
        if k % cols == 0:
            ax.set_ylabel("Observed risk (Kaplan-Meier)", fontsize=9)
    handles = {}
    for a in fig.axes:
        for h, lab in zip(*a.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if rows * cols > len(horizons):  # a free grid cell holds the legend
        spare = fig.add_subplot(rows, cols, len(horizons) + 1)
        spare.axis("off")
        spare.legend(list(handles.values()), list(handles), loc="center", fontsize=9, frameon=False)
    else:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)),
                   fontsize=8.5, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Calibration by quantile groups of predicted risk", fontsize=11)
    return png_bytes(fig)


def decision_curves(curves: Sequence[tuple[str, Any]], max_threshold: float = 0.5) -> bytes | None:
    """Net benefit against threshold probability for each model, treating all and treating none.

    `curves` holds (model name, `raypipe.metrics.DecisionCurve`) pairs on one horizon; None when empty.
    """
    if not curves:
        return None
    fig: Figure = new_figure(6.2, 4.4)
    ax = fig.add_subplot()
    first = curves[0][1]
    keep = first.thresholds <= max_threshold
    ax.plot(first.thresholds[keep], first.treat_all[keep], color="#888888", lw=1.4, label="Treat all")
    ax.axhline(0.0, color="#222222", lw=1.2, label="Treat none")
    for i, (name, dc) in enumerate(curves):
        sel = dc.thresholds <= max_threshold
        ax.plot(dc.thresholds[sel], dc.model[sel], color=COLORS[i % len(COLORS)], lw=1.9, label=name)
    rate = max(dc.event_rate for _, dc in curves if np.isfinite(dc.event_rate))
    ax.set_ylim(-0.25 * rate, 1.1 * rate)
    ax.set_xlim(0, max_threshold)
    when = f"{_years_label(first.horizon)} risk" if first.horizon else "risk"
    ax.set(xlabel=f"Threshold probability ({when})", ylabel="Net benefit",
           title=f"Decision curve, {when} (event rate {rate:.1%})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    return png_bytes(fig)
