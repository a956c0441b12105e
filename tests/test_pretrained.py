"""ImageNet weights from local files: torchvision/timm state_dicts as .pth or .safetensors, stems adapted.

Each test writes a real weight file (torch.save / safetensors.torch.save_file) from a freshly built
torchvision or timm model and loads it into raypipe's encoders; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raypipe.config import ConfigError, load_config
from raypipe.models.backbones import build_backbone
from raypipe.models.pretrained import adapt_in_channels, load_pretrained, read_state_dict

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_resnet18_loads_with_grey_stem_summed_over_rgb(tmp_path, suffix):
    """torchvision's resnet18 state_dict (fc included) loads into a 1-channel encoder: stem = sum over RGB."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None)
    path = _save(ref.state_dict(), tmp_path / f"resnet18{suffix}")
    enc = build_backbone("resnet18", in_chans=1, pretrained_path=path)
    got = enc.state_dict()
    torch.testing.assert_close(got["conv1.weight"], ref.conv1.weight.detach().sum(1, keepdim=True))
    for key, value in ref.state_dict().items():
        if key != "conv1.weight" and not key.startswith("fc."):
            torch.testing.assert_close(got[key], value, msg=key)
    # a grey image g gives the same stem response as (g, g, g) through the RGB kernel
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(enc.conv1(x), ref.conv1(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_timm_resnet_and_wrapped_ddp_checkpoint_load(tmp_path):
    """timm's resnet18 keys are torchvision's; a {'state_dict': {'module.' + key}} wrapper is unwrapped."""
    import timm

    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "timm_resnet18.pth")
    enc = build_backbone("resnet18", in_chans=3, pretrained_path=tmp_path / "timm_resnet18.pth").eval()
    ref.eval()
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(enc(x), ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_efficientnet_timm_layout_maps_onto_torchvision_and_gives_the_same_output(tmp_path):
    """timm's efficientnet_b0 (conv_stem/blocks/conv_head) loads into the pVF net: same features as timm."""
    import timm

    from raypipe.models.pvf import PVFClassifier

    torch.manual_seed(2)
    ref = timm.create_model("efficientnet_b0", pretrained=False).eval()
    path = _save(ref.state_dict(), tmp_path / "effb0_timm.safetensors")
    net = PVFClassifier(arch="efficientnet_b0", in_chans=3, pretrained_path=path).eval()
    x = torch.rand(1, 3, 64, 64)
    ours = torch.flatten(net.net.avgpool(net.net.features(x)), 1)
    torch.testing.assert_close(ours, ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-4, rtol=1e-4)
    grey = PVFClassifier(arch="efficientnet_b0", in_chans=1, pretrained_path=path)
    torch.testing.assert_close(grey.net.features[0][0].weight, ref.conv_stem.weight.detach().sum(1, keepdim=True))


def test_efficientnet_torchvision_layout_loads(tmp_path):
    """torchvision's efficientnet_b0 state_dict loads as is (classifier dropped)."""
    import torchvision

    from raypipe.models.pvf import PVFClassifier

    torch.manual_seed(3)
    ref = torchvision.models.efficientnet_b0(weights=None)
    path = _save(ref.state_dict(), tmp_path / "effb0_tv.pth")
    net = PVFClassifier(arch="efficientnet_b0", in_chans=1, pretrained_path=path)
    torch.testing.assert_close(net.net.features[1][0].block[0][0].weight, ref.features[1][0].block[0][0].weight)


def test_hrnet_timm_classification_checkpoint_loads_into_keypoint_net(tmp_path):
    """A timm HRNet classification state_dict (incre/final layers ignored) loads into the heatmap net."""
    import timm

    from raypipe.models.keypoints import KeypointHeatmapNet

    torch.manual_seed(4)
    ref = timm.create_model("hrnet_w18_small", pretrained=False)
    path = _save(ref.state_dict(), tmp_path / "hrnet_w18_small.safetensors")
    net = KeypointHeatmapNet(variant="hrnet_w18_small", in_chans=1, pretrained_path=path)
    got = net.backbone.state_dict()
    torch.testing.assert_close(got["conv1.weight"], ref.conv1.weight.detach().sum(1, keepdim=True))
    torch.testing.assert_close(got["layer1.0.conv2.weight"], ref.state_dict()["layer1.0.conv2.weight"])


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    """Weights of another architecture fail with the key, the file's shape and the model's shape."""
    path = _save(build_backbone("resnet_tiny", in_chans=3).state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch: layer1\.0\.conv1\.weight: file \(16, 16, 3, 3\) vs model "
                                         r"\(16, 16, 1, 1\)"):
        build_backbone("resnext_tiny", in_chans=1, pretrained_path=path)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_backbone("resnet_tiny", pretrained_path=tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth is not a readable state_dict"):
        read_state_dict(tmp_path / "junk.pth")


def test_multi_channel_adaptation_keeps_the_response_to_equal_channels():
    """RGB kernel -> 5 channels (L1-L5 patches): equal inputs give the RGB kernel's grey response."""
    w = torch.randn(8, 3, 3, 3)
    w5 = adapt_in_channels(w, 5)
    x = torch.rand(1, 1, 9, 9)
    torch.testing.assert_close(torch.nn.functional.conv2d(x.expand(-1, 5, -1, -1), w5),
                               torch.nn.functional.conv2d(x.expand(-1, 3, -1, -1), w), atol=1e-5, rtol=1e-5)


def test_load_pretrained_non_strict_reports_nothing_and_loads_the_overlap(tmp_path):
    """strict=False loads the matching keys and leaves the rest at their initialisation."""
    src = build_backbone("resnet_tiny", in_chans=1)
    state = {k: v for k, v in src.state_dict().items() if k.startswith("layer1.")}
    path = _save(state, tmp_path / "part.pth")
    dst = build_backbone("resnet_tiny", in_chans=1)
    load_pretrained(dst, path, strict=False)
    torch.testing.assert_close(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    with pytest.raises(ValueError, match="missing: conv1.weight"):
        load_pretrained(build_backbone("resnet_tiny", in_chans=1), path)


@pytest.mark.parametrize("name, cls_path, weights", [
    ("ct_bone_only.yaml", "raypipe.train.config:CTTrainConfig", "weights/resnext50_32x4d_imagenet1k_v1.pth"),
    ("ct_bone_muscle.yaml", "raypipe.train.config:CTTrainConfig", "weights/resnext50_32x4d_imagenet1k_v1.pth"),
    ("ct_multitask.yaml", "raypipe.train.config:MultitaskConfig", "weights/resnext50_32x4d_imagenet1k_v1.pth"),
    ("keypoints.yaml", "raypipe.train.xray_config:KeypointTrainConfig", "weights/hrnet_w32_ms_in1k.safetensors"),
    ("xray_deepsurv.yaml", "raypipe.train.xray_config:DeepSurvConfig", "weights/resnet18_imagenet1k_v1.pth"),
    ("pvf.yaml", "raypipe.train.pvf:PVFTrainConfig", "weights/efficientnet_b4_imagenet1k_v1.pth"),
    ("age.yaml", "raypipe.train.age:AgeRegressorConfig", "weights/efficientnet_b4_imagenet1k_v1.pth"),
])
def test_paper_configs_refuse_to_start_without_their_weight_file(tmp_path, monkeypatch, name, cls_path, weights):
    """Paper configs name their ImageNet file; absent, they fail naming it; present, they load; none is explicit."""
    import importlib

    module, attr = cls_path.split(":")
    cls = getattr(importlib.import_module(module), attr)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"pretrained_path '{weights}' does not exist"):
        load_config(cls, CONFIGS / name)
    (tmp_path / weights).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / weights).write_bytes(b"")  # existence is checked when the config is read; the content when loaded
    assert load_config(cls, CONFIGS / name).pretrained_path == weights
    none = load_config(cls, CONFIGS / name, overrides={"pretrained": "none", "pretrained_path": None})
    assert none.pretrained == "none"
    with pytest.raises(ConfigError, match="pretrained is 'none' but pretrained_path is set"):
        load_config(cls, CONFIGS / name, overrides={"pretrained": "none"})
    with pytest.raises(ConfigError, match="pretrained_path is not set"):
        load_config(cls, CONFIGS / name, overrides={"pretrained_path": None})


@pytest.mark.parametrize("name, cls_path", [
    ("ct_tiny.yaml", "raypipe.train.config:CTTrainConfig"),
    ("ct_multitask_tiny.yaml", "raypipe.train.config:MultitaskConfig"),
    ("keypoints_tiny.yaml", "raypipe.train.xray_config:KeypointTrainConfig"),
    ("xray_deepsurv_tiny.yaml", "raypipe.train.xray_config:DeepSurvConfig"),
    ("pvf_tiny.yaml", "raypipe.train.pvf:PVFTrainConfig"),
    ("age_tiny.yaml", "raypipe.train.age:AgeRegressorConfig"),
])
def test_tiny_configs_state_pretrained_none(name, cls_path):
    """The smoke configs say explicitly that they start from random initialisation."""
    import importlib

    import yaml

    module, attr = cls_path.split(":")
    cls = getattr(importlib.import_module(module), attr)
    assert yaml.safe_load((CONFIGS / name).read_text())["pretrained"] == "none"
    assert load_config(cls, CONFIGS / name).pretrained_path is None


def test_clinical_only_deepsurv_needs_no_image_weights():
    """The no-image DeepSurv variant has no encoder, so no weight file is asked for."""
    from raypipe.train.xray_config import DeepSurvConfig

    assert DeepSurvConfig(variant="clinical").pretrained_path is None
    with pytest.raises(ValueError, match="pretrained_path is not set"):
        DeepSurvConfig(variant="image")
