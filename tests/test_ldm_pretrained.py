"""Diff-X from a local Stable Diffusion directory (issue 15 item 1) and its Accelerate fine-tuning on Ray Train.

The SD directory is a tiny one the tests write with `save_pretrained` (tests/_sd_dir.py); it has SD's
layout (unet/, vae/, text_encoder/, tokenizer/), RGB VAE and a CLIP BPE tokenizer, so every adaptation
(grey VAE, widened structure UNet input, frozen CLIP) runs as it does on SD 1.5.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _diffx_data import synthetic_cohort
from _sd_dir import write_tiny_sd
from raypipe.models.ldm.stable_diffusion import check_sd_directory, diffx_kwargs_from_sd, load_stable_diffusion
from raypipe.models.registry import build_model


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return root, write_tiny_sd(root)


@pytest.fixture(scope="module")
def loaded(sd_dir: tuple[Path, dict]) -> torch.nn.Module:
    model = build_model("diffx", **diffx_kwargs_from_sd(sd_dir[0]))
    load_stable_diffusion(model, sd_dir[0])
    return model.eval()


def test_loaded_weights_equal_the_saved_ones(sd_dir: tuple[Path, dict], loaded: torch.nn.Module) -> None:
    _, saved = sd_dir
    for k, v in saved["unet"].items():
        assert torch.equal(loaded.prompt_unet.state_dict()[k], v), k
        if k != "conv_in.weight":
            assert torch.equal(loaded.structure_unet.state_dict()[k], v), k
    for k, v in saved["text_encoder"].items():
        assert torch.equal(loaded.text_encoder.state_dict()[k], v), k
    vae = loaded.vae.state_dict()
    adapted = {"encoder.conv_in.weight", "decoder.conv_out.weight", "decoder.conv_out.bias"}
    for k, v in saved["vae"].items():
        if k not in adapted:
            assert torch.equal(vae[k], v), k
    torch.testing.assert_close(vae["encoder.conv_in.weight"], saved["vae"]["encoder.conv_in.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(vae["decoder.conv_out.weight"], saved["vae"]["decoder.conv_out.weight"].mean(0, keepdim=True))
    assert float(loaded.vae.latent_scale) == pytest.approx(0.18215)


def test_widened_structure_input_is_zero_and_keeps_sd_output(sd_dir: tuple[Path, dict], loaded: torch.nn.Module) -> None:
    from diffusers import UNet2DConditionModel

    saved = sd_dir[1]["unet"]["conv_in.weight"]
    w = loaded.structure_unet.conv_in.weight
    assert w.shape[1] == saved.shape[1] + 1
    assert torch.equal(w[:, : saved.shape[1]], saved) and torch.count_nonzero(w[:, saved.shape[1]:]) == 0
    original = UNet2DConditionModel.from_pretrained(sd_dir[0], subfolder="unet", local_files_only=True).eval()
    g = torch.Generator().manual_seed(0)
    latents, lowres = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        text = loaded.encode_text(["An image of 70 years old female", "An image of 80 years old male"])
        expected = original(latents, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(loaded.structure_eps(latents, t, text, lowres), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.prompt_eps(latents, t, text), expected, rtol=1e-5, atol=1e-6)
        assert float(expected.abs().mean()) > 0  # a real output, not a zero map


def test_grey_vae_is_sd_vae_on_replicated_grey(sd_dir: tuple[Path, dict], loaded: torch.nn.Module) -> None:
    from diffusers import AutoencoderKL

    rgb = AutoencoderKL.from_pretrained(sd_dir[0], subfolder="vae", local_files_only=True).eval()
    grey = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = loaded.vae.encode(grey).latent_dist.mode()
        torch.testing.assert_close(z, rgb.encode(grey.repeat(1, 3, 1, 1)).latent_dist.mode(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.vae.decode(z).sample, rgb.decode(z).sample.mean(1, keepdim=True),
                                   rtol=1e-4, atol=1e-5)


def test_tokenizer_and_text_encoder_are_sds(sd_dir: tuple[Path, dict], loaded: torch.nn.Module) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd_dir[0] / "tokenizer", local_files_only=True)
    prompt = "An image of 70 years old female"
    assert loaded.tokenizer(prompt)["input_ids"] == tok(prompt)["input_ids"]
    assert loaded.tokenizer.model_max_length == 77


@pytest.mark.parametrize("missing", ["unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                                     "tokenizer/merges.txt", "text_encoder/config.json"])
def test_incomplete_directory_names_the_missing_file(sd_dir: tuple[Path, dict], tmp_path: Path, missing: str) -> None:
    from raypipe.config import ConfigError, load_config
    from raypipe.train.ldm import LDMTrainConfig

    copy = tmp_path / "sd"
    shutil.copytree(sd_dir[0], copy)
    (copy / missing).unlink()
    with pytest.raises(ValueError, match=missing.split("/")[0] + "/"):
        check_sd_directory(copy)
    config = Path(__file__).parents[1] / "jobs" / "configs" / "ldm_tiny.yaml"
    with pytest.raises(ConfigError, match=f"pretrained_sd: .*{missing.split('/')[0]}/"):
        load_config(LDMTrainConfig, config, {"pretrained_sd": str(copy)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(LDMTrainConfig, config, {"pretrained_sd": str(tmp_path / "absent")})


def test_pretrained_sd_must_be_stated() -> None:
    from pydantic import ValidationError

    from raypipe.train.ldm import LDMTrainConfig

    with pytest.raises(ValidationError, match="pretrained_sd"):
        LDMTrainConfig(model="diffx_tiny")


def test_fine_tune_sd_through_accelerate_in_the_ray_worker_with_accumulation(
        ray_session: None, sd_dir: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Accelerate inside the Ray Train worker: with 2 micro-batches per step, 3 micro-batches make 1 update.

    Evidence of the update count from the optimiser itself (AdamW's per-parameter ``step`` in the final
    checkpoint) and from the run's per-epoch columns; the accumulation window restarts with the LDM stage
    (without that, the VAE stage's leftover micro-batch would make the LDM stage step twice).
    """
    from raypipe.generate import load_diffx
    from raypipe.train.common import read_checkpoint
    from raypipe.train.ldm import LDMTrainConfig, fit_ldm

    cohort = synthetic_cohort(tmp_path_factory.getbasetemp())
    cfg = LDMTrainConfig(model="diffx", pretrained_sd=str(sd_dir[0]), vae_epochs=1, unet_epochs=1, batch_size=2,
                         max_steps_per_epoch=3, gradient_accumulation_steps=2, cond_drop_prob=0.0, unet_lr=1e-3,
                         num_workers=1, torch_threads=1, seed=0, sampler={"steps": 4, "eta": 0.5})
    out = tmp_path / "run"
    result = fit_ldm(cfg, str(cohort), str(out))
    payload = read_checkpoint(result.checkpoint)
    history = payload["state"]["history"]
    assert [(r["steps"], r["optimizer_steps"]) for r in history] == [(3, 1), (3, 1)]
    adam_steps = {float(s["step"]) for s in payload["optimizer"]["state"].values()}
    assert adam_steps == {1.0}  # the LDM stage's AdamW stepped once for its 3 micro-batches
    assert payload["state"]["extra"]["latent_scale"] == pytest.approx(0.18215)  # SD's, not re-measured

    meta = json.loads((out / "model_meta.json").read_text())
    assert meta["kwargs"]["unet_config"]["block_out_channels"] == [32, 64]
    model, _ = load_diffx(out)
    assert model.structure_unet.conv_in.weight.shape[1] == 5 and model.image_size == 16
    saved_unet = sd_dir[1]["unet"]
    moved = [k for k, v in model.prompt_unet.state_dict().items() if not torch.equal(v, saved_unet[k])]
    assert moved  # fine-tuned: the LDM weights left SD's
    frozen = sd_dir[1]["text_encoder"]
    assert all(torch.equal(v, frozen[k]) for k, v in model.text_encoder.state_dict().items())  # CLIP stays frozen
