"""Focused tests of the model modules: options, pretrained loading, keypoint decoding, OKS-AP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from raypipe.models.backbones import build_backbone, list_backbones, load_pretrained
from raypipe.models.cnn_rnn import cnn_rnn_tiny
from raypipe.models.deepsurv import deepsurv_tiny
from raypipe.models.keypoints import decode_heatmaps, oks_ap, render_heatmaps
from raypipe.models.multitask import multitask_tiny
from raypipe.models.pvf import pvf_tiny
from raypipe.models.registry import build_model, default_config, example_inputs, flops_per_sample, list_models


def _slices(b: int = 2, s: int = 4, h: int = 96, w: int = 96) -> torch.Tensor:
    return torch.randn(b, s, 1, h, w, generator=torch.Generator().manual_seed(0))


# --- CNN-RNN and multitask ---------------------------------------------------------------------


def test_clinical_concat_widens_the_last_layer_and_changes_the_output() -> None:
    torch.manual_seed(0)
    image_only = cnn_rnn_tiny().eval()
    with_clinical = cnn_rnn_tiny(n_clinical=3).eval()
    assert with_clinical.classifier.in_features == image_only.classifier.in_features + 3
    x = _slices()
    clinical = torch.randn(2, 3)
    with torch.no_grad():
        a = with_clinical(x, clinical)
        b = with_clinical(x, clinical + 1.0)
    assert a.shape == (2,) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="clinical"):
        with_clinical(x)
    with pytest.raises(ValueError, match="n_clinical=0"):
        image_only(x, clinical)


@pytest.mark.parametrize(("h", "w"), [(96, 96), (96, 144)])
def test_attention_map_is_per_slice_at_stride_16(h: int, w: int) -> None:
    model = cnn_rnn_tiny().eval()
    with torch.no_grad():
        logits, attn = model(_slices(2, 3, h, w), return_attention=True)
    assert logits.shape == (2,)
    assert attn.shape == (2, 3, h // 16, w // 16)
    assert float(attn.min()) >= 0.0 and float(attn.max()) <= 1.0
    _, none = cnn_rnn_tiny(attention=False).eval()(_slices(1, 2), return_attention=True)
    assert none is None


def test_cnn_rnn_options_bidirectional_multiclass_and_slice_count() -> None:
    model = cnn_rnn_tiny(bidirectional=True, num_layers=2, n_classes=3, hidden_size=8).eval()
    assert model.trunk.out_features == 16 and model.classifier.in_features == 16
    with torch.no_grad():
        assert model(_slices(2, 14)).shape == (2, 3)
        assert model(_slices(2, 5)).shape == (2, 3)  # the GRU takes any number of slices
    with pytest.raises(ValueError, match="B, S, C, H, W"):
        model(torch.randn(2, 1, 96, 96))


def test_multitask_heads_and_horizons() -> None:
    model = multitask_tiny(n_clinical=2, horizons_years=(1, 5)).eval()
    with torch.no_grad():
        out = model(_slices(), torch.randn(2, 2), return_attention=True)
    assert set(out) == {"prevalent_logit", "log_risk", "risk_logits", "attention"}
    assert out["prevalent_logit"].shape == (2,) and out["log_risk"].shape == (2,)
    assert out["risk_logits"].shape == (2, 2) and model.horizons_years == (1.0, 5.0)
    assert model.risk_head.bias is None  # a Cox log-risk has no identifiable intercept
    # Clinical variables feed the longitudinal heads only.
    assert model.prevalent_head.in_features + 2 == model.risk_head.in_features


# --- DeepSurv and pVF --------------------------------------------------------------------------


def test_deepsurv_variants() -> None:
    image = torch.randn(4, 5, 64, 64)
    clinical = torch.randn(4, 5)
    variants = {
        "image+clinical": (deepsurv_tiny(in_chans=5), {"x": image, "clinical": clinical}),
        "image-only": (deepsurv_tiny(in_chans=5, n_clinical=0), {"x": image}),
        "clinical-only": (deepsurv_tiny(backbone=None), {"clinical": clinical}),
    }
    for label, (model, inputs) in variants.items():
        with torch.no_grad():
            assert model.eval()(**inputs).shape == (4,), label
    assert variants["clinical-only"][0].gradcam_layer is None
    with pytest.raises(ValueError, match="image"):
        variants["image-only"][0](clinical=clinical)
    with pytest.raises(ValueError, match="needs an image backbone"):
        deepsurv_tiny(backbone=None, n_clinical=0)


def test_deepsurv_instance_input_norm_ignores_each_patch_exposure() -> None:
    """Per-sample, per-channel brightness/contrast (a radiograph's exposure or window) leaves the risk unchanged."""
    torch.manual_seed(0)
    image = torch.rand(3, 5, 64, 64)
    gain = torch.rand(3, 5, 1, 1) * 2 + 0.5
    offset = torch.rand(3, 5, 1, 1) - 0.5
    normed = deepsurv_tiny(in_chans=5, input_norm="instance").eval()
    plain = deepsurv_tiny(in_chans=5).eval()
    plain.load_state_dict(normed.state_dict())  # no parameters or buffers of its own
    with torch.no_grad():
        torch.testing.assert_close(normed(image * gain + offset, torch.zeros(3, 5)), normed(image, torch.zeros(3, 5)),
                                   atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain(image * gain + offset, torch.zeros(3, 5)), plain(image, torch.zeros(3, 5)))
    with pytest.raises(ValueError, match="input_norm"):
        deepsurv_tiny(input_norm="batch")


def test_deepsurv_image_scale_multiplies_the_image_features_only() -> None:
    """image_scale: the pooled image features enter the MLP scaled; same weights, clinical path unchanged."""
    torch.manual_seed(0)
    image, clinical = torch.rand(3, 5, 32, 32), torch.randn(3, 5)
    scaled = deepsurv_tiny(in_chans=5, image_scale=0.1).eval()
    plain = deepsurv_tiny(in_chans=5).eval()
    plain.load_state_dict(scaled.state_dict())  # no parameters of its own: checkpoints load either way
    with torch.no_grad():
        torch.testing.assert_close(scaled.image_features(image), 0.1 * plain.image_features(image))
        assert not torch.allclose(scaled(image, clinical), plain(image, clinical))
    with pytest.raises(ValueError, match="image_scale"):
        deepsurv_tiny(image_scale=0.0)


def test_pvf_input_modes_and_score_range() -> None:
    x = torch.randn(2, 1, 64, 64)
    for mode in ("adapt", "replicate"):
        model = pvf_tiny(input_mode=mode).eval()
        assert model.net.features[0][0].in_channels == (1 if mode == "adapt" else 3)
        score = model.score(x)
        assert score.shape == (2,) and bool(((score >= 0) & (score <= 1)).all())


def test_pvf_head_starts_near_an_uninformed_score() -> None:
    """The single-logit head starts small (torchvision's U(+-1) gave every image a confident random score)."""
    torch.manual_seed(0)
    model = pvf_tiny().train()
    head = model.net.classifier[-1]
    assert float(head.weight.detach().std()) < 0.02 and float(head.bias.detach().abs().max()) == 0.0
    with torch.no_grad():
        logits = model(torch.randn(8, 1, 128, 64))
    assert float(logits.abs().max()) < 0.5


def test_pvf_b4_matches_torchvision_structure() -> None:
    ours = build_model("pvf_efficientnet_b4", in_chans=3).net.state_dict()
    ref = torchvision.models.efficientnet_b4(weights=None, num_classes=1).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


# --- backbones and pretrained loading ----------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_full_backbones_match_torchvision_state_dict(name: str) -> None:
    ours = build_backbone(name, in_chans=3).state_dict()
    ref = getattr(torchvision.models, name)(weights=None).state_dict()
    ref = {k: v.shape for k, v in ref.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.items()} == ref


def test_backbone_width_knob_and_feature_maps() -> None:
    assert "resnet_tiny" in list_backbones() and "resnext50_32x4d" in list_backbones()
    enc = build_backbone("resnext_tiny", in_chans=2, width=8).eval()
    with torch.no_grad():
        stages = enc.forward_stages(torch.randn(1, 2, 64, 96))
        pooled = enc(torch.randn(1, 2, 64, 96))
    assert [tuple(s.shape[1:]) for s in stages] == [(32, 16, 24), (64, 8, 12), (128, 4, 6), (256, 2, 3)]
    assert pooled.shape == (1, enc.out_channels) == (1, 256)
    with pytest.raises(KeyError, match="unknown backbone"):
        build_backbone("vgg16")


def test_load_pretrained_adapts_rgb_stem_and_reports_problems(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(rgb.state_dict(), path)
    grey = load_pretrained(build_backbone("resnet18", in_chans=1), path)
    torch.testing.assert_close(grey.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(grey.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    # A grey image through the summed kernel equals the RGB stem on the grey image replicated.
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(grey.conv1(x), rgb.conv1(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_pretrained(build_backbone("resnet18"), tmp_path / "absent.pt")
    with pytest.raises(ValueError, match=r"missing: layer1\.2\.conv1\.weight.*\(96 in all\)"):
        load_pretrained(build_backbone("resnet34"), path)  # resnet18 has fewer blocks
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(build_backbone("resnet18", width=32), path)


def test_full_size_parameter_counts() -> None:
    counts = {n: sum(p.numel() for p in build_model(n).parameters()) for n in list_models(tiny=False)}
    # ResNeXt-50 trunk without fc (~23.0 M) + GRU 2048->256 (~1.77 M) + heads.
    assert 24.0e6 < counts["cnn_rnn"] < 25.5e6
    assert 24.0e6 < counts["multitask"] < 25.5e6
    assert 11.0e6 < counts["deepsurv"] < 11.4e6  # ResNet-18 trunk + small MLP
    assert 28.0e6 < counts["keypoints_hrnet_w32"] < 31.0e6
    assert 17.0e6 < counts["pvf_efficientnet_b4"] < 18.0e6


def test_registry_defaults_and_inputs() -> None:
    cfg = default_config("cnn_rnn_tiny")
    assert cfg["backbone"] == "resnet_tiny" and cfg["n_clinical"] == 0
    assert default_config("cnn_rnn")["backbone"] == "resnext50_32x4d"
    inputs = example_inputs("cnn_rnn_tiny", 3, n_clinical=4, shapes={"x": (14, 1, 96, 144)})
    assert inputs["x"].shape == (3, 14, 1, 96, 144) and inputs["clinical"].shape == (3, 4)
    assert set(example_inputs("deepsurv_tiny", backbone=None)) == {"clinical"}
    assert flops_per_sample("cnn_rnn_tiny", shapes={"x": (14, 1, 96, 144)}) > flops_per_sample("cnn_rnn_tiny")
    with pytest.raises(KeyError, match="registered"):
        build_model("nope")


# --- keypoints ---------------------------------------------------------------------------------


def test_keypoint_net_outputs_quarter_resolution_heatmaps() -> None:
    model = build_model("keypoints_tiny").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 96)).shape == (1, 5, 16, 24)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 1, 48, 64))


@pytest.mark.parametrize("stride", [1.0, 4.0])
def test_decode_of_rendered_heatmaps_recovers_coordinates(stride: float) -> None:
    gen = torch.Generator().manual_seed(0)
    h, w = 48, 40
    coords = torch.rand(8, 5, 2, generator=gen) * torch.tensor([w - 6.0, h - 6.0]) + 3.0
    coords = coords * stride
    maps = render_heatmaps(coords, (h, w), sigma=2.0, stride=stride)
    decoded, conf = decode_heatmaps(maps, stride=stride)
    err = (decoded - coords).abs() / stride  # in heatmap pixels
    assert float(err.max()) < 0.5
    assert float(err.max()) < 0.05  # the log-parabola fit is exact for Gaussians up to float error
    assert conf.shape == (8, 5) and float(conf.min()) > 0.7


def test_softmax_heatmaps_decode_their_targets_and_learn_from_cross_entropy() -> None:
    """A softmax keypoint net decodes log-Gaussian logits exactly; its loss is minimal there and skips empty maps."""
    from raypipe.models.keypoints import heatmap_loss, heatmap_probabilities, keypoints_tiny

    gen = torch.Generator().manual_seed(1)
    coords = (torch.rand(4, 5, 2, generator=gen) * 20 + 6) * 4
    target = render_heatmaps(coords, (32, 32), sigma=1.5, stride=4)
    logits = torch.log(target.clamp_min(1e-12))
    net = keypoints_tiny(heatmap_kind="softmax")
    decoded, conf = net.decode(logits)
    assert float((decoded - coords).abs().max()) < 0.05 * 4
    # mass within 2 heatmap pixels: about 0.9 per axis for sigma 1.5
    assert float(conf.min()) > 0.75 and float(conf.max()) <= 1.0 + 1e-6
    probs = heatmap_probabilities(logits, "softmax")
    torch.testing.assert_close(probs.flatten(2).sum(-1), torch.ones(4, 5))
    best = heatmap_loss(logits, target, "softmax")
    assert float(heatmap_loss(torch.zeros_like(logits), target, "softmax")) > float(best)
    shifted = torch.roll(logits, 2, dims=-1)
    assert float(heatmap_loss(shifted, target, "softmax")) > float(best)
    empty = target.clone()
    empty[:, 1:] = 0.0
    torch.testing.assert_close(heatmap_loss(logits, empty, "softmax"),
                               heatmap_loss(logits[:, :1], target[:, :1], "softmax"))
    with pytest.raises(ValueError, match="heatmap_kind"):
        keypoints_tiny(heatmap_kind="laplace")


def test_render_heatmaps_missing_keypoint_gives_empty_map() -> None:
    coords = torch.tensor([[[10.0, 12.0], [float("nan"), float("nan")]]])
    maps = render_heatmaps(coords, (32, 32), sigma=1.5)
    assert maps.shape == (1, 2, 32, 32)
    assert float(maps[0, 0].max()) == pytest.approx(1.0) and float(maps[0, 1].abs().sum()) == 0.0
    assert maps[0, 0].argmax() == 12 * 32 + 10


def test_oks_ap_is_one_for_perfect_predictions_and_decreases_with_error() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(50, 300, size=(40, 5, 2))
    areas = np.full(40, 200.0 * 100.0)
    sigmas = np.full(5, 0.05)
    assert oks_ap(gt, gt, areas, sigmas) == pytest.approx(1.0)
    noise = rng.standard_normal(gt.shape)
    aps = [oks_ap(gt + s * noise, gt, areas, sigmas) for s in (0.0, 2.0, 5.0, 10.0, 20.0, 40.0)]
    assert all(a >= b for a, b in zip(aps, aps[1:], strict=False))
    assert aps[0] == pytest.approx(1.0) and aps[-1] < 0.1 and aps[2] < aps[0]


def test_oks_ap_uses_scores_to_rank_detections() -> None:
    gt = np.zeros((2, 5, 2))
    pred = gt.copy()
    pred[1] += 100.0  # second detection is wrong at every threshold
    areas, sigmas = np.full(2, 100.0), np.full(5, 0.1)
    good_first = oks_ap(pred, gt, areas, sigmas, scores=np.array([0.9, 0.1]))
    bad_first = oks_ap(pred, gt, areas, sigmas, scores=np.array([0.1, 0.9]))
    # Good ranked first: precision 1 up to recall 0.5 -> 51/101; bad first: precision 0.5 to recall 0.5.
    assert good_first == pytest.approx(51 / 101)
    assert bad_first == pytest.approx(0.5 * 51 / 101)


# --- full-size forward passes (slow) -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("h", "w"), [(96, 96), (96, 144)])
def test_full_cnn_rnn_shapes(h: int, w: int) -> None:
    model = build_model("cnn_rnn", n_clinical=5).eval()
    with torch.no_grad():
        logits, attn = model(torch.randn(1, 14, 1, h, w), torch.randn(1, 5), return_attention=True)
    assert logits.shape == (1,) and attn.shape == (1, 14, h // 16, w // 16)


@pytest.mark.slow
def test_full_keypoints_hrnet_w32_shape() -> None:
    with torch.no_grad():
        assert build_model("keypoints_hrnet_w32").eval()(torch.randn(1, 1, 384, 384)).shape == (1, 5, 96, 96)


@pytest.mark.slow
def test_full_pvf_b4_shape_and_flops() -> None:
    with torch.no_grad():
        assert build_model("pvf_efficientnet_b4").eval()(torch.randn(1, 1, 512, 256)).shape == (1,)
    assert flops_per_sample("pvf_efficientnet_b4") > 1e9


@pytest.mark.slow
def test_full_multitask_and_deepsurv_shapes() -> None:
    with torch.no_grad():
        out = build_model("multitask").eval()(torch.randn(1, 14, 1, 96, 144))
        assert out["risk_logits"].shape == (1, 3)
        model = build_model("deepsurv", in_chans=5).eval()
        assert model(torch.randn(1, 5, 384, 384), torch.randn(1, 5)).shape == (1,)


def test_model_modules_import_without_ray() -> None:
    code = (
        "import sys, raypipe.models.registry, raypipe.explain.gradcam; "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
