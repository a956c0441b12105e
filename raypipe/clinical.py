"""One clinical encoder for training, batch scoring and serving, so a value is read the same way everywhere.

Clinical variables enter the image models concatenated at the last layer (papers 000 and 001), standardised
with the training rows' means and SDs. The same `ClinicalEncoder` fits those statistics in training, is
saved in the run artifact (`{"columns", "mean", "sd"}`), and encodes one patient's JSON in Serve. Values are
parsed by `clinical_value` only: sex `F`/`M` (or `female`/`male`) -> 1/0, booleans -> 0/1, finite numbers
as they are, missing (None, NaN, empty text) -> NaN, which becomes the training mean (0 after
standardisation). Anything else is an error naming the column, the row (training) and the value: a bad
sex in a manifest never silently turns into a missing value.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from raypipe.io.errors import RaypipeInputError

SEX_CODES = {"F": 1.0, "FEMALE": 1.0, "M": 0.0, "MALE": 0.0}


class ClinicalValueError(RaypipeInputError):
    """A clinical value that is not a number, a boolean, a sex code or missing."""


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(float(value)):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return value is pd.NA or value is pd.NaT


def clinical_value(name: str, value: Any, where: str = "") -> float:
    """One clinical value as a float (see module doc); `where` (e.g. "row 12") goes into the error."""
    at = f" ({where})" if where else ""
    if _is_missing(value):
        return math.nan
    if name == "sex":
        code = SEX_CODES.get(str(value).strip().upper()) if isinstance(value, str) else None
        if code is None:
            raise ClinicalValueError(f"sex must be 'F' or 'M', got {_short(value)}{at}", field=f"clinical.{name}")
        return code
    if isinstance(value, (bool, np.bool_)):
        return float(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if math.isfinite(v):
            return v
    raise ClinicalValueError(f"{name} must be a finite number, got {_short(value)}{at}", field=f"clinical.{name}")


def _short(value: Any) -> str:
    """A value for an error message, cut short (huge integers or strings never flood a log)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**18 else f"<{type(value).__name__} too large>"
    return text if len(text) <= 40 else text[:37] + "..."


def clinical_matrix(columns: Mapping[str, Sequence[Any]], names: Sequence[str],
                    row_ids: Sequence[Any] | None = None) -> np.ndarray:
    """Raw clinical variables as float64 (n, len(names)); errors name the column and the row id."""
    n = len(next(iter(columns.values()))) if columns else 0
    out = np.empty((n, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        if name not in columns:
            raise ClinicalValueError(f"clinical column {name!r} is missing", field=f"clinical.{name}")
        for i, value in enumerate(columns[name]):
            rid = row_ids[i] if row_ids is not None else i
            out[i, j] = clinical_value(name, value, f"row {rid}")
    return out


@dataclass(frozen=True)
class ClinicalEncoder:
    """Training-row means and SDs of the clinical columns; encodes rows (training) or one patient (serving)."""

    columns: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (len(self.columns) == len(self.mean) == len(self.sd)):
            raise ValueError("clinical encoder: columns, mean and sd must have the same length")

    @classmethod
    def fit(cls, columns: Mapping[str, Sequence[Any]], names: Sequence[str],
            row_ids: Sequence[Any] | None = None) -> "ClinicalEncoder":
        """Means and SDs over the given (training) rows, missing values ignored; SD 0 or undefined -> 1."""
        x = clinical_matrix(columns, names, row_ids)
        known = np.isfinite(x)
        count = known.sum(axis=0)
        total = np.where(known, x, 0.0).sum(axis=0)
        mean = np.divide(total, count, out=np.zeros(len(names)), where=count > 0)
        var = np.where(known, (x - mean) ** 2, 0.0).sum(axis=0)
        sd = np.sqrt(np.divide(var, count, out=np.ones(len(names)), where=count > 0))
        mean = np.where(np.isfinite(mean), mean, 0.0)
        sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
        return cls(tuple(names), tuple(float(v) for v in mean), tuple(float(v) for v in sd))

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> "ClinicalEncoder":
        """From a run artifact's `clinical` block ({"columns", "mean", "sd"}); empty when the model has none."""
        block = block or {}
        cols = tuple(str(c) for c in (block.get("columns") or ()))
        mean = tuple(float(v) for v in (block.get("mean") or [0.0] * len(cols)))
        sd = tuple(float(v) if float(v) > 0 else 1.0 for v in (block.get("sd") or [1.0] * len(cols)))
        return cls(cols, mean, sd)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "ClinicalEncoder":
        """From a whole model_meta.json mapping (its `clinical` block)."""
        return cls.from_dict(meta.get("clinical"))

    def to_dict(self) -> dict[str, list]:
        """The artifact's `clinical` block."""
        return {"columns": list(self.columns), "mean": list(self.mean), "sd": list(self.sd)}

    def __bool__(self) -> bool:
        return bool(self.columns)

    def transform(self, columns: Mapping[str, Sequence[Any]], row_ids: Sequence[Any] | None = None) -> np.ndarray:
        """Standardised float32 (n, k) for a batch of rows; missing values become 0 (the training mean)."""
        raw = clinical_matrix(columns, self.columns, row_ids)
        z = (raw - np.asarray(self.mean)) / np.asarray(self.sd)
        return np.nan_to_num(z, nan=0.0).astype(np.float32)

    def vector(self, clinical: Mapping[str, Any] | None) -> tuple[np.ndarray | None, list[str]]:
        """One patient's JSON -> (standardised float32 vector, or None without clinical input; missing names)."""
        if not self.columns:
            return None, []
        clinical = clinical or {}
        if not isinstance(clinical, Mapping):
            raise ClinicalValueError("clinical must be a JSON object", field="clinical")
        raw = np.array([clinical_value(c, clinical.get(c)) for c in self.columns], dtype=np.float64)
        missing = [c for c, v in zip(self.columns, raw) if not math.isfinite(v)]
        z = (raw - np.asarray(self.mean)) / np.asarray(self.sd)
        return np.nan_to_num(z, nan=0.0).astype(np.float32), missing
