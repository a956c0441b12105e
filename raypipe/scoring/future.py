"""Future radiographs (Diff-X, papers/004) without Ray: generated images per (year, seed), scored by the pVF model.

The generator itself lives in `raypipe.generate` (written separately); `FutureGenerator` only adapts it,
so a registry without an `ldm` model, or a checkout without `raypipe.generate`, disables generation with
a clear message instead of failing the app. `summarise_future` is the part that is the same whatever the
generator: BpVF, GpVF mean/SD over seeds per year and the LL/LH/HIGH risk group.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    prompt: str = ""


def summarise_future(bpvf: float, gpvf: Mapping[float, Sequence[float]], low: float = 0.5,
                     high: float = 0.6, rule: str = "horizon_mean", horizon_years: float = 10.0) -> dict[str, Any]:
    """BpVF, GpVF mean/SD over seeds per year, the image's GpVF by `rule` (thesis: the 10-year seed mean) and
    the LL/LH/HIGH group (`raypipe.generate.aggregate_scores`; `gpvf_year` says which year was scored)."""
    from raypipe.generate import aggregate_scores

    agg = aggregate_scores(bpvf, gpvf, low=low, high=high, rule=rule, horizon_years=horizon_years)
    per_year = [{"year": float(y), "gpvf_mean": v["mean"], "gpvf_sd": v["sd"], "scores": v["scores"]}
                for y, v in agg["gpvf_by_year"].items()]
    return {"bpvf": agg["bpvf"], "gpvf_mean": agg["gpvf"], "gpvf_sd": agg["uncertainty"], "gpvf_year": agg["gpvf_year"], "gpvf_rule": agg["gpvf_rule"],
            "gpvf_by_year": per_year, "risk_group": agg["group"], "thresholds": agg["thresholds"]}


@dataclass
class FutureRequest:
    """One generation request: a radiograph in [0, 1], age, sex, horizons (years), seeds, clinical attributes."""

    pixels: np.ndarray
    age: float
    sex: str
    years: Sequence[float]
    seeds: Sequence[int]
    clinical: Mapping[str, Any] = field(default_factory=dict)


class FutureGenerator:
    """Adapter over `raypipe.generate`'s Diff-X pipeline for one published `ldm` model."""

    def __init__(self, version: ModelVersion, generate_fn: Callable[[list[FutureRequest]], list[list[GeneratedImage]]]
                 ) -> None:
        self.version = version
        self.info = model_info(version)
        self._generate = generate_fn

    @classmethod
    def from_registry(cls, registry: str | Path, name: str = "ldm", version: str = "latest",
                      device: str | None = None) -> "FutureGenerator":
        """Load the Diff-X pipeline for a published model on `device` (default: CUDA when torch sees it)."""
        v = open_version(registry, name, version)
        try:
            gen = importlib.import_module("raypipe.generate")
        except ImportError as e:
            raise GeneratorUnavailable(f"Diff-X generation is not available in this build ({e})", field="ldm") from e
        return cls(v, _adapt(gen, v, device))

    def generate(self, pixels: np.ndarray, age: float, sex: str, years: Sequence[float],
                 seeds: Sequence[int], clinical: Mapping[str, Any] | None = None) -> list[GeneratedImage]:
        """One image per (year, seed) for a radiograph in [0, 1]; the prompts carry the clinical attributes
        (`raypipe.generate.CLINICAL_PROMPT_KEYS` found in `clinical`) when the model was trained with them."""
        return self._generate([FutureRequest(pixels, age, sex, list(years), list(seeds), dict(clinical or {}))])[0]

    def generate_many(self, requests: Sequence[FutureRequest]) -> list[list[GeneratedImage]]:
        """Several requests in one batched Diff-X run (one forward per step over all of them); per request its images."""
        return self._generate(list(requests)) if requests else []


def _adapt(gen: Any, version: ModelVersion, device: str | None = None
           ) -> Callable[[list[FutureRequest]], list[list[GeneratedImage]]]:
    """Bind `raypipe.generate`'s pipeline (loaded from the registry folder) to a batched call returning `GeneratedImage`s."""
    import torch

    from raypipe.preprocess.pvf import crop_ldm_content, from_ldm_output, ldm_input

    try:
        pipe = gen.pipeline_from_dir(version.path, device=device)
    except Exception as e:  # noqa: BLE001 - an incompatible model disables generation, not the app
        raise GeneratorUnavailable(f"cannot load the Diff-X pipeline ({type(e).__name__}: {e})", field="ldm") from e

    def call(requests: list[FutureRequest]) -> list[list[GeneratedImage]]:
        years = [[float(y) for y in q.years] for q in requests]
        # the training prompt: clinical attributes exactly when the model was trained with them (model_meta.json)
        prompts = [gen.future_prompts(q.age, q.sex, ys, dict(q.clinical) if pipe.clinical_prompts else None)
                   for q, ys in zip(requests, years)]
        images = torch.from_numpy(np.stack([ldm_input(q.pixels, pipe.model.image_size) for q in requests]))
        with torch.no_grad():
            outs = pipe.generate_many(images, [base for base, _ in prompts],
                                      [[per[y] for y in ys] for (_, per), ys in zip(prompts, years)],
                                      [[int(s) for s in q.seeds] for q in requests])
        result = []
        for q, ys, (_, per), out in zip(requests, years, prompts, outs):
            grey = from_ldm_output(out[:, :, 0].float().numpy())  # (years, seeds, S, S) in [0, 1]
            # cut back to the radiograph's own box in the padded square: GpVF is scored on BpVF's geometry
            result.append([GeneratedImage(y, int(s), crop_ldm_content(grey[i, j], q.pixels.shape), per[y])
                           for i, y in enumerate(ys) for j, s in enumerate(q.seeds)])
        return result

    return call
