"""Typed CT preprocessing config with the values of the CT fracture paper (papers/000) as defaults.

Paper: axial slices resampled to 1 x 1 mm, HU window [-200, 1000] scaled to [-1, 1], vertebral bodies
T12-L4 (discs excluded), 96 x 96 bone-only and 96 x 144 bone+muscle crops, 14 equidistant slices.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raypipe.config import StrictModel

LEVEL_ORDER: tuple[str, ...] = (
    "C1", "C2", "C3", "C4", "C5", "C6", "C7",
    "T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12",
    "L1", "L2", "L3", "L4", "L5", "L6",
)


class CTPreprocessConfig(StrictModel):
    """Everything `preprocess_ct_study` and the CT pipeline need; defaults reproduce the paper."""

    window_low: float = Field(-200.0, description="HU mapped to -1")
    window_high: float = Field(1000.0, description="HU mapped to +1")
    spacing_mm: tuple[float, float] = Field((1.0, 1.0), description="in-plane (row, col) target spacing")
    bone_crop: tuple[int, int] = Field((96, 96), description="bone-only crop (rows AP, cols LR) in pixels")
    muscle_crop: tuple[int, int] = Field((96, 144), description="bone+muscle crop (rows AP, cols LR)")
    muscle_crop_shift_mm: float = Field(
        24.0,
        description=(
            "posterior shift of the bone+muscle crop centre from the body centroid; the paper centres the "
            "box on the body, but a 96 mm AP box centred there cuts the erector spinae in half, so by "
            "default it spans from ~24 mm anterior to ~72 mm posterior of the body centroid (0 = paper literal)"
        ),
    )
    levels: tuple[str, ...] = Field(("T12", "L1", "L2", "L3", "L4"), description="contiguous levels, top first")
    n_slices: int = Field(14, ge=1, description="slices sampled per study for the model")
    body_rule: Literal["auto", "mask", "geometric"] = Field(
        "auto",
        description="auto: body mask when given, else geometric; mask: require a body mask; geometric: always",
    )
    geometric_fraction: float = Field(
        0.5, gt=0, le=1, description="fallback geometric rule: body = anterior fraction of the vertebra's AP extent"
    )
    min_vertebra_ml: float = Field(5.0, ge=0, description="smaller vertebra masks count as missing (slivers)")
    pad_value: float = Field(-1.0, description="value (after windowing) for crop pixels outside the field of view")
    shard_size: int = Field(16, ge=1, description="studies per Parquet shard (manifest order)")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs per shard task")

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one level is needed")
        bad = [x for x in v if x not in LEVEL_ORDER]
        if bad:
            raise ValueError(f"unknown vertebral levels {bad}; expected names like T12, L1")
        idx = [LEVEL_ORDER.index(x) for x in v]
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise ValueError(f"levels must be contiguous and ordered top to bottom, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _window_order(self) -> "CTPreprocessConfig":
        if self.window_high <= self.window_low:
            raise ValueError("window_high must be greater than window_low")
        if min(self.spacing_mm) <= 0 or min(self.bone_crop + self.muscle_crop) <= 0:
            raise ValueError("spacing and crop sizes must be positive")
        return self
