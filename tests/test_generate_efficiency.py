"""Diff-X sampling cost and defaults: shared structure passes, kept inversion, precision, step-count check.

A random-init `diffx_tiny` on CPU (64 x 64 images, 8 x 8 latents): these tests count UNet passes and compare
images of the same seeds, which do not depend on training.
"""
from __future__ import annotations

import argparse

import pytest
import torch

from raypipe.cli import add_generate_arguments
from raypipe.generate import DiffXPipeline, SamplerSettings, autocast_dtype, future_prompts, steps_agreement
from raypipe.models.registry import build_model

STEPS = 3


@pytest.fixture(scope="module")
def pipe() -> DiffXPipeline:
    torch.manual_seed(0)
    return DiffXPipeline(build_model("diffx_tiny").eval(), SamplerSettings(steps=STEPS))


def _image(seed: int) -> torch.Tensor:
    return torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _count_calls(module: torch.nn.Module) -> list[int]:
    """A one-element counter of `module`'s forward calls (hook stays for the module's lifetime in this test)."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_structure_passes_are_shared_by_every_seed_and_year(pipe: DiffXPipeline) -> None:
    m = pipe.model
    structure, prompt = _count_calls(m.structure_unet), _count_calls(m.prompt_unet)
    base, prompts = future_prompts(70, "F", [1, 5, 10, 3])
    pipe.forget_inversion()
    images = pipe(_image(0), base, list(prompts.values()), [0, 1, 2])
    assert images.shape == (4, 3, 1, 64, 64)
    # inversion + structure trajectory at batch 1, whatever the number of years x seeds
    assert structure[0] == 2 * STEPS
    assert prompt[0] == STEPS  # 12 samples in one prompt-LDM batch per step
    pipe(_image(0), base, list(prompts.values())[:1], [7])  # same baseline: the inversion is reused
    assert structure[0] == 3 * STEPS
    pipe(_image(1), base, list(prompts.values())[:1], [7])  # another baseline: inverted again
    assert structure[0] == 5 * STEPS


def test_kept_inversion_gives_the_same_images(pipe: DiffXPipeline) -> None:
    base, prompts = future_prompts(70, "F", [1, 5])
    pipe.forget_inversion()
    fresh = pipe(_image(2), base, list(prompts.values()), [0, 1])
    again = pipe(_image(2), base, list(prompts.values()), [0, 1])  # inversion kept from the call above
    assert torch.equal(fresh, again)
    assert not torch.allclose(fresh[0, 0], fresh[0, 1])  # the seed matters


def test_noise_generators_live_on_the_model_device(pipe: DiffXPipeline) -> None:
    gens = pipe.generators([4, 4, 5])
    assert all(g.device == pipe.device for g in gens)
    a, b, c = (pipe.noise((4, 8, 8), [g]) for g in gens)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.device == pipe.device


def test_bf16_is_the_default_on_gpus_only() -> None:
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cpu"), bf16=True) is None
    assert autocast_dtype(torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), bf16=False) is None
    parser = add_generate_arguments(argparse.ArgumentParser())
    required = ["--image", "x", "--age", "70", "--sex", "F", "--model", "m", "--out", "o"]
    assert parser.parse_args(required).bf16 is None
    assert parser.parse_args([*required, "--no-bf16"]).bf16 is False


def test_steps_agreement_reports_ms_ssim_and_restores_settings(pipe: DiffXPipeline) -> None:
    base, prompts = future_prompts(70, "F", [1, 5])
    q = steps_agreement(pipe, _image(3), base, list(prompts.values()), [0, 1], steps=(2, 4))
    assert 0.0 <= q["ms_ssim_2_vs_4"] <= 1.0
    assert q["seconds_2"] > 0 and q["seconds_4"] > 0
    assert pipe.settings.steps == STEPS
    same = steps_agreement(pipe, _image(3), base, list(prompts.values())[:1], [0], steps=(2, 2))
    assert same["ms_ssim_2_vs_2"] == pytest.approx(1.0, abs=1e-6)  # same seeds, same steps: the same image
    with pytest.raises(ValueError):
        steps_agreement(pipe, _image(3), base, list(prompts.values()), [0], steps=(20,))
