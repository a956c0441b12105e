"""Risk stratification: Diff-X risk groups from baseline and generated pVF scores, and their outcomes.

Diff-X rule (thresholds on pVF-model probabilities, defaults from the paper):
  HIGH  baseline >= low                       (a vertebral fracture is already likely today)
  LH    baseline <  low and generated >= high (low today, high in the generated future radiograph)
  LL    baseline <  low and generated <  high (low today and in the future)
`baseline_score` is the pVF score of the real radiograph (BpVF); `generated_score` that of the
generated future radiograph (GpVF, e.g. the mean over seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from raypipe.metrics._checks import as_1d, as_survival
from raypipe.metrics.survival import HazardRatio, cox_hazard_ratios, kaplan_meier

RISK_GROUPS: tuple[str, str, str] = ("LL", "LH", "HIGH")


def risk_groups(
    baseline_score: ArrayLike, generated_score: ArrayLike, low: float = 0.5, high: float = 0.6
) -> NDArray[np.str_]:
    """Diff-X group ("LL", "LH" or "HIGH") per patient from baseline and generated pVF scores."""
    base = as_1d(np.atleast_1d(baseline_score), "baseline_score")
    gen = as_1d(np.atleast_1d(generated_score), "generated_score", base.size)
    return np.where(base >= low, "HIGH", np.where(gen >= high, "LH", "LL")).astype("<U4")


@dataclass(frozen=True)
class GroupIncidence:
    """Cumulative incidence by the horizon in one group: 1 - KM survival, with its CI."""

    group: str
    n: int
    n_events: int
    incidence: float
    ci_low: float
    ci_high: float


def _as_group_labels(groups: ArrayLike, n: int) -> NDArray[np.str_]:
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups has shape {g.shape}, expected ({n},)")
    if pd.isna(g).any():
        raise ValueError("groups contains missing values")
    return g.astype(str)


def group_incidence(
    groups: ArrayLike, time: ArrayLike, event: ArrayLike, horizon: float, level: float = 0.95
) -> dict[str, GroupIncidence]:
    """Kaplan-Meier cumulative incidence by `horizon` per group (n_events counts events up to the horizon)."""
    t = as_1d(time, "time")
    g = _as_group_labels(groups, t.size)
    e = as_1d(event, "event", t.size).astype(bool)
    as_survival(t, e)
    out: dict[str, GroupIncidence] = {}
    for name in np.unique(g):
        m = g == name
        km = kaplan_meier(t[m], e[m], level)
        s = float(km.at([horizon])[0])
        lo, hi = km.ci_at([horizon])
        n_events = int(np.sum(e[m] & (t[m] <= horizon)))
        out[str(name)] = GroupIncidence(str(name), int(m.sum()), n_events, 1 - s, 1 - float(hi[0]), 1 - float(lo[0]))
    return out


def group_hazard_ratios(
    groups: ArrayLike, time: ArrayLike, event: ArrayLike, reference: str | None = None, level: float = 0.95
) -> dict[str, HazardRatio]:
    """Cox hazard ratio of each group against `reference` (default "LL" if present, else the first label)."""
    t, e = as_survival(time, event)
    g = _as_group_labels(groups, t.size)
    labels = list(np.unique(g))
    if len(labels) < 2:
        raise ValueError("groups must contain at least two groups")
    ref = reference if reference is not None else ("LL" if "LL" in labels else labels[0])
    if ref not in labels:
        raise ValueError(f"reference {ref!r} is not among the groups {labels}")
    df = pd.DataFrame({f"group={name}": (g == name).astype(float) for name in labels if name != ref})
    df["time"], df["event"] = t, e.astype(int)
    summary = cox_hazard_ratios(df, "time", "event", level)
    return {name: summary[f"group={name}"] for name in labels if name != ref}
