"""Typed CT preprocessing config with the values of the CT fracture paper (papers/000) as defaults.

Paper: axial slices resampled to 1 x 1 mm, HU window [-200, 1000] scaled to [-1, 1], vertebral bodies
T12-L4 (discs excluded), 96 x 96 bone-only images of the body region and 96 x 144 bone+muscle boxes centred
on the vertebral body, 14 equidistant slices.
"""
from __future__ import annotations

from typing import Any, Literal

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
    muscle_crop_centre: Literal["vertebral_body", "posterior_shift"] = Field(
        "vertebral_body",
        description=(
            "vertebral_body: the 96 x 144 box centred on the body centroid (paper 000, Methods); posterior_shift: "
            "sensitivity option, the centre moved muscle_crop_shift_mm posterior so the box holds more of the "
            "erector spinae (a 96 mm AP box centred on the body cuts them in half in large patients)"
        ),
    )
    muscle_crop_shift_mm: float = Field(
        24.0, description="posterior shift of the bone+muscle box centre; used only with muscle_crop_centre=posterior_shift"
    )
    bone_input: Literal["body_masked", "window"] = Field(
        "body_masked",
        description=(
            "body_masked: the 96 x 96 bone-only crop keeps only vertebral-body pixels (paper 000: the body "
            "region extracted from its annotation, discs excluded), the rest set to pad_value; window: the plain "
            "96 x 96 window around the body centroid (option)"
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
    shard_size: int = Field(16, ge=1, description="studies per Parquet shard (manifest order; the last few smaller)")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs per shard task")
    qc_pictures: bool = Field(True, description="write a QC PNG per study (OUT/qc/) and a contact sheet of the worst")

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

    @model_validator(mode="before")
    @classmethod
    def _legacy_crops(cls, data: Any) -> Any:
        """A config resolved before `muscle_crop_centre` existed reads as the crops it produced (shift, no mask)."""
        if isinstance(data, dict) and "muscle_crop_shift_mm" in data and "muscle_crop_centre" not in data:
            data = dict(data)
            data["muscle_crop_centre"] = "posterior_shift" if data["muscle_crop_shift_mm"] else "vertebral_body"
            data.setdefault("bone_input", "window")
        return data

    @model_validator(mode="after")
    def _window_order(self) -> "CTPreprocessConfig":
        if self.window_high <= self.window_low:
            raise ValueError("window_high must be greater than window_low")
        if min(self.spacing_mm) <= 0 or min(self.bone_crop + self.muscle_crop) <= 0:
            raise ValueError("spacing and crop sizes must be positive")
        return self


XRAY_VARIANTS: tuple[str, ...] = (
    "full_l1l5", "full_l1l4", "full_l1l5_masked", "full_l1l4_masked", "patches_l1l5", "patches_l1l5_masked",
)


class XrayPreprocessConfig(StrictModel):
    """Everything `preprocess_radiograph` and the X-ray pipeline need; defaults follow papers/001.

    Paper: L1-L5 centre keypoints (HRNet), alignment so L1 and L5 always sit at the same positions, ROI with
    an external margin, min-max, 384 x 384 with zero padding; six input variants, L1-L5 patches without
    masks best. Lengths below are in units of the L1-L5 centre spacing (see raypipe/preprocess/xray.py).
    """

    variant: Literal[
        "full_l1l5", "full_l1l4", "full_l1l5_masked", "full_l1l4_masked", "patches_l1l5", "patches_l1l5_masked"
    ] = Field("patches_l1l5", description="input variant of the paper's Table 2 (default: its best)")
    out_size: int = Field(384, ge=32, description="output side in pixels (paper: 384)")
    roi_margin: float = Field(0.6, ge=0, description="full variants: spacings added above the first/below the last level")
    roi_half_width: float = Field(0.9, gt=0, description="full variants: spacings added on each side of the keypoints")
    patch_scale: float = Field(1.3, gt=0, description="patch side as a multiple of the local centre spacing")
    mask_half_height: float = Field(0.39, gt=0, description="masked variants: body half-height along the spine (spacings)")
    mask_half_depth: float = Field(0.55, gt=0, description="masked variants: body half-depth across the spine (spacings)")
    mask_exponent: float = Field(4.0, ge=2, description="superellipse exponent of the body masks (2 = ellipse)")
    minmax_per_channel: bool = Field(False, description="patches: min-max each channel (True) or the whole stack")
    apply_clahe: bool = Field(False, description="CLAHE before cropping (used by the pVF classifier, not DeepSurv)")
    clahe_clip_limit: float = Field(0.01, gt=0, le=1)
    clahe_tiles: tuple[int, int] = Field((8, 8))
    max_spacing_ratio: float = Field(2.0, gt=1, description="QC: max/min of consecutive centre spacings")
    spacing_mm_range: tuple[float, float] = Field((15.0, 60.0), description="QC: plausible mean spacing when PixelSpacing is known")
    max_tilt_deg: float = Field(60.0, gt=0, le=90, description="QC: L1->L5 direction vs image-down")
    max_lateral_deviation: float = Field(1.0, gt=0, description="QC: max distance off the L1-L5 line (spacings)")
    max_bend_deg: float = Field(45.0, gt=0, description="QC: max angle between consecutive segments")
    min_spacing_px: float = Field(4.0, ge=0, description="QC: closer centres count as collapsed")
    keypoint_model_path: str | None = Field(None, description="state_dict of a keypoint model, used when a study has no keypoints_path")
    keypoint_model_name: str = Field("keypoints_hrnet_w32", description="registry name of that model")
    keypoint_model_config: dict[str, Any] = Field(default_factory=dict, description="build_model keyword arguments")
    keypoint_input_size: int = Field(384, ge=32, description="model input side (multiple of 32 for HRNet)")
    min_keypoint_confidence: float = Field(0.1, ge=0, description="QC warning below this heatmap peak")
    shard_size: int = Field(16, ge=1, description="studies per Parquet shard (manifest order; the last few smaller)")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs per shard task")
    qc_pictures: bool = Field(True, description="write a QC PNG per study (OUT/qc/) and a contact sheet of the worst")

    @field_validator("keypoint_input_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError("keypoint_input_size must be a multiple of 32 (HRNet)")
        return v

    def check_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `raypipe.preprocess.xray.check_keypoints`."""
        return {
            "max_spacing_ratio": self.max_spacing_ratio, "spacing_mm_range": self.spacing_mm_range,
            "max_tilt_deg": self.max_tilt_deg, "max_lateral_deviation": self.max_lateral_deviation,
            "max_bend_deg": self.max_bend_deg, "min_spacing_px": self.min_spacing_px,
        }

    def mask_kwargs(self) -> dict[str, float]:
        """Keyword arguments of `raypipe.preprocess.xray.body_mask_at`."""
        return {"half_height": self.mask_half_height, "half_depth": self.mask_half_depth,
                "exponent": self.mask_exponent}

    def channels(self) -> int:
        """Image channels of the variant: 5 patches or 1 full image."""
        return 5 if self.variant.startswith("patches") else 1
