"""The run artifact: what a trained model needs to be rebuilt and fed exactly as in training.

Every trainer writes one `model_meta.json` through `write_artifact`; scoring, generation, Grad-CAM and
`publish` read it through `read_artifact` / `RunArtifact.model_validate`. The common fields are typed
(builder and kwargs for `raypipe.models.registry.build_model`, the clinical standardisation, the
preprocessing settings, label names, config hash, model selection); task-specific settings (the CT input
column and slice count, the DeepSurv head and baseline, the Diff-X sampler) stay as further top-level keys
so the file remains one flat JSON object that older readers understand.
"""
from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raypipe.clinical import ClinicalEncoder
from raypipe.io.errors import RaypipeInputError

ARTIFACT_FILE = "model_meta.json"

# Keyword arguments that point at files on the training machine; the saved state_dict replaces them.
TRAINING_ONLY_KWARGS = ("pretrained_path",)
# Keyword arguments naming a file or folder of the model folder itself (relative paths, e.g. the CLIP tokenizer a
# Stable Diffusion fine-tune carries); `inference_kwargs(folder)` resolves them against the folder being loaded.
MODEL_FILE_KWARGS = ("tokenizer_path",)


class ArtifactError(RaypipeInputError):
    """A model_meta.json that is missing, unreadable or lacks a required field."""


class RunArtifact(BaseModel):
    """Typed `model_meta.json` (see module doc); unknown keys are the task's own settings."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    builder: str = Field(..., description="raypipe.models.registry builder name")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="builder keyword arguments")
    task: str = Field("", description="model kind of the builder (ct_fracture, xray_survival, pvf, ldm, ...)")
    train_task: str | None = Field(None, description="raypipe.tasks name that trained it (cnn-rnn, deepsurv, ...)")
    display_name: str = Field("", description="model name in predictions, metrics and the report")
    clinical: dict[str, list] = Field(default_factory=lambda: ClinicalEncoder().to_dict(),
                                      description="ClinicalEncoder block: columns, training means and SDs")
    preprocess: dict[str, Any] = Field(default_factory=dict, description="input settings the scorer must repeat")
    labels: list[str] = Field(default_factory=list, description="label columns the model was trained on")
    score_kind: str | None = Field(None, description="probability | log_risk")
    config_hash: str = ""
    best_epoch: int | None = None
    monitor: str | None = None
    best_value: float | None = None
    epochs_run: int = 0
    files: list[str] = Field(default_factory=list, description="further files of the model folder the model needs "
                                                               "(relative paths, e.g. tokenizer/vocab.json); publish copies them")

    def encoder(self) -> ClinicalEncoder:
        """The clinical encoder fitted on the training rows (empty when the model takes no clinical input)."""
        return ClinicalEncoder.from_dict(self.clinical)

    def inference_kwargs(self, folder: str | None = None) -> dict[str, Any]:
        """Builder kwargs without those that only matter in training (local pretrained-weight paths); relative
        paths of files the model folder carries (`MODEL_FILE_KWARGS`) resolved against `folder` when given."""
        out = {k: v for k, v in self.kwargs.items() if k not in TRAINING_ONLY_KWARGS}
        for k in MODEL_FILE_KWARGS:
            v = out.get(k)
            if folder is not None and isinstance(v, str) and v and not os.path.isabs(v) and "://" not in v:
                out[k] = os.path.join(folder, v)
        return out

    def setting(self, key: str, default: Any = None) -> Any:
        """A field or task-specific setting by name (e.g. "input", "n_slices", "sampler")."""
        if key in type(self).model_fields:
            return getattr(self, key)
        return (self.model_extra or {}).get(key, default)

    def as_dict(self) -> dict[str, Any]:
        """The flat JSON object written to model_meta.json."""
        return self.model_dump(mode="json")


def artifact_from_dict(data: Any, source: str = ARTIFACT_FILE) -> RunArtifact:
    """Validate a decoded model_meta.json, naming the file and field on error."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ArtifactError("model_meta.json must hold a JSON object", path=source)
    try:
        return RunArtifact.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"invalid model_meta.json: {field}: {first['msg']}", path=source, field=field) from exc


def write_artifact(out_dir: str, artifact: RunArtifact) -> str:
    """Write OUT/model_meta.json atomically; returns its path."""
    from raypipe import storage

    path = storage.join(out_dir, ARTIFACT_FILE)
    storage.atomic_write_json(path, artifact.as_dict())
    return path


def read_artifact(run_dir: str) -> RunArtifact:
    """Read and validate RUN/model_meta.json (local path or URI)."""
    from raypipe import storage

    path = storage.join(run_dir, ARTIFACT_FILE)
    if not storage.exists(path):
        raise ArtifactError("model_meta.json not found: is this a raypipe run folder?", path=path)
    try:
        data = json.loads(storage.read_bytes(path).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model_meta.json is not valid JSON: {exc}", path=path) from exc
    return artifact_from_dict(data, path)
