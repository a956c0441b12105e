"""Input validation shared by the metric functions: check once, fail with the argument's name."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def as_1d(values: ArrayLike, name: str, n: int | None = None) -> NDArray[np.float64]:
    """Return a finite float 1-D array, so every metric sees the same clean input."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = np.squeeze(arr)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {np.shape(values)}")
    try:
        arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric") from exc
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(arr)))} NaN or infinite values")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has length {arr.shape[0]}, expected {n}")
    return arr


def as_binary(values: ArrayLike, name: str, n: int | None = None) -> NDArray[np.bool_]:
    """Return a boolean array from 0/1 or bool input, rejecting anything else."""
    arr = as_1d(values, name, n)
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"{name} must contain only 0/1, found {bad.tolist()}")
    return arr.astype(bool)


def as_labels(y: ArrayLike, name: str = "y", n: int | None = None) -> NDArray[np.bool_]:
    """Binary labels with both classes present, since AUROC and friends are undefined otherwise."""
    arr = as_binary(y, name, n)
    if arr.all() or not arr.any():
        raise ValueError(f"{name} must contain both classes (0 and 1), got only {int(arr[0])}")
    return arr


def as_survival(
    time: ArrayLike, event: ArrayLike, time_name: str = "time", event_name: str = "event"
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Follow-up times (>= 0) and event indicators with at least one event."""
    t = as_1d(time, time_name)
    if np.any(t < 0):
        raise ValueError(f"{time_name} must be >= 0, found {float(t.min())}")
    e = as_binary(event, event_name, t.shape[0])
    if not e.any():
        raise ValueError(f"{event_name} has no events: survival metrics are undefined")
    return t, e


def as_groups(groups: ArrayLike | None, n: int, name: str = "groups") -> NDArray[np.int64] | None:
    """Integer codes of patient ids (any hashable values), or None when not given."""
    if groups is None:
        return None
    arr = np.asarray(groups)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be one-dimensional of length {n}, got shape {arr.shape}")
    if arr.dtype.kind == "f" and np.any(np.isnan(arr)):
        raise ValueError(f"{name} contains NaN")
    _, codes = np.unique(arr, return_inverse=True)
    return codes.astype(np.int64)


def check_level(level: float) -> float:
    """Confidence level strictly between 0 and 1."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)
