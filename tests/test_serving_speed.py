"""Pieces of the fast serving path without Ray: device and thread choice, in-memory radiograph decoding,
and the generator's real batching (one batched forward over all requests, same images as single requests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe.serving.deployments import choose_device, threads_for


def test_device_is_cuda_only_with_an_assigned_gpu_that_torch_sees() -> None:
    assert choose_device([], cuda_available=True) == "cpu"  # no num_gpus: never grab a GPU Ray did not assign
    assert choose_device(["0"], cuda_available=False) == "cpu"  # CPU-only torch build on a GPU node
    assert choose_device([0], cuda_available=True) == "cuda"
    assert choose_device([], cuda_available=torch.cuda.is_available()) == "cpu"  # this machine's CPU path


def test_threads_follow_the_replica_cpus_unless_requested() -> None:
    assert threads_for(None, 2.0) == 2
    assert threads_for(None, 0.4) == 1  # a fractional CPU still runs one thread
    assert threads_for(None, None) == 1
    assert threads_for(3, 0.5) == 3


@pytest.mark.parametrize("name", ["xray/fo_dicom/GH342.dcm", "xray/fo_dicom/CR-MONO1-10-chest"])
def test_radiograph_from_memory_equals_radiograph_from_file(shared_data: Path, name: str) -> None:
    from raypipe.io.radiograph import read_radiograph, read_radiograph_bytes

    path = shared_data / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    a, b = read_radiograph(path), read_radiograph_bytes(path.read_bytes(), "image")
    assert np.array_equal(a.pixels, b.pixels)
    assert (a.pixel_spacing, a.photometric, a.modality) == (b.pixel_spacing, b.photometric, b.modality)
    assert b.path == "image"  # errors and QC name the field, never a server path


def test_radiograph_from_memory_png_and_garbage(tmp_path: Path) -> None:
    from raypipe.io.errors import ImageReadError
    from raypipe.io.radiograph import read_radiograph, read_radiograph_bytes, write_radiograph_png

    png = write_radiograph_png(tmp_path / "r.png", np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(64, 32))
    assert np.array_equal(read_radiograph(png).pixels, read_radiograph_bytes(png.read_bytes()).pixels)
    with pytest.raises(ImageReadError, match="pixels"):
        read_radiograph_bytes(png.read_bytes(), max_pixels=100)
    with pytest.raises(ImageReadError) as e:
        read_radiograph_bytes(b"\x00" * 300, "image")
    assert str(tmp_path) not in str(e.value)


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory):
    from raypipe.scoring.future import FutureGenerator
    from raypipe.scoring.tiny import publish_tiny_models

    root = tmp_path_factory.mktemp("ldm")
    publish_tiny_models(root / "registry", which=("ldm",), workdir=root / "runs")
    return FutureGenerator.from_registry(root / "registry", device="cpu")


def _radiograph(seed: int, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, shape[0])[:, None]
    return np.clip(0.5 * y + 0.3 * rng.random(shape), 0, 1).astype(np.float32)


def test_generator_batch_of_two_equals_two_single_requests(generator) -> None:
    from raypipe.scoring.future import FutureRequest

    reqs = [FutureRequest(_radiograph(0, (96, 64)), 71.0, "F", [1, 10], [0, 3]),
            FutureRequest(_radiograph(1, (80, 80)), 64.0, "M", [5], [7])]  # different sizes, years and seeds
    batched = generator.generate_many(reqs)
    singles = [generator.generate(q.pixels, q.age, q.sex, q.years, q.seeds) for q in reqs]
    assert [len(b) for b in batched] == [4, 1]
    for b_imgs, s_imgs in zip(batched, singles):
        for b, s in zip(b_imgs, s_imgs):
            assert (b.year, b.seed) == (s.year, s.seed) and b.pixels.shape == s.pixels.shape
            np.testing.assert_allclose(b.pixels, s.pixels, atol=1e-4, rtol=0)
    assert not np.allclose(batched[0][0].pixels, batched[0][1].pixels, atol=1e-3)  # seeds 0 and 3 differ
    assert generator.generate_many([]) == []


def test_generator_runs_one_forward_per_step_over_the_whole_batch(tmp_path: Path) -> None:
    from raypipe.generate import pipeline_from_dir
    from raypipe.registry import load_version
    from raypipe.scoring.tiny import publish_tiny_models

    publish_tiny_models(tmp_path / "registry", which=("ldm",), workdir=tmp_path / "runs")
    pipe = pipeline_from_dir(load_version(tmp_path / "registry", "ldm", "latest").path, device="cpu")
    size = pipe.model.image_size
    calls: dict[str, list[int]] = {"structure": [], "prompt": []}
    for name, attr in (("structure", "structure_eps"), ("prompt", "prompt_eps")):
        original = getattr(pipe.model, attr)

        def counted(z: torch.Tensor, *a, _orig=original, _name=name, **k) -> torch.Tensor:
            calls[_name].append(int(z.shape[0]))
            return _orig(z, *a, **k)

        setattr(pipe.model, attr, counted)
    images = torch.zeros(2, 1, size, size)
    pipe.generate_many(images, ["An image of 70 years old female"] * 2,
                       [["An image of 71 years old female"], ["An image of 75 years old female"] * 2], [[0, 1], [2]])
    steps = pipe.settings.steps
    assert calls["structure"] == [2] * (2 * steps)  # inversion + denoising: both images in every forward
    assert calls["prompt"] == [4] * steps  # 2 x 1 + 1 x 2 samples in one prompt forward per step
