"""Grad-CAM finds what a trained classifier looks at; per-slice maps for the CNN-RNN; overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from raypipe.explain.gradcam import grad_cam, overlay
from raypipe.models.backbones import build_backbone
from raypipe.models.registry import build_model

SIZE, SQUARE = 64, 16


def _square_batch(gen: torch.Generator, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Noise images; label 1 images carry a bright SQUARE x SQUARE patch at a random place."""
    x = torch.randn(n, 1, SIZE, SIZE, generator=gen) * 0.5
    y = (torch.rand(n, generator=gen) < 0.5).float()
    corners = torch.randint(0, SIZE - SQUARE, (n, 2), generator=gen)
    for i in torch.nonzero(y).flatten().tolist():
        r, c = corners[i].tolist()
        x[i, 0, r : r + SQUARE, c : c + SQUARE] += 2.0
    return x, y, corners


def test_grad_cam_highlights_a_planted_bright_square() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    encoder = build_backbone("resnet_tiny", width=8)
    model = nn.Sequential(encoder, nn.Linear(encoder.out_channels, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        x, y, _ = _square_batch(gen, 32)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().zero_grad(set_to_none=True)
    x, y, corners = _square_batch(gen, 48)
    with torch.no_grad():
        accuracy = ((model(x).squeeze(1) > 0).float() == y).float().mean()
    assert accuracy > 0.9
    before = [p.detach().clone() for p in model.parameters()]

    cam = grad_cam(model, encoder.layer2, x)  # stride 8: 8x8 cells on a 64x64 image
    assert cam.shape == (48, SIZE, SIZE)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    area = SQUARE**2 / SIZE**2
    inside = []
    for i in torch.nonzero(y).flatten().tolist():
        r, c = corners[i].tolist()
        inside.append(float(cam[i, r : r + SQUARE, c : c + SQUARE].sum() / cam[i].sum()))
    # The square is 6% of the image; its share of the heatmap mass is several times that.
    assert np.mean(inside) > 4 * area and np.min(inside) > 2 * area
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_grad_cam_gives_per_slice_maps_for_the_cnn_rnn() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_rnn_tiny", n_clinical=2).eval()
    x = torch.randn(2, 3, 1, 96, 144)
    cam = grad_cam(model, model.gradcam_layer, x, clinical=torch.randn(2, 2))
    assert cam.shape == (2, 3, 96, 144)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    with torch.no_grad():
        frozen = [p.requires_grad_(False) for p in model.parameters()]
    assert frozen  # works for frozen (serving) models too
    cam_small = grad_cam(model, model.trunk.encoder.layer3, x, clinical=torch.randn(2, 2), output_size=(48, 72))
    assert cam_small.shape == (2, 3, 48, 72)


def test_grad_cam_on_dict_outputs_needs_a_target() -> None:
    model = build_model("multitask_tiny").eval()
    x = torch.randn(1, 2, 1, 96, 96)
    assert grad_cam(model, model.gradcam_layer, x, target="log_risk").shape == (1, 2, 96, 96)
    with pytest.raises(ValueError, match="dict output"):
        grad_cam(model, model.gradcam_layer, x)


def test_overlay_is_rgb_uint8_and_follows_the_heatmap() -> None:
    image = np.linspace(-1000, 1000, 32 * 48).reshape(32, 48)
    heat = np.zeros((32, 48))
    heat[:16] = 1.0
    rgb = overlay(image, heat, alpha=0.5)
    assert rgb.shape == (32, 48, 3) and rgb.dtype == np.uint8
    # jet maps 1 to dark red and 0 to dark blue.
    assert rgb[:16, :, 0].mean() > rgb[:16, :, 2].mean()
    assert rgb[16:, :, 2].mean() > rgb[16:, :, 0].mean()
    with pytest.raises(ValueError, match="equal shape"):
        overlay(image, heat[:10])
