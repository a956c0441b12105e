"""Typed configs: YAML in, validated pydantic objects out, with errors naming the file, key and expected type.

Each task owns one config class (with the papers' values as defaults); this module only loads and checks.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from raypipe.io.errors import RaypipeInputError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every raypipe config: unknown keys are typos, so they are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _ordered_positive(v: tuple[float, float]) -> tuple[float, float]:
    if v[0] <= 0 or v[0] > v[1]:
        raise ValueError(f"must be 0 < low <= high, got {v}")
    return v


# An augmentation scale range (low, high): a reversed or non-positive range is a config error, not a silent flip.
ScaleRange = Annotated[tuple[float, float], AfterValidator(_ordered_positive)]


class ConfigError(RaypipeInputError):
    """A config file that cannot be read or does not match its schema."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file, bad syntax or a non-mapping."""
    from raypipe import storage

    p = str(path)
    if not storage.is_file(p):
        raise ConfigError("config file not found", path=p)
    try:
        data = yaml.safe_load(storage.read_bytes(p).decode("utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", path=str(p)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}", path=str(p))
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `file: key.path: message (got value)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key{got_s}")
        else:
            lines.append(f"{source}: {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_config(cls: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    """Validate a mapping into `cls`, turning pydantic's error into a ConfigError naming each key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from e


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Load `cls` from a YAML file (or its defaults when `path` is None), applying dotted-key overrides."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return parse_config(cls, data, str(path) if path else "<defaults>")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested mapping (config overrides such as `raypipe train --set model_kwargs.dropout=0.1`)."""
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs (atomically)."""
    from raypipe.storage import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def config_hash(obj: Any) -> str:
    """Short stable hash (16 hex chars of SHA-256) of a config: dict, pydantic model, dataclass or plain value."""
    payload = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def jsonable(obj: Any) -> Any:
    """Canonical JSON-compatible form of `obj` (pydantic models, dataclasses, numpy, paths) for hashes and metadata."""
    if hasattr(obj, "model_dump") and callable(obj.model_dump):
        return jsonable(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [jsonable(v) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)
