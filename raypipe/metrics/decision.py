"""Decision-curve analysis: net benefit of treating by a model's risk against treating all or none.

Net benefit at a threshold probability pt (Vickers & Elkin 2006) counts true positives and charges each
false positive the odds pt / (1 - pt) of the harm a clinician accepts: NB = TP/n - FP/n * pt / (1 - pt).
For a time-to-event outcome at horizon h (Vickers et al. 2008), the rate of events among those treated
is the Kaplan-Meier risk 1 - S(h) of the test-positive group, so censored patients count as they should:
  NB(pt) = P(risk >= pt) * [(1 - S+(h)) - S+(h) * pt / (1 - pt)],
and treating all is the same with everyone positive. Treating none has net benefit 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from raypipe.metrics._checks import as_1d, as_binary
from raypipe.metrics.survival import kaplan_meier

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 51))


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit per threshold probability: the model's, treating all, and (always 0) treating none."""

    thresholds: NDArray[np.float64]
    model: NDArray[np.float64]
    treat_all: NDArray[np.float64]
    n: int
    event_rate: float  # prevalence, or the Kaplan-Meier risk by the horizon
    horizon: float | None = None

    @property
    def treat_none(self) -> NDArray[np.float64]:
        """Net benefit of treating nobody: zero at every threshold."""
        return np.zeros_like(self.thresholds)


def _thresholds(thresholds: ArrayLike | None) -> NDArray[np.float64]:
    """Threshold probabilities strictly between 0 and 1, increasing."""
    pt = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, dtype=np.float64).ravel()
    if pt.size == 0 or np.any(~np.isfinite(pt)) or np.any(pt <= 0) or np.any(pt >= 1):
        raise ValueError(f"thresholds must be probabilities in (0, 1), got {pt[:5].tolist()}...")
    if np.any(np.diff(pt) <= 0):
        raise ValueError("thresholds must be strictly increasing")
    return pt


def _as_risk(risk: ArrayLike, n: int | None = None) -> NDArray[np.float64]:
    """Predicted probabilities in [0, 1]."""
    r = as_1d(risk, "risk", n)
    if np.any(r < 0) or np.any(r > 1):
        raise ValueError(f"risk must be a probability in [0, 1], found values in [{r.min():.4g}, {r.max():.4g}]")
    return r


def net_benefit(y: ArrayLike, risk: ArrayLike, thresholds: ArrayLike | None = None) -> DecisionCurve:
    """Net benefit of a binary outcome `y` for treating when `risk >= pt`, with the treat-all reference."""
    r = _as_risk(risk)
    yy = as_binary(y, "y", r.size)
    pt = _thresholds(thresholds)
    n = r.size
    odds = pt / (1.0 - pt)
    pos = r[None, :] >= pt[:, None]
    tp = (pos & yy[None, :]).sum(axis=1) / n
    fp = (pos & ~yy[None, :]).sum(axis=1) / n
    prevalence = float(yy.mean())
    return DecisionCurve(pt, tp - fp * odds, prevalence - (1.0 - prevalence) * odds, n, prevalence)


def _km_risk(time: NDArray[np.float64], event: NDArray[np.bool_], horizon: float) -> float:
    """1 - S(horizon) by Kaplan-Meier; NaN when follow-up ends (censored, S > 0) before the horizon."""
    km = kaplan_meier(time, event)
    s = float(km.at([horizon])[0])
    if time.max() < horizon and s > 0:
        return float("nan")
    return 1.0 - s


def net_benefit_survival(
    time: ArrayLike, event: ArrayLike, risk: ArrayLike, horizon: float, thresholds: ArrayLike | None = None
) -> DecisionCurve:
    """Net benefit at `horizon` for treating when the predicted risk by the horizon is >= pt (module doc)."""
    t = as_1d(time, "time")
    if np.any(t < 0):
        raise ValueError(f"time must be >= 0, found {float(t.min())}")
    e = as_binary(event, "event", t.size)
    r = _as_risk(risk, t.size)
    if not horizon > 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    if t.max() < horizon:
        raise ValueError(f"follow-up ends at {t.max():g}, before the horizon {horizon:g}")
    pt = _thresholds(thresholds)
    odds = pt / (1.0 - pt)
    overall = _km_risk(t, e, horizon)
    model = np.empty_like(pt)
    for i, p in enumerate(pt):
        pos = r >= p
        if not pos.any():
            model[i] = 0.0
            continue
        risk_pos = _km_risk(t[pos], e[pos], horizon)
        model[i] = pos.mean() * (risk_pos - (1.0 - risk_pos) * odds[i])
    treat_all = overall - (1.0 - overall) * odds
    return DecisionCurve(pt, model, treat_all, int(t.size), overall, float(horizon))
