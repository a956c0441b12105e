"""The one table of model builders: name -> builder, task, inputs, default config, FLOPs.

The CLI, trainers, scoring and tests import names from here so the choices cannot drift. Entries
are plain data; :func:`build_model`, :func:`example_inputs` and :func:`flops_per_sample` read them.
Input shapes are per sample; a string dimension names a config key (``"in_chans"``), and an input
with ``when`` set is present only when that config value is truthy (``clinical`` needs
``n_clinical > 0``). Forward calls are ``model(**inputs)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from raypipe.models.cnn_rnn import CNN_RNN_TINY, AttentionCNNRNN, cnn_rnn, cnn_rnn_tiny
from raypipe.models.deepsurv import DEEPSURV_PAPER, DEEPSURV_TINY, DeepSurv, deepsurv, deepsurv_tiny
from raypipe.models.keypoints import (
    KEYPOINTS_HRNET_W32,
    KEYPOINTS_TINY,
    KeypointHeatmapNet,
    keypoints_hrnet_w32,
    keypoints_tiny,
)
from raypipe.models.multitask import MultitaskCNNRNN, multitask, multitask_tiny
from raypipe.models.pvf import PVF_B4, PVF_TINY, PVFClassifier, pvf_efficientnet_b4, pvf_tiny
from raypipe.models.ldm.model import DIFFX_SD, DIFFX_TINY, DiffXModel, diffx, diffx_tiny

__all__ = [
    "ModelSpec",
    "TensorSpec",
    "build_model",
    "default_config",
    "example_inputs",
    "flops_per_sample",
    "get_spec",
    "input_shapes",
    "list_models",
    "register_model",
]


@dataclass(frozen=True)
class TensorSpec:
    """Per-sample input shape (ints or config keys); present only when ``config[when]`` is truthy."""

    shape: tuple[int | str, ...]
    when: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its builder, the class it returns and the preset the builder applies."""

    name: str
    builder: Callable[..., nn.Module]
    model_class: type[nn.Module]
    task: str
    inputs: Mapping[str, TensorSpec]
    output: str
    preset: Mapping[str, Any] = field(default_factory=dict)
    tiny: bool = False
    paper: str = ""


_CT = {"x": TensorSpec((14, "in_chans", 96, 96)), "clinical": TensorSpec(("n_clinical",), when="n_clinical")}
_CT_OUT = "logits (B,) or (B, n_classes)"
_MT_OUT = "dict: prevalent_logit (B,), log_risk (B,), risk_logits (B, len(horizons_years))"
_DS_IN = {
    "x": TensorSpec(("in_chans", 384, 384), when="backbone"),
    "clinical": TensorSpec(("n_clinical",), when="n_clinical"),
}
_DS_IN_TINY = {**_DS_IN, "x": TensorSpec(("in_chans", 64, 64), when="backbone")}

_SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("cnn_rnn", cnn_rnn, AttentionCNNRNN, "ct_fracture", _CT, _CT_OUT, paper="000"),
        ModelSpec(
            "cnn_rnn_tiny", cnn_rnn_tiny, AttentionCNNRNN, "ct_fracture", _CT, _CT_OUT, CNN_RNN_TINY, True, "000"
        ),
        ModelSpec("multitask", multitask, MultitaskCNNRNN, "ct_multitask", _CT, _MT_OUT, paper="002"),
        ModelSpec(
            "multitask_tiny", multitask_tiny, MultitaskCNNRNN, "ct_multitask", _CT, _MT_OUT, CNN_RNN_TINY, True, "002"
        ),
        ModelSpec(
            "keypoints_hrnet_w32",
            keypoints_hrnet_w32,
            KeypointHeatmapNet,
            "xray_keypoints",
            {"x": TensorSpec(("in_chans", 384, 384))},
            "heatmaps (B, 5, H/4, W/4)",
            KEYPOINTS_HRNET_W32,
            paper="001",
        ),
        ModelSpec(
            "keypoints_tiny",
            keypoints_tiny,
            KeypointHeatmapNet,
            "xray_keypoints",
            {"x": TensorSpec(("in_chans", 64, 64))},
            "heatmaps (B, 5, H/4, W/4)",
            KEYPOINTS_TINY,
            True,
            "001",
        ),
        ModelSpec("deepsurv", deepsurv, DeepSurv, "xray_survival", _DS_IN, "log_risk (B,)", DEEPSURV_PAPER, paper="001"),
        ModelSpec(
            "deepsurv_tiny",
            deepsurv_tiny,
            DeepSurv,
            "xray_survival",
            _DS_IN_TINY,
            "log_risk (B,)",
            DEEPSURV_TINY,
            True,
            "001",
        ),
        ModelSpec(
            "pvf_efficientnet_b4",
            pvf_efficientnet_b4,
            PVFClassifier,
            "xray_pvf",
            {"x": TensorSpec(("in_chans", 1024, 512))},
            "logits (B,); sigmoid = pVF score",
            PVF_B4,
            paper="004",
        ),
        ModelSpec(
            "pvf_tiny",
            pvf_tiny,
            PVFClassifier,
            "xray_pvf",
            {"x": TensorSpec(("in_chans", 128, 64))},
            "logits (B,); sigmoid = pVF score",
            PVF_TINY,
            True,
            "004",
        ),
        # Diff-X (papers/004): VAE + structure LDM + prompt LDM + text encoder in one state_dict; forward is a
        # smoke pass through every part (reconstruction and both UNets' noise predictions at t = 500).
        ModelSpec(
            "diffx",
            diffx,
            DiffXModel,
            "xray_diffx",
            {"x": TensorSpec((1, 512, 512))},
            "dict: reconstruction (B, 1, H, W), structure_eps and prompt_eps (B, 4, H/8, W/8)",
            DIFFX_SD,
            paper="004",
        ),
        ModelSpec(
            "diffx_tiny",
            diffx_tiny,
            DiffXModel,
            "xray_diffx",
            {"x": TensorSpec((1, 64, 64))},
            "dict: reconstruction (B, 1, H, W), structure_eps and prompt_eps (B, 4, H/8, W/8)",
            DIFFX_TINY,
            True,
            "004",
        ),
    )
}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model (e.g. the diffusion models) to the registry; names are unique."""
    if spec.name in _SPECS:
        raise ValueError(f"model {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def list_models(task: str | None = None, *, tiny: bool | None = None) -> list[str]:
    """Registered names, optionally only one task's and only tiny (or only full-size) variants."""
    return sorted(
        n for n, s in _SPECS.items() if (task is None or s.task == task) and (tiny is None or s.tiny == tiny)
    )


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, with the known names in the error when absent."""
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {list_models()}") from None


def default_config(name: str) -> Mapping[str, Any]:
    """Constructor keyword defaults of the model class with the builder's preset applied."""
    spec = get_spec(name)
    params = inspect.signature(spec.model_class.__init__).parameters.values()
    base = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    return MappingProxyType({**base, **spec.preset})


def build_model(name: str, **cfg: Any) -> nn.Module:
    """Build a registered model; ``cfg`` overrides its defaults (unknown keys raise TypeError)."""
    return get_spec(name).builder(**cfg)


def input_shapes(name: str, **cfg: Any) -> dict[str, tuple[int, ...]]:
    """Per-sample input shapes of ``name`` under ``cfg``, with config keys resolved."""
    spec = get_spec(name)
    conf = {**default_config(name), **cfg}
    shapes = {}
    for key, ts in spec.inputs.items():
        if ts.when is not None and not conf.get(ts.when):
            continue
        shapes[key] = tuple(int(conf[d]) if isinstance(d, str) else d for d in ts.shape)
    return shapes


def example_inputs(
    name: str,
    batch_size: int = 2,
    *,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    **cfg: Any,
) -> dict[str, Tensor]:
    """Seeded random inputs for ``model(**inputs)``; ``shapes`` overrides per-sample shapes (e.g. 96x144)."""
    resolved = {**input_shapes(name, **cfg), **(shapes or {})}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn((batch_size, *s), generator=gen) for k, s in resolved.items()}


def flops_per_sample(name: str, *, shapes: Mapping[str, tuple[int, ...]] | None = None, **cfg: Any) -> int:
    """Forward FLOPs for one sample, counted by ``torch.utils.flop_counter`` (matmul/conv; 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, **cfg).eval()
    inputs = example_inputs(name, 1, shapes=shapes, **cfg)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return int(counter.get_total_flops())
