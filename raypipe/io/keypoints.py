"""L1-L5 vertebral-body centre keypoints of a lateral radiograph, as JSON.

Format (docs/CONTRACTS.md): `{"L1": [x, y], ..., "L5": [x, y], "confidence": {"L1": c, ...}}` in pixels
of the original image, x = column, y = row; `confidence` is optional (model-predicted keypoints).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from raypipe import storage
from raypipe.io.errors import KeypointsError

PathLike = str | os.PathLike[str]
LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")


class Keypoints(NamedTuple):
    """`xy` float64 (5, 2) rows L1..L5 as (x, y); `confidence` (5,) or None when the file has none."""

    xy: np.ndarray
    confidence: np.ndarray | None


@storage.localized("path")
def read_keypoints(path: PathLike) -> Keypoints:
    """Read and validate a keypoints JSON; every problem names the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise KeypointsError(p, "no such keypoints file" if not p.exists() else "expected a JSON file")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeypointsError(p, f"invalid JSON: {exc}") from exc
    return parse_keypoints(data, p)


def parse_keypoints(data: Any, where: PathLike = "<keypoints>") -> Keypoints:
    """Validate already-parsed keypoints JSON (e.g. from an HTTP request): all of L1-L5, finite numbers."""
    if not isinstance(data, Mapping):
        raise KeypointsError(where, f"expected a JSON object with keys {', '.join(LEVELS)}")
    missing = [level for level in LEVELS if level not in data]
    if missing:
        raise KeypointsError(where, f"missing keypoints: {', '.join(missing)}", field=missing[0])
    xy = np.empty((len(LEVELS), 2), dtype=np.float64)
    for i, level in enumerate(LEVELS):
        value = data[level]
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
            raise KeypointsError(where, f"{level} must be [x, y], got {value!r}", field=level, value=value)
        for j, coord in enumerate(value):
            xy[i, j] = _finite(coord, where, level, value)
    confidence = None
    if data.get("confidence") is not None:
        conf = data["confidence"]
        if not isinstance(conf, Mapping):
            raise KeypointsError(where, "confidence must be an object {level: value}", field="confidence", value=conf)
        confidence = np.array(
            [
                math.nan if conf.get(level) is None else _finite(conf[level], where, f"confidence.{level}", conf[level])
                for level in LEVELS
            ],
            dtype=np.float64,
        )
    return Keypoints(xy=xy, confidence=confidence)


def write_keypoints(
    path: PathLike, xy: np.ndarray | Sequence[Sequence[float]], confidence: Sequence[float] | None = None
) -> Path:
    """Write keypoints JSON atomically (temporary file, then rename) so readers never see half a file."""
    out = Path(path)
    arr = np.asarray(xy, dtype=np.float64)
    if arr.shape != (len(LEVELS), 2):
        raise KeypointsError(out, f"expected keypoints of shape (5, 2) for {', '.join(LEVELS)}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = LEVELS[int(np.argwhere(~np.isfinite(arr))[0][0])]
        raise KeypointsError(out, f"{bad} is not finite", field=bad)
    payload: dict[str, Any] = {level: [float(x), float(y)] for level, (x, y) in zip(LEVELS, arr, strict=True)}
    if confidence is not None:
        conf = np.asarray(confidence, dtype=np.float64)
        if conf.shape != (len(LEVELS),):
            raise KeypointsError(out, f"confidence must have 5 values, got shape {conf.shape}", field="confidence")
        payload["confidence"] = {
            level: (None if math.isnan(c) else float(c)) for level, c in zip(LEVELS, conf, strict=True)
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _finite(value: Any, where: PathLike, field: str, shown: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KeypointsError(where, f"{field} must hold numbers, got {shown!r}", field=field, value=shown)
    if not math.isfinite(value):
        raise KeypointsError(where, f"{field} is not finite: {shown!r}", field=field, value=shown)
    return float(value)
