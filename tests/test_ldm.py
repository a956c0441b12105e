"""Diff-X latent diffusion: prompts, training losses, deterministic sampling, feature injection, Ray Train run.

Setting of the reconstruction comparison (the thesis's Diff-X vs single-LDM PSNR, Results 2): a tiny
model (64 x 64 images, 8 x 8 latents) briefly trained on a 16-patient synthetic cohort; each image is
generated with its own baseline prompt (year offset 0) by Diff-X (DDIM inversion + injected
denoising) and by the single LDM (prompt LDM from seeded noise), and compared with the input. Briefly
trained models cannot draw a spine from noise, while Diff-X starts from the inverted latent and gets
the structure LDM's features, so the gap is large and robust (not a claim about fully trained models).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _diffx_data import ldm_images, save_diffx_dir, synthetic_cohort
from raypipe.generate import DiffXPipeline, SamplerSettings
from raypipe.models.ldm.diffx import decoder_site
from raypipe.models.ldm.schedule import ddpm_scheduler
from raypipe.models.ldm.text import WordTokenizer, build_prompt
from raypipe.models.registry import build_model
from raypipe.train.ldm import LDMTrainConfig, diffusion_loss, train_local, vae_loss

TRAIN = LDMTrainConfig(model="diffx_tiny", pretrained_sd="none", vae_epochs=8, unet_epochs=15, batch_size=8, vae_lr=2e-3, unet_lr=1e-3,
                       cond_drop_prob=0.0, ema_decay=0.99, seed=0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_cohort(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def images(cohort: Path) -> tuple[torch.Tensor, list[str], list[dict]]:
    return ldm_images(cohort)


@pytest.fixture(scope="module")
def trained(images: tuple[torch.Tensor, list[str], list[dict]]) -> torch.nn.Module:
    """A tiny Diff-X briefly trained on the synthetic radiographs (VAE, then both LDMs, EMA copied in)."""
    torch.manual_seed(0)
    model = build_model("diffx_tiny")
    train_local(model, images[0], images[1], TRAIN)
    return model.eval()


def _fixed_loss(model: torch.nn.Module, x: torch.Tensor, prompts: list[str]) -> float:
    """Diffusion loss with fixed noise and timesteps, so before/after compare the same draw."""
    g = torch.Generator().manual_seed(123)
    noise = torch.randn((x.shape[0], 4, 8, 8), generator=g)
    t = torch.linspace(50, 950, x.shape[0]).long()
    with torch.no_grad():
        return float(diffusion_loss(model, x, prompts, ddpm_scheduler(), noise=noise, timesteps=t)[0])


def _few_steps_lower_losses(x: torch.Tensor, prompts: list[str], steps: int = 12) -> None:
    torch.manual_seed(0)
    model = build_model("diffx_tiny")
    with torch.no_grad():
        vae_before = float(vae_loss(model, x))
    opt = torch.optim.Adam(model.vae.parameters(), lr=2e-3)
    for _ in range(steps):
        opt.zero_grad()
        vae_loss(model, x).backward()
        opt.step()
    with torch.no_grad():
        assert float(vae_loss(model, x)) < vae_before
    before = _fixed_loss(model, x, prompts)
    params = [*model.structure_unet.parameters(), *model.prompt_unet.parameters(), *model.text_encoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        diffusion_loss(model, x, prompts, ddpm_scheduler())[0].backward()
        opt.step()
    after = _fixed_loss(model, x, prompts)
    assert after < before, (before, after)


def test_prompts_follow_the_thesis() -> None:
    assert build_prompt(71.4, "F") == "An image of 71 years old female"
    assert build_prompt(80, "M", bmi=22.0, prevalent_fracture=1, glucocorticoid=0, rheumatoid_arthritis=True) == (
        "An image of 80 years old male, BMI 22.0, with vertebral fracture, with rheumatoid arthritis")
    tok = WordTokenizer(model_max_length=16)
    ids = tok(["An image of 81 years old female"])["input_ids"][0].tolist()
    assert tok.unk_token_id not in ids  # every prompt word and digit is in the vocabulary
    assert ids[:1] == [tok.bos_token_id] and tok.eos_token_id in ids
    assert tok(["An image of 81 years old female"])["input_ids"].shape == (1, 16)
    with pytest.raises(ValueError):
        build_prompt(70, "X")


def test_few_steps_lower_losses_on_synthetic_radiographs(images: tuple) -> None:
    x, prompts, _ = images
    _few_steps_lower_losses(x[:8], prompts[:8])


def test_few_steps_lower_losses_on_a_real_radiograph(shared_data: Path) -> None:
    from raypipe.io.radiograph import read_radiograph
    from raypipe.preprocess.pvf import ldm_input

    path = shared_data / "xray" / "fo_dicom" / "CR-MONO1-10-chest"
    if not path.exists():
        pytest.skip(f"{path} not present")
    img = torch.from_numpy(ldm_input(read_radiograph(path).pixels, 64))[None]
    x = torch.cat([img, img.flip(-1), img.flip(-2), img.flip(-1).flip(-2)])  # one real image, four views
    _few_steps_lower_losses(x, ["An image of 60 years old male"] * 4)


def test_generation_is_deterministic_given_seeds(trained: torch.nn.Module, images: tuple) -> None:
    x, prompts, _ = images
    pipe = DiffXPipeline(trained, SamplerSettings(steps=4))
    future = ["An image of 71 years old female", "An image of 80 years old female"]
    a = pipe(x[:1], prompts[0], future, [0, 1])
    b = pipe(x[:1], prompts[0], future, [0, 1])
    assert a.shape == (2, 2, 1, 64, 64)
    assert torch.equal(a, b)
    c = pipe(x[:1], prompts[0], future[:1], [1])  # a sample depends on its seed, not its place in the batch
    torch.testing.assert_close(c[0, 0], a[0, 1], atol=1e-4, rtol=0)
    assert not torch.allclose(a[0, 0], a[0, 1])  # different seeds, different futures
    single = pipe.sample_single(future[:1], [3])
    torch.testing.assert_close(single, pipe.sample_single(future[:1], [3]), atol=0, rtol=0)
    pipe.injection.remove()


def test_injection_replaces_block_output_and_attention(trained: torch.nn.Module, images: tuple) -> None:
    x, prompts, _ = images
    steps = 3
    pipe = DiffXPipeline(trained, SamplerSettings(steps=steps))
    layer = pipe.settings.injection_layer
    src, tgt = decoder_site(trained.structure_unet, layer), decoder_site(trained.prompt_unet, layer)
    assert (tgt.block, tgt.index) == (1, 2)  # "fifth decoder block" = up_blocks[1].resnets[2] (module docstring)
    seen: dict[str, list[torch.Tensor]] = {"src": [], "tgt": []}
    hooks = [src.resnet.register_forward_hook(lambda m, i, o: seen["src"].append(o.detach().clone())),
             tgt.resnet.register_forward_hook(lambda m, i, o: seen["tgt"].append(o.detach().clone()))]
    try:
        seen["src"].clear(), seen["tgt"].clear()
        pipe(x[:1], prompts[0], ["An image of 90 years old female"], [0, 1, 2])
    finally:
        for h in hooks:
            h.remove()
    # inversion also runs the structure UNet: its last `steps` calls are the lockstep denoising ones
    src_steps = seen["src"][-steps:]
    assert len(seen["tgt"]) == steps
    for s, t in zip(src_steps, seen["tgt"], strict=True):
        assert t.shape[0] == 3 and s.shape[0] == 1
        torch.testing.assert_close(t, s.expand_as(t), atol=0, rtol=0)
    assert pipe.injection.injections == {f"resnet:{layer}": steps, f"attention:{layer}": steps}
    # queries/keys: the prompt LDM's self-attention ran on the structure LDM's recorded q/k
    assert pipe.injection.features[f"q:{layer}"].shape[0] == 1
    # switched off, the prompt LDM computes its own features: the outputs change
    a = pipe(x[:1], prompts[0], ["An image of 90 years old female"], [0])
    pipe.settings = pipe.settings.replace(resnet_fraction=0.0, attention_fraction=0.0)
    b = pipe(x[:1], prompts[0], ["An image of 90 years old female"], [0])
    assert not torch.allclose(a, b)
    pipe.injection.remove()


def test_diffx_reconstructs_better_than_single_ldm(trained: torch.nn.Module, images: tuple) -> None:
    from raypipe.metrics import psnr

    x, prompts, _ = images
    pipe = DiffXPipeline(trained, SamplerSettings(steps=10, eta=0.0))
    ours, single = [], []
    for i in range(4):
        target = (x[i, 0].numpy() + 1) / 2
        d = pipe(x[i:i + 1], prompts[i], [prompts[i]], [0])[0, 0, 0].numpy()
        s = pipe.sample_single([prompts[i]], [0])[0, 0, 0].numpy()
        ours.append(psnr((d + 1) / 2, target, data_range=1.0))
        single.append(psnr((s + 1) / 2, target, data_range=1.0))
    assert np.mean(ours) > np.mean(single) + 1.0, (ours, single)
    pipe.injection.remove()


def test_reconstruction_quality_favours_diffx(trained: torch.nn.Module, images: tuple) -> None:
    """`reconstruction_quality` (the batch job's image-quality block): Diff-X beats the single LDM on both."""
    from raypipe.generate import reconstruction_quality

    x, _, rows = images
    pipe = DiffXPipeline(trained, SamplerSettings(steps=10, eta=0.0))
    qs = [reconstruction_quality(pipe, (x[i, 0].numpy() + 1) / 2, float(rows[i]["age"]), str(rows[i]["sex"]), [0, 1])
          for i in range(3)]
    pipe.injection.remove()
    for key in ("ms_ssim", "psnr"):
        ours, single = np.mean([q[f"diffx_{key}"] for q in qs]), np.mean([q[f"single_{key}"] for q in qs])
        assert ours > single, (key, qs)
    assert all(0.0 <= q["diffx_ms_ssim"] <= 1.0 and 0.0 <= q["single_ms_ssim"] <= 1.0 for q in qs)


def test_prompt_age_changes_the_output(trained: torch.nn.Module, images: tuple) -> None:
    x, prompts, _ = images
    pipe = DiffXPipeline(trained, SamplerSettings(steps=4))
    out = pipe(x[:1], prompts[0], ["An image of 60 years old female", "An image of 90 years old female"], [0])
    assert float((out[0] - out[1]).abs().max()) > 1e-4
    pipe.injection.remove()


def test_model_folder_round_trip(trained: torch.nn.Module, tmp_path: Path) -> None:
    from raypipe.generate import load_diffx

    folder = save_diffx_dir(trained, tmp_path / "ldm")
    state = torch.load(folder / "model.pt", weights_only=True)
    assert {k.split(".")[0] for k in state} == {"vae", "structure_unet", "prompt_unet", "text_encoder"}
    meta = json.loads((folder / "model_meta.json").read_text())
    assert meta["builder"] == "diffx_tiny" and meta["task"] == "ldm"
    model, _ = load_diffx(folder)
    assert float(model.vae.latent_scale) == pytest.approx(float(trained.vae.latent_scale))


def test_fit_ldm_on_ray_train_resumes(ray_session: None, cohort: Path, tmp_path: Path) -> None:
    from raypipe.config import load_config
    from raypipe.generate import load_diffx
    from raypipe.train.ldm import fit_ldm

    cfg = load_config(LDMTrainConfig, Path(__file__).parents[1] / "jobs" / "configs" / "ldm_tiny.yaml",
                      {"vae_epochs": 1, "unet_epochs": 1, "max_steps_per_epoch": 2, "stop_after_epoch": 1})
    out = tmp_path / "run"
    fit_ldm(cfg, str(cohort), str(out))
    assert json.loads((out / "model_meta.json").read_text())["epochs_run"] == 1
    fit_ldm(cfg.model_copy(update={"stop_after_epoch": None}), str(cohort), str(out))  # resumes from epoch 1
    meta = json.loads((out / "model_meta.json").read_text())
    assert meta["epochs_run"] == 2 and meta["ema"] is True and meta["latent_scale"] > 0
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, the first from the interrupted run
    model, _ = load_diffx(out)
    assert model.latent_size == 8
