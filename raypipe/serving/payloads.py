"""Untrusted form values made safe: bounded JSON, integer lists, clinical numbers, finite responses.

Pure functions (no Ray, no FastAPI). Every rejection is an `UploadError` naming the field, so no
hostile value (deep nesting, 5000-digit integers, 1e999, lone surrogates, NaN) can reach code that
would raise something else and answer 500.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from raypipe.serving.uploads import UploadError

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 8
MAX_JSON_STRING = 4096
MAX_JSON_INT = 2 ** 53  # exact in float64; anything larger is not a measurement
MAX_CLINICAL_ABS = 1e6  # a clinical number beyond this is a typo or an attack, never a patient
_DIGITS = re.compile(r"[0-9]{1,12}")


def _bad_number(text: str) -> Any:
    raise ValueError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is not allowed")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        _bad_number(text)
    value = int(text)
    if abs(value) > MAX_JSON_INT:
        _bad_number(text)
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _bad_number(text)
    return value


def is_text_safe(s: str) -> bool:
    """True when a string encodes to UTF-8 (no lone surrogates) and has no NUL."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in s


def _check_tree(value: Any, field: str, max_depth: int) -> None:
    """Walk a decoded JSON value: bounded depth and string length, text that encodes (iterative, no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            raise UploadError(400, field, f"JSON nested deeper than {max_depth} levels")
        if isinstance(v, str):
            if len(v) > MAX_JSON_STRING or not is_text_safe(v):
                raise UploadError(400, field, "JSON string too long or not valid text (lone surrogate or NUL)")
        elif isinstance(v, dict):
            for k, item in v.items():
                if len(k) > MAX_JSON_STRING or not is_text_safe(k):
                    raise UploadError(400, field, "JSON key too long or not valid text (lone surrogate or NUL)")
                stack.append((item, depth + 1))
        elif isinstance(v, list):
            stack.extend((item, depth + 1) for item in v)


def loads_bounded(raw: bytes | str, field: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode untrusted JSON: strict UTF-8, <= 1 MiB, depth <= max_depth, finite numbers, integers <= 2**53."""
    if len(raw) > MAX_JSON_BYTES:
        raise UploadError(413, field, f"JSON larger than {MAX_JSON_BYTES} bytes")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not is_text_safe(text):
            raise UploadError(400, field, "JSON text is not valid UTF-8 (lone surrogate or NUL)")
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_bad_number)
    except UploadError:
        raise
    except RecursionError:
        raise UploadError(400, field, f"JSON nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise UploadError(400, field, "JSON is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise UploadError(400, field, f"invalid JSON ({e.msg} at position {e.pos})") from None
    except (ValueError, OverflowError) as e:
        raise UploadError(400, field, f"invalid JSON value ({str(e)[:60]})") from None
    _check_tree(value, field, max_depth)
    return value


def int_list(text: Any, field: str, lo: int, hi: int, max_len: int) -> list[int]:
    """`1,5,10` or `[1, 5, 10]` -> integers in [lo, hi] (ASCII digits only); 400 when unparsable, 422 out of range."""
    if not isinstance(text, str):
        raise UploadError(400, field, f"{field} must be text")
    s = text.strip()
    if len(s) > 512:
        raise UploadError(413, field, f"{field} longer than 512 characters")
    if s.startswith("["):
        parsed = loads_bounded(s, field, max_depth=2)
        if not isinstance(parsed, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in parsed):
            raise UploadError(400, field, f"{field} must be a list of integers")
        vals = list(parsed)
    else:
        parts = [p.strip() for p in s.split(",") if p.strip()]
        if any(not _DIGITS.fullmatch(p.lstrip("-")) for p in parts):
            raise UploadError(400, field, f"{field} must be comma-separated integers")
        vals = [int(p) for p in parts]
    if not vals or len(vals) > max_len or any(not lo <= x <= hi for x in vals):
        raise UploadError(422, field, f"{field} must hold 1..{max_len} integers in [{lo}, {hi}]")
    return vals


def check_clinical_ranges(clinical: dict[str, Any]) -> dict[str, Any]:
    """Refuse clinical keys that are not plain text and numbers too large to be measurements (422)."""
    for k, v in clinical.items():
        if not is_text_safe(k) or not k.isprintable():
            raise UploadError(400, "clinical", "clinical keys must be printable text")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not abs(v) <= MAX_CLINICAL_ABS:
            raise UploadError(422, f"clinical.{k}", f"clinical.{k} is outside +-{MAX_CLINICAL_ABS:g}")
        if isinstance(v, str) and (len(v) > 256 or not is_text_safe(v)):
            raise UploadError(400, f"clinical.{k}", f"clinical.{k} must be short text")
    return clinical


def first_non_finite(value: Any, path: str = "") -> str | None:
    """Path of the first NaN/inf float in a response body (None when all numbers are finite)."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return p or "(root)"
        if isinstance(v, dict):
            stack.extend((item, f"{p}.{k}" if p else str(k)) for k, item in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((item, f"{p}[{i}]") for i, item in enumerate(v))
    return None
