"""Typed training configs for the X-ray branch (papers/001), with the paper's settings as defaults.

`KeypointTrainConfig`: HRNet-W32 heatmaps of the L1-L5 body centres; inputs min-max normalised and
zero padded to a 384 x 384 square; random rotation, scale and flip; Adam 1e-3 decaying to 1e-5 over 200
epochs; OKS-based AP on the validation radiographs every epoch.
`DeepSurvConfig`: DeepSurv (CNN image branch + clinical variables -> log-risk) trained on the X-ray shards
with the negative Cox partial likelihood (Efron ties) over the global batch; clinical models 1/2/3; the
training set split 5:1 by patient for early stopping on the validation C-index. pycox heads
(LogisticHazard, DeepHit, CoxTime) on the same encoder are selectable for comparison.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raypipe.config import ScaleRange
from raypipe.models.pretrained import check_pretrained
from raypipe.train.config import InputConfig, RayRunConfig

# Paper 001: model 1 = age + sex, model 2 = + BMI, model 3 = + glucocorticoids + secondary osteoporosis.
CLINICAL_MODELS: dict[int, tuple[str, ...]] = {
    1: ("age", "sex"),
    2: ("age", "sex", "bmi"),
    3: ("age", "sex", "bmi", "glucocorticoid", "secondary_osteoporosis"),
}
# Model names of the paper's comparisons: DeepSurv with images (+ clinical model k), without images, image only.
VARIANT_TAGS: dict[str, str] = {"image": "imgonly", "clinical": "noimg", "image_clinical": "img"}


class KeypointTrainConfig(RayRunConfig):
    """L1-L5 centre detection (papers/001): HRNet heatmaps (spatial-softmax CE by default), OKS-AP on held-out radiographs."""

    model: str = Field("keypoints_hrnet_w32", description="registry name: keypoints_hrnet_w32 or keypoints_tiny")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    display_name: str | None = None
    pretrained: Literal["imagenet", "none"] = Field("imagenet", description="imagenet: load pretrained_path (required, must exist); none: random init, stated explicitly")
    pretrained_path: str | None = Field(None, description="local ImageNet HRNet-W32 weights (timm layout, .pth/.safetensors)")
    input_size: int = Field(384, ge=32, description="square input side (multiple of 32): min-max, zero padded")
    heatmap_sigma: float = Field(2.0, gt=0, description="Gaussian target sigma in heatmap pixels (stride 4)")
    heatmap_kind: Literal["gaussian", "softmax"] = Field(
        "softmax", description="softmax: spatial cross-entropy (learns from random init in far fewer steps); gaussian: heatmap MSE (HRNet reference)"
    )
    rotation_deg: float = Field(15.0, ge=0, description="augmentation: rotation drawn from U(-r, r)")
    scale_range: ScaleRange = Field((0.85, 1.15), description="augmentation: isotropic scale range")
    flip_prob: float = Field(0.5, ge=0, le=1, description="augmentation: horizontal flip probability")
    translate_frac: float = Field(0.05, ge=0, description="augmentation: shift up to this fraction of the side")
    lr: float = Field(1e-3, gt=0, description="Adam initial learning rate (paper 1e-3)")
    lr_min: float = Field(1e-5, gt=0, description="final learning rate (paper 1e-5)")
    lr_schedule: Literal["cosine", "step"] = Field("cosine", description="decay from lr to lr_min over the epochs")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1, description="global batch")
    epochs: int = Field(200, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke runs)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="patients held out (manifest `train` rows)")
    oks_sigma: float = Field(0.1, gt=0, description="OKS per-keypoint sigma (COCO convention) for all 5 centres")
    monitor: str = Field("val_oks_ap", description="early stopping / best checkpoint metric")
    patience: int = Field(50, ge=1)
    eval_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "KeypointTrainConfig":
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 (HRNet), got {self.input_size}")
        if self.lr_min > self.lr:
            raise ValueError("lr_min must not exceed lr")
        check_pretrained(self.pretrained, self.pretrained_path, owner=type(self).__name__)
        return self

    @property
    def name(self) -> str:
        """Model name written to predictions and metrics."""
        return self.display_name or self.model


class DeepSurvConfig(InputConfig, RayRunConfig):
    """DeepSurv on X-ray shards (papers/001); `variant` and `clinical_model` pick the paper's comparisons."""

    model: str = Field("deepsurv", description="registry name: deepsurv or deepsurv_tiny")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="builder kwargs (backbone, hidden_sizes...)")
    display_name: str | None = Field(None, description="default: deepsurv_img_m{k}, deepsurv_noimg_m{k}, deepsurv_imgonly")
    pretrained: Literal["imagenet", "none"] = Field("imagenet", description="imagenet: load pretrained_path (image variants); none: random init, stated explicitly")
    pretrained_path: str | None = Field(None, description="local ImageNet ResNet weights (.pth/.safetensors); never downloaded")
    variant: Literal["image", "clinical", "image_clinical"] = "image_clinical"
    clinical_model: Literal[1, 2, 3] = Field(3, description="paper's clinical model 1, 2 or 3")
    clinical_columns: list[str] | None = Field(None, description="overrides the clinical model's columns")
    image_size: int | None = Field(None, ge=16, description="resize the shard images (384) on the fly; None keeps them")

    head: Literal["cox", "logistic_hazard", "deephit", "coxtime"] = Field(
        "cox", description="cox: DeepSurv (paper); others: pycox heads on the same encoder, for comparison"
    )
    ties: Literal["efron", "breslow"] = Field("efron", description="Cox partial likelihood tie handling")
    num_durations: int = Field(20, ge=2, description="discrete-time grid (LogisticHazard, DeepHit)")
    deephit_alpha: float = Field(0.2, ge=0, le=1, description="DeepHit: weight of the likelihood vs the rank loss")
    deephit_sigma: float = Field(0.1, gt=0, description="DeepHit rank-loss scale")
    coxtime_shrink: float = Field(0.0, ge=0, description="CoxTime/CoxCC penalty on the outputs")

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=2, description="global batch: the Cox risk sets span it (gathered over workers)")
    eval_batch_size: int = Field(64, ge=1)
    epochs: int = Field(100, ge=1)
    grad_clip: float | None = Field(5.0, gt=0)
    shuffle_buffer: int = Field(256, ge=0)
    augment_flip: float = Field(0.0, ge=0, le=1, description="training: probability of a left-right flip of a study's "
                                "L1-L5 input (paper: not stated)")
    augment_shift: float = Field(0.0, ge=0, lt=0.5, description="training: largest translation of the input, as a "
                                 "fraction of its side (paper: not stated)")
    freeze_batchnorm: bool = False

    label: str = Field("fracture_5y", description="binary label reported with the predictions")
    val_fraction: float = Field(1 / 6, gt=0, lt=1, description="paper: the training set split 5:1 (by patient)")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="patients held out for test when no split column")
    monitor: str = Field("val_c_index", description="early stopping on the validation Harrell C")
    monitor_mode: Literal["max", "min"] = "max"
    patience: int = Field(10, ge=1)
    min_delta: float = Field(0.0, ge=0)
    horizon_years: float = Field(5.0, gt=0, description="risk horizon of the scorer (5-year risk)")
    survival_years: list[float] = Field(default_factory=lambda: [float(y) for y in range(1, 11)])

    @model_validator(mode="after")
    def _check(self) -> "DeepSurvConfig":
        if self.batch_size < self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than num_workers {self.num_workers}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.uses_image:  # the clinical-only variant has no encoder to initialise
            check_pretrained(self.pretrained, self.pretrained_path, owner=type(self).__name__)
        return self

    @property
    def uses_image(self) -> bool:
        """Whether the model has an image branch."""
        return self.variant in ("image", "image_clinical")

    @property
    def clinical(self) -> list[str]:
        """Clinical columns fed to the model (empty for image-only)."""
        if self.variant == "image":
            return []
        return list(self.clinical_columns) if self.clinical_columns is not None else list(CLINICAL_MODELS[self.clinical_model])

    @property
    def name(self) -> str:
        """Model name written to predictions, e.g. `deepsurv_img_m1` as in the paper's comparisons."""
        if self.display_name:
            return self.display_name
        base = f"deepsurv_{VARIANT_TAGS[self.variant]}"
        if self.variant != "image":
            base += f"_m{self.clinical_model}"
        return base if self.head == "cox" else f"{base}_{self.head}"
