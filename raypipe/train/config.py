"""Typed training configs for the CT branch, with the papers' settings as defaults.

`CTTrainConfig` is the single-task attention CNN-RNN of papers/000 (ResNeXt-50 + GRU, 14 equidistant
axial slices T12-L4 with a random start per training iteration, Adam lr 1e-5, batch 128, cross-entropy on
the 5-year vertebral fracture label, standardised clinical variables concatenated before the last layer).
`MultitaskConfig` is papers/002: the same image encoder trained jointly on cross-sectional (prevalent)
fracture detection and longitudinal prediction (Cox partial likelihood, c-index, 2/3/5-year AUROC).
"""
from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raypipe.config import StrictModel
from raypipe.models.pretrained import check_pretrained

# The clinical variables of the paper's clinical model D (age, sex, BMI, steroids, smoking, alcohol,
# secondary osteoporosis, T2DM, HIV, hepatitis C, renal failure), in the manifest's column names.
PAPER_CLINICAL_COLUMNS: tuple[str, ...] = (
    "age", "sex", "bmi", "glucocorticoid", "smoker", "alcohol", "secondary_osteoporosis",
    "t2dm", "hiv", "hcv", "renal_failure",
)

log = logging.getLogger(__name__)


class RayRunConfig(StrictModel):
    """How a task runs on Ray, shared by every task's config: workers, GPUs, failures, storage, checkpoints."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(
        False, description="request gpus_per_worker GPUs per worker (Ray waits, or the autoscaler adds GPU nodes); "
                           "false: CPU only. Never read from the cluster (`raypipe train --gpus N` / `--cpu` override)")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu (fractions share a GPU)")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra/overriding Ray resources per worker (e.g. a node-type label)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None, description="placement of the workers; default PACK (or $RAYPIPE_PLACEMENT_STRATEGY)")
    max_failures: int = Field(1, ge=-1, description="worker-failure retries, resuming from the latest checkpoint")
    num_to_keep: int = Field(2, ge=1, description="checkpoints kept: the best by `monitor`, plus the latest")
    checkpoint_every: int = Field(
        1, ge=1, description="write a checkpoint every k epochs; an improved epoch and the last one always get one")
    run_name: str = Field("train", description="Ray Train run name under the storage path (same name resumes)")
    storage_path: str | None = Field(None, description="Ray Train storage; default OUT/ray_results")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker; None: Ray's default")
    amp: bool = Field(True, description="bf16 autocast + channels_last on CUDA; ignored (fp32) on CPU")
    stop_after_epoch: int | None = Field(
        None, ge=1, description="end this run after that epoch (as if interrupted); a rerun resumes from it"
    )
    seed: int = 0
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for the CIs in metrics.json")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _gpu_null_is_cpu(cls, value: Any) -> Any:
        """`use_gpu: null` (once "discover from the cluster") now means CPU only, said in the log."""
        if value is None:
            log.warning("use_gpu: null means false (CPU only): GPUs are requested, never discovered; set use_gpu: "
                        "true (or pass --gpus N) to train on GPUs")
            return False
        return value


class InputConfig(StrictModel):
    """How a worker reads its training rows (CT and X-ray survival tasks): cached once or streamed."""

    cache_train: bool = Field(
        True, description="read the worker's training rows once (first epoch) and sample every epoch from memory; "
                          "false streams them through Ray Data every epoch (rows larger than a worker's memory)")
    prefetch_batches: int = Field(4, ge=1, description="batches prepared ahead of the training step")


class CTTrainConfig(InputConfig, RayRunConfig):
    """One CNN-RNN training run on CT shards; defaults reproduce papers/000 (bone+muscle input)."""

    # model (kwargs go to raypipe.models.registry.build_model(model, **model_kwargs))
    model: str = Field("cnn_rnn", description="registry name: cnn_rnn (ResNeXt-50 + GRU) or cnn_rnn_tiny")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder kwargs")
    display_name: str | None = Field(None, description="model name in predictions/metrics; default: model + input")
    input: Literal["bone", "bone_muscle"] = Field("bone_muscle", description="shard column: 96x96 or 96x144 crops")
    n_slices: int = Field(14, ge=1, description="equidistant axial slices per study (T12-L4)")
    use_clinical: bool = Field(False, description="concatenate standardised clinical variables to image features")
    clinical_columns: list[str] = Field(default_factory=lambda: list(PAPER_CLINICAL_COLUMNS))
    freeze_batchnorm: bool = Field(
        False, description="BatchNorm uses running statistics while training (small per-worker batches, DDP parity)"
    )
    sync_batchnorm: bool = Field(False, description="convert BatchNorm to SyncBatchNorm (multi-GPU only)")
    pretrained: Literal["imagenet", "none"] = Field("imagenet", description="imagenet: load pretrained_path (required, must exist); none: random init, stated explicitly")
    pretrained_path: str | None = Field(None, description="local ImageNet encoder weights (.pth/.safetensors); never downloaded")

    # optimisation (paper: Adam, lr 1e-5, batch 128, cross-entropy)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(128, ge=1, description="global batch; each worker takes batch_size / num_workers")
    eval_batch_size: int = Field(32, ge=1, description="per-worker batch for validation and scoring")
    epochs: int = Field(50, ge=1)
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; None disables")
    shuffle_buffer: int = Field(
        256, ge=0, description="0: no shuffling; else rows are shuffled every epoch (cached: a full permutation of "
                               "the worker's rows; streamed: a local shuffle buffer of this many rows)")
    augment_flip: float = Field(0.0, ge=0, le=1, description="training: probability of a left-right flip of a study's "
                                "slices (paper: none; the random slice start is its only augmentation)")
    augment_shift: float = Field(0.0, ge=0, lt=0.5, description="training: largest in-plane translation of a study's "
                                 "slices, as a fraction of the crop width (paper: none)")

    # labels, validation and early stopping
    label: str = Field("fracture_5y", description="binary target column; rows where it is missing are not trained on")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="patients held out for validation (when no split column)")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="patients held out for test (when no split column)")
    monitor: str = Field("val_auroc", description="validation metric for early stopping and the best checkpoint")
    monitor_mode: Literal["max", "min"] = "max"
    patience: int = Field(10, ge=1, description="epochs without improvement before stopping")
    min_delta: float = Field(0.0, ge=0)

    # Ray (the rest: RayRunConfig)
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")

    @model_validator(mode="after")
    def _check(self) -> "CTTrainConfig":
        if self.batch_size < self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is smaller than num_workers {self.num_workers}")
        if self.use_clinical and not self.clinical_columns:
            raise ValueError("use_clinical is true but clinical_columns is empty")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        check_pretrained(self.pretrained, self.pretrained_path, owner=type(self).__name__)
        return self

    @property
    def name(self) -> str:
        """The model's one name in train, cv, predictions and the report: `cnn_rnn_<input>` unless display_name."""
        return self.display_name or f"{self.family}_{self.input}"

    @property
    def family(self) -> str:
        """Model family in names (tiny and full-size variants share it)."""
        return "cnn_rnn"


