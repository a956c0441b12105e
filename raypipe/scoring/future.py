"""Future radiographs (Diff-X, papers/004) without Ray: generated images per (year, seed), scored by the pVF model.

The generator itself lives in `raypipe.generate` (written separately); `FutureGenerator` only adapts it,
so a registry without an `ldm` model, or a checkout without `raypipe.generate`, disables generation with
a clear message instead of failing the app. `summarise_future` is the part that is the same whatever the
generator: BpVF, GpVF mean/SD over seeds per year and the LL/LH/HIGH risk group.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raypipe.registry import ModelVersion, RegistryError
from raypipe.scoring.common import model_info, open_version

log = logging.getLogger(__name__)

MAX_YEARS = 20
MAX_SEEDS = 16


class GeneratorUnavailable(RegistryError):
    """The Diff-X pipeline cannot be used here (module missing or model incompatible)."""


@dataclass
class GeneratedImage:
    """One generated radiograph: horizon in years, seed, pixels in [0, 1] (rows, cols)."""

    year: float
    seed: int
    pixels: np.ndarray


def summarise_future(bpvf: float, gpvf: Mapping[float, Sequence[float]], low: float = 0.5,
                     high: float = 0.6) -> dict[str, Any]:
    """BpVF, per-year GpVF mean/SD over seeds and risk groups (papers/004 thresholds 0.5 / 0.6)."""
    from raypipe.metrics.stratification import risk_groups

    years = sorted(gpvf)
    per_year = []
    for y in years:
        s = np.asarray(gpvf[y], dtype=np.float64)
        mean = float(s.mean())
        group = str(risk_groups([bpvf], [mean], low=low, high=high)[0])
        per_year.append({"year": y, "gpvf_mean": mean, "gpvf_sd": float(s.std(ddof=1)) if s.size > 1 else 0.0,
                         "n_seeds": int(s.size), "risk_group": group})
    last = per_year[-1] if per_year else None
    return {"bpvf": float(bpvf), "gpvf": per_year,
            "gpvf_mean": None if last is None else last["gpvf_mean"],
            "gpvf_sd": None if last is None else last["gpvf_sd"],
            "risk_group": None if last is None else last["risk_group"],
            "thresholds": {"bpvf": low, "gpvf": high}}


class FutureGenerator:
    """Adapter over `raypipe.generate`'s Diff-X pipeline for one published `ldm` model."""

    def __init__(self, version: ModelVersion, generate_fn: Callable[..., list[GeneratedImage]]) -> None:
        self.version = version
        self.info = model_info(version)
        self._generate = generate_fn

    @classmethod
    def from_registry(cls, registry: str | Path, name: str = "ldm", version: str = "latest") -> "FutureGenerator":
        """Load the Diff-X pipeline for a published model; `GeneratorUnavailable` when raypipe.generate is absent."""
        v = open_version(registry, name, version)
        try:
            gen = importlib.import_module("raypipe.generate")
        except ImportError as e:
            raise GeneratorUnavailable(f"Diff-X generation is not available in this build ({e})", field="ldm") from e
        return cls(v, _adapt(gen, v))

    def generate(self, pixels: np.ndarray, age: float, sex: str, years: Sequence[float],
                 seeds: Sequence[int]) -> list[GeneratedImage]:
        """One image per (year, seed) for a radiograph in [0, 1]."""
        return self._generate(pixels=pixels, age=age, sex=sex, years=list(years), seeds=list(seeds))


def _adapt(gen: Any, version: ModelVersion) -> Callable[..., list[GeneratedImage]]:
    """Bind `raypipe.generate`'s pipeline to a call returning `GeneratedImage`s (its API is its own; we only adapt)."""
    pipe_cls = getattr(gen, "DiffXPipeline", None)
    run = getattr(gen, "generate", None)
    if pipe_cls is None or run is None:
        raise GeneratorUnavailable("raypipe.generate has no DiffXPipeline/generate", field="ldm")
    pipe = None
    for ctor in ("from_registry_version", "from_pretrained", "from_dir", "load"):
        if hasattr(pipe_cls, ctor):
            pipe = getattr(pipe_cls, ctor)(version.path)
            break
    if pipe is None:
        raise GeneratorUnavailable("cannot construct DiffXPipeline from a registry folder", field="ldm")
    params = set(inspect.signature(run).parameters)

    def call(pixels: np.ndarray, age: float, sex: str, years: list[float], seeds: list[int]) -> list[GeneratedImage]:
        kwargs = {k: v for k, v in dict(pipeline=pipe, pipe=pipe, image=pixels, age=age, sex=sex, years=years,
                                        seeds=seeds).items() if k in params}
        result = run(**kwargs)
        return [_as_generated(r) for r in result]

    return call


def _as_generated(r: Any) -> GeneratedImage:
    """Accept a GeneratedImage-like object or a dict with year/seed/image."""
    if isinstance(r, GeneratedImage):
        return r
    get = r.get if isinstance(r, Mapping) else lambda k, d=None: getattr(r, k, d)
    pixels = get("pixels", None)
    if pixels is None:
        pixels = get("image")
    return GeneratedImage(float(get("year")), int(get("seed")), np.asarray(pixels, dtype=np.float32))
