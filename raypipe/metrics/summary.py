"""Collect metrics into the metrics.json schema of DESIGN.md ("Evaluation output").

`{"models": {NAME: metric_summary(...)}, "comparisons": [comparison_entry(...)]}` where each
metric is `{"value", "ci_low", "ci_high"}` and names are `auroc`, `accuracy`, `sensitivity`,
`specificity`, `ppv`, `npv`, `c_index`, `c_index_uno`, `ibs`, `td_auroc_mean`, `td_auroc@{t}`
(t in days) and `hr@{group}`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from raypipe.metrics._checks import as_1d, as_survival
from raypipe.metrics.binary import auroc_ci, binary_metrics_ci, youden_threshold
from raypipe.metrics.bootstrap import MetricCI, bootstrap_replicates, percentile_ci
from raypipe.metrics.stratification import group_hazard_ratios
from raypipe.metrics.survival import c_index_uno, concordance_ci, integrated_brier_score, td_auroc


def time_label(t: float) -> str:
    """Metric-name form of a time in days: 1825.0 -> "1825", 365.25 -> "365.25"."""
    return f"{float(t):g}"


def binary_summary(
    y: ArrayLike,
    score: ArrayLike,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    groups: ArrayLike | None = None,
    level: float = 0.95,
) -> dict[str, MetricCI]:
    """auroc, accuracy, sensitivity, specificity, ppv, npv with bootstrap CIs (Youden threshold by default).

    A Youden threshold chosen on the evaluated data is optimistic; pass one fixed on validation data.
    """
    cut = youden_threshold(y, score) if threshold is None else float(threshold)
    out = {"auroc": auroc_ci(y, score, n_boot, seed, groups=groups, level=level)}
    at = binary_metrics_ci(y, score, cut, n_boot, seed, groups=groups, level=level)
    out.update({k: getattr(at, k) for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv")})
    return out


def survival_summary(
    time: ArrayLike,
    event: ArrayLike,
    score: ArrayLike,
    *,
    time_train: ArrayLike | None = None,
    event_train: ArrayLike | None = None,
    times: ArrayLike | None = None,
    surv: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
    level: float = 0.95,
) -> dict[str, MetricCI]:
    """c_index always; with training data c_index_uno, and with `times` td_auroc@t/td_auroc_mean, with `surv` ibs.

    All CIs come from one stratified (on the event), patient-level bootstrap of the evaluated set;
    the IPCW censoring distribution stays fitted on the training data.
    """
    t, e = as_survival(time, event)
    s = as_1d(score, "score", t.size)
    out = {"c_index": concordance_ci(t, e, s, n_boot, seed, groups=groups, level=level)}
    if time_train is None or event_train is None:
        return out
    tr, er = as_survival(time_train, event_train, "time_train", "event_train")
    grid = None if times is None else np.atleast_1d(np.asarray(times, dtype=np.float64))
    surv_mat = None if surv is None else np.asarray(surv, dtype=np.float64)
    if surv_mat is not None and grid is None:
        raise ValueError("surv needs the times it is evaluated at")

    def stats(tt: np.ndarray, ee: np.ndarray, ss: np.ndarray, idx: np.ndarray) -> list[float]:
        vals = [c_index_uno(tr, er, tt, ee, ss).value]
        if grid is not None:
            auc = td_auroc(tr, er, tt, ee, ss, grid)
            vals += [*auc.values, auc.mean]
        if surv_mat is not None:
            vals.append(integrated_brier_score(tr, er, tt, ee, surv_mat[idx], grid).value)
        return vals

    index = np.arange(t.size)
    point = stats(t, e, s, index)
    reps = bootstrap_replicates(stats, (t, e, s, index), e, n_boot, seed, groups)
    names = ["c_index_uno"]
    if grid is not None:
        names += [f"td_auroc@{time_label(x)}" for x in grid] + ["td_auroc_mean"]
    if surv_mat is not None:
        names.append("ibs")
    for k, name in enumerate(names):
        out[name] = percentile_ci(point[k], reps[:, k], level)
    return out


def hazard_ratio_summary(
    groups: ArrayLike, time: ArrayLike, event: ArrayLike, reference: str | None = None, level: float = 0.95
) -> dict[str, MetricCI]:
    """`hr@{group}`: Cox hazard ratio of each risk group against the reference, Wald CI."""
    ratios = group_hazard_ratios(groups, time, event, reference, level)
    return {f"hr@{g}": MetricCI(r.value, r.ci_low, r.ci_high, level, "wald") for g, r in ratios.items()}


def metric_summary(*parts: Mapping[str, MetricCI]) -> dict[str, dict[str, float | None]]:
    """Merge metric dictionaries into one model's metrics.json entry; a name may appear only once."""
    out: dict[str, dict[str, float | None]] = {}
    for part in parts:
        for name, ci in part.items():
            if name in out:
                raise ValueError(f"metric {name!r} appears twice")
            out[name] = ci.to_dict()
    return out


def comparison_entry(a: str, b: str, metric: str, p_value: float) -> dict[str, Any]:
    """One element of metrics.json's "comparisons" list (e.g. a DeLong test of `auroc`)."""
    return {"a": a, "b": b, "metric": metric, "p_value": to_json_dict(p_value)}


def to_json_dict(result: Any) -> Any:
    """Any metric result (dataclass, dict, array, number) as JSON-safe Python objects; NaN/inf become None."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return {f.name: to_json_dict(getattr(result, f.name)) for f in dataclasses.fields(result)}
    if isinstance(result, Mapping):
        return {str(k): to_json_dict(v) for k, v in result.items()}
    if isinstance(result, np.ndarray):
        return [to_json_dict(v) for v in result.tolist()]
    if isinstance(result, (list, tuple)):
        return [to_json_dict(v) for v in result]
    if isinstance(result, np.generic):
        result = result.item()
    if isinstance(result, float):
        return result if math.isfinite(result) else None
    return result
