"""The one output format of every benchmark: one JSON line per figure, `{"name", "value", "unit"}`.

Ratios use the unit ``x``. Lines go to stdout (logs go to stderr), so `python bench/X.py | grep '^{'`
collects a run's figures; `parse_figures` reads them back (tests, `bench/gpu_check.sh`).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO

__all__ = ["FIGURE_KEYS", "figure", "parse_figures", "ratio"]

FIGURE_KEYS = ("name", "value", "unit")


def figure(name: str, value: float | int | None, unit: str, stream: TextIO | None = None, digits: int = 4,
           **extra: Any) -> dict[str, Any]:
    """Print one figure as a JSON line (None or non-finite values become null) and return it."""
    if not name or not unit:
        raise ValueError(f"a figure needs a name and a unit, got name={name!r} unit={unit!r}")
    v: float | int | None = None
    if value is not None and math.isfinite(float(value)):
        v = value if isinstance(value, int) and not isinstance(value, bool) else round(float(value), digits)
    line = {"name": name, "value": v, "unit": unit, **extra}
    print(json.dumps(line), file=stream or sys.stdout, flush=True)
    return line


def ratio(name: str, numerator: float, denominator: float, stream: TextIO | None = None, **extra: Any) -> dict[str, Any]:
    """Print numerator / denominator as a figure with unit ``x`` (null when the denominator is 0)."""
    value = float(numerator) / float(denominator) if denominator else None
    return figure(name, value, "x", stream=stream, digits=3, **extra)


def parse_figures(text: str) -> list[dict[str, Any]]:
    """The figures among the lines of `text` (lines starting with ``{``); raises on a malformed figure line."""
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        missing = [k for k in FIGURE_KEYS if k not in obj]
        if missing:
            raise ValueError(f"line {i} is not a figure (missing {missing}): {line[:200]}")
        if not isinstance(obj["name"], str) or not isinstance(obj["unit"], str):
            raise ValueError(f"line {i}: name and unit must be strings: {line[:200]}")
        if obj["value"] is not None and not isinstance(obj["value"], (int, float)):
            raise ValueError(f"line {i}: value must be a number or null: {line[:200]}")
        out.append(obj)
    return out