class MultitaskConfig(CTTrainConfig):
    """papers/002: prevalent-fracture detection + Cox survival head (+ horizon heads) on one encoder."""

    model: str = Field("multitask", description="registry name: multitask or multitask_tiny")
    label: str = Field("fracture_5y", description="reported with the predictions; training uses time/event")
    prevalent_label: str = Field("prevalent_fracture", description="cross-sectional fracture column (0/1)")
    prevalent_weight: float = Field(1.0, ge=0, description="weight of the prevalent-fracture BCE")
    cox_weight: float = Field(1.0, ge=0, description="weight of the Cox partial likelihood")
    cox_ties: Literal["efron", "breslow"] = "efron"
    horizon_weight: float = Field(1.0, ge=0, description="weight of the horizon BCE (labels known only)")
    horizons_years: list[float] = Field(default_factory=lambda: [2.0, 3.0, 5.0])
    monitor: str = Field("val_c_index", description="early stopping on Harrell's C of the Cox head")

    @property
    def family(self) -> str:
        """Model family in names (tiny and full-size variants share it)."""
        return "multitask"

    @model_validator(mode="after")
    def _check_weights(self) -> "MultitaskConfig":
        if self.prevalent_weight + self.cox_weight + self.horizon_weight <= 0:
            raise ValueError("at least one of prevalent_weight, cox_weight, horizon_weight must be positive")
        return self
