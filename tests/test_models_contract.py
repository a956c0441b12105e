"""One contract every registered model meets, checked on its tiny variant (as sksurv's test_common)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from raypipe.models.registry import (
    build_model,
    default_config,
    example_inputs,
    flops_per_sample,
    get_spec,
    list_models,
)

TINY_MODELS = list_models(tiny=True)


def _tensors(out: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Model outputs as a name -> tensor dict, whether the model returns a tensor or a dict."""
    return dict(out) if isinstance(out, Mapping) else {"out": out}


def _build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name)


def _calibrate(model: nn.Module, inputs: dict[str, Tensor]) -> nn.Module:
    """Set BatchNorm statistics from one batch so an untrained model's eval outputs have a natural scale."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    with torch.no_grad():
        model.train()(**inputs)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def _assert_close(a: dict[str, Tensor], b: dict[str, Tensor], *, atol: float, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=rtol, msg=key)


def test_every_full_size_model_has_a_tiny_variant() -> None:
    full = {get_spec(n).task for n in list_models(tiny=False)}
    assert full == {get_spec(n).task for n in TINY_MODELS}
    assert set(list_models()) >= {
        "cnn_rnn", "cnn_rnn_tiny", "multitask", "multitask_tiny", "keypoints_hrnet_w32", "keypoints_tiny",
        "deepsurv", "deepsurv_tiny", "pvf_efficientnet_b4", "pvf_tiny",
    }  # fmt: skip


@pytest.mark.parametrize("name", TINY_MODELS)
def test_model_contract(name: str, tmp_path: Path) -> None:
    spec = get_spec(name)
    inputs = example_inputs(name, batch_size=2, seed=1)
    assert set(inputs) == {k for k, ts in spec.inputs.items() if ts.when is None or default_config(name)[ts.when]}

    # Construction is deterministic given the seed.
    model = _build(name, 0)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), _build(name, 0).state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    model = _calibrate(model, inputs)

    # Shapes, dtype, finiteness; eval-mode determinism.
    with torch.no_grad():
        ref = _tensors(model(**inputs))
        _assert_close(ref, _tensors(model(**inputs)), atol=0.0)
    for key, value in ref.items():
        assert value.dtype == torch.float32, key
        assert value.shape[0] == 2, (key, value.shape)
        assert torch.isfinite(value).all(), key
        assert value.requires_grad is False
        assert not torch.allclose(value[0], value[1]), f"{key}: output ignores the input"

    # channels_last weights and inputs give the same answer.
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl_inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in inputs.items()}
    with torch.no_grad():
        _assert_close(ref, _tensors(cl_model(**cl_inputs)), atol=1e-4, rtol=1e-4)

    # bf16 autocast on CPU runs and stays near fp32: bf16 keeps ~3 significant digits per op and a
    # random-init net amplifies rounding with depth (measured RMS: CNN-RNN 1.5%, tiny HRNet 10%).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = _tensors(model(**inputs))
    for key in ref:
        assert torch.isfinite(low[key].float()).all(), key
        rel = (low[key].float() - ref[key]).norm() / ref[key].norm()
        assert rel < 0.2, f"{key}: bf16 relative RMS error {rel:.3f}"

    # state_dict round trip through a file loaded with weights_only=True.
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = _build(name, 123).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        _assert_close(ref, _tensors(fresh(**inputs)), atol=0.0)

    # Gradients reach every parameter in a training step (on its own copy: BN statistics move).
    trainee = copy.deepcopy(model).train()
    loss = sum(v.float().square().mean() for v in _tensors(trainee(**inputs)).values())
    loss.backward()
    for pname, p in trainee.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in trainee.parameters())

    # Registry metadata: the FLOPs counter sees the convolutions and matmuls.
    assert flops_per_sample(name) > 0
