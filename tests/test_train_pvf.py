"""`raypipe train pvf` on synthetic radiographs: the tiny classifier learns the planted deformity.

Ceiling: the synthetic cohort plants wedge deformities (>= 20 % height loss, Genant grade 1+) in
about one patient in six; at 256 x 128 a lumbar body is ~10 px tall, so a 20-45 % wedge is a 2-5 px
difference, learnable but not perfectly by a 0.25-width EfficientNet in a dozen CPU epochs. Density
(brightness) is a weaker correlated cue (fractures are drawn more often at low density; CLAHE removes
much of it). With ~10 held-out positives the AUROC's CI is wide (about +-0.15), so the bar is 0.7,
on the validation + test studies together.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _diffx_data import synthetic_cohort
from raypipe.metrics import auroc
from raypipe.predictions import read_predictions

PATIENTS = 64


@pytest.mark.slow
def test_tiny_pvf_learns_planted_deformity(ray_session: None, tmp_path_factory: pytest.TempPathFactory,
                                           tmp_path: Path) -> None:
    from raypipe.config import load_config
    from raypipe.train.pvf import PVFTrainConfig, fit_pvf

    manifest = synthetic_cohort(tmp_path_factory.getbasetemp(), patients=PATIENTS, seed=3)
    cfg = load_config(PVFTrainConfig, Path(__file__).parents[1] / "jobs" / "configs" / "pvf_tiny.yaml")
    fit_pvf(cfg, str(manifest), str(tmp_path))
    for f in ("model.pt", "model_meta.json", "config.yaml", "metrics.json", "predictions.parquet", "metrics.csv"):
        assert (tmp_path / f).is_file(), f
    meta = json.loads((tmp_path / "model_meta.json").read_text())
    assert meta["builder"] == "pvf_tiny" and meta["task"] == "pvf" and meta["preprocess"]["size"] == [256, 128]
    assert list((tmp_path / "gradcam").glob("*.png"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["models"]["pvf"]["auroc"]["ci_low"] is not None
    preds = read_predictions(tmp_path / "predictions.parquet")
    held = preds[preds["label"].notna()]
    assert set(held["split"]) <= {"val", "test"}
    assert auroc(held["label"].astype(int).to_numpy(), held["score"].to_numpy()) >= 0.7


def test_augment_batch_is_identity_without_randomness_and_mirrors_with_flip() -> None:
    """The pVF augmentation keeps the padding value and moves pixels only as configured."""
    import torch

    from raypipe.train.pvf import PVFTrainConfig, augment_batch

    x = torch.randn(3, 1, 32, 16, generator=torch.Generator().manual_seed(0))
    still = PVFTrainConfig(rotation_deg=0.0, scale_range=(1.0, 1.0), translate_frac=0.0, flip_prob=0.0,
                           contrast_jitter=0.0)
    torch.testing.assert_close(augment_batch(x, still, torch.Generator().manual_seed(1)), x, atol=1e-5, rtol=0)
    flip = still.model_copy(update={"flip_prob": 1.0})
    torch.testing.assert_close(augment_batch(x, flip, torch.Generator().manual_seed(1)), x.flip(-1), atol=1e-5, rtol=0)
    fill = -still.norm_mean / still.norm_std
    pad = torch.full((1, 1, 32, 16), fill)
    moved = PVFTrainConfig(rotation_deg=30.0, scale_range=(0.8, 0.8), contrast_jitter=0.0)
    torch.testing.assert_close(augment_batch(pad, moved, torch.Generator().manual_seed(2)), pad)
    a = augment_batch(x, PVFTrainConfig(), torch.Generator().manual_seed(3))
    b = augment_batch(x, PVFTrainConfig(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)
