"""`raypipe train pvf` / `raypipe cv pvf` on synthetic radiographs: augmentation, CV bookkeeping, nested selection.

That the tiny classifier learns the planted deformity (within 0.15 of the ceiling on held-out patients, `pvf_tiny.yaml`
as committed) is checked in `test_learning_ceiling.py`; the full-size figures are in bench/RESULTS.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.predictions import read_predictions


def test_pvf_family_trains_in_channels_last_on_cpu() -> None:
    """The pVF and age tasks ask for channels_last on the CPU too (EfficientNet's depthwise convolutions step ~1.35x
    faster in it there, bench/RESULTS.md), the ResNet tasks do not; the moved model computes in it, with the same
    outputs, and stays fp32."""
    import torch

    from raypipe.train.age import AgeWorkerTask
    from raypipe.train.common import select_device, to_device_model
    from raypipe.train.ct import CTWorkerTask
    from raypipe.train.deepsurv import DeepSurvWorkerTask
    from raypipe.train.pvf import PVFTrainConfig, PVFWorkerTask, build

    assert PVFWorkerTask.cpu_channels_last and AgeWorkerTask.cpu_channels_last
    assert not CTWorkerTask.cpu_channels_last and not DeepSurvWorkerTask.cpu_channels_last
    cpu = torch.device("cpu")
    assert not select_device(True, cpu).channels_last
    setup = select_device(True, cpu, cpu_channels_last=True)
    assert setup.channels_last and setup.amp_dtype is None
    torch.manual_seed(0)
    model = build(PVFTrainConfig(model="pvf_tiny", pretrained="none", input_size=(64, 48))).eval()
    x = torch.randn(2, 1, 64, 48)
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    stem.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        ref = model(x)
        out = to_device_model(model, setup)(x)
    assert seen[0].is_contiguous() and not seen[0].is_contiguous(memory_format=torch.channels_last)
    assert seen[1].is_contiguous(memory_format=torch.channels_last) and not seen[1].is_contiguous()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_augment_batch_is_identity_without_randomness_and_mirrors_with_flip() -> None:
    """The pVF augmentation keeps the padding value and moves pixels only as configured."""
    import torch

    from raypipe.train.pvf import PVFTrainConfig, augment_batch

    x = torch.randn(3, 1, 32, 16, generator=torch.Generator().manual_seed(0))
    still = PVFTrainConfig(pretrained="none", rotation_deg=0.0, scale_range=(1.0, 1.0), translate_frac=0.0, flip_prob=0.0,
                           contrast_jitter=0.0)
    torch.testing.assert_close(augment_batch(x, still, torch.Generator().manual_seed(1)), x, atol=1e-5, rtol=0)
    flip = still.model_copy(update={"flip_prob": 1.0})
    torch.testing.assert_close(augment_batch(x, flip, torch.Generator().manual_seed(1)), x.flip(-1), atol=1e-5, rtol=0)
    fill = -still.norm_mean / still.norm_std
    pad = torch.full((1, 1, 32, 16), fill)
    moved = PVFTrainConfig(pretrained="none", rotation_deg=30.0, scale_range=(0.8, 0.8), contrast_jitter=0.0)
    torch.testing.assert_close(augment_batch(pad, moved, torch.Generator().manual_seed(2)), pad)
    a = augment_batch(x, PVFTrainConfig(pretrained="none"), torch.Generator().manual_seed(3))
    b = augment_batch(x, PVFTrainConfig(pretrained="none"), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)


def test_augmentation_scale_range_must_be_ordered_and_positive() -> None:
    """A reversed or non-positive scale range is a config error naming the field, not a silent flip of sizes."""
    from pydantic import ValidationError

    from raypipe.train.pvf import PVFTrainConfig
    from raypipe.train.xray_config import KeypointTrainConfig

    for config in (PVFTrainConfig, KeypointTrainConfig):  # both use raypipe.config.ScaleRange
        for bad in ((1.1, 0.9), (0.0, 1.0)):
            with pytest.raises(ValidationError, match="scale_range"):
                config(scale_range=bad)


@pytest.fixture(scope="module")
def small_xray_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-patient synthetic X-ray cohort (radiographs read from DICOM by Ray Data, no shards)."""
    from raypipe.data.synth import synth_cohort

    return Path(synth_cohort("xray", tmp_path_factory.mktemp("pvf_cv") / "cohort", patients=60, seed=8, workers=1))


def _cv_config():
    from raypipe.config import load_config
    from raypipe.train.pvf import PVFTrainConfig

    return load_config(PVFTrainConfig, Path(__file__).parents[1] / "jobs" / "configs" / "pvf_tiny.yaml",
                       {"epochs": 2, "patience": 2, "input_size": [128, 64], "gradcam_images": 0, "n_boot": 10,
                        "val_fraction": 0.3})


def test_cv_pvf_scores_each_development_patient_once_with_cutoffs_from_training_patients(
        ray_session: None, small_xray_manifest: Path, tmp_path: Path) -> None:
    """`raypipe cv pvf` on a manifest: every development patient out of fold exactly once, the external set scored
    by the mean of the fold models, each fold's cut-off from its inner `tune` rows (training patients)."""
    import pandas as pd

    from raypipe.tune.cv import CVConfig, TUNE_SPLIT, fold_dir, run_cv

    result = run_cv("pvf", _cv_config(), str(small_xray_manifest), str(tmp_path / "cv"), CVConfig(folds=2, n_boot=10))
    preds, plan = result.predictions, result.plan
    oof = preds[preds["split"] == "val"]
    assert sorted(oof["patient_id"]) == sorted(plan.fold_of)  # each development patient once
    assert oof["label"].notna().any() and oof["score"].between(0, 1).all()
    for k in range(2):
        fold = read_predictions(fold_dir(str(tmp_path / "cv"), k))
        tune = fold[fold["split"] == TUNE_SPLIT]
        assert set(tune["patient_id"]) <= {p for p, f in plan.fold_of.items() if f != k}  # training patients only
        assert set(fold.loc[fold["split"] == "val", "patient_id"]) == set(plan.patients(k)["val"])
    ext = preds[preds["split"] == "external"]
    assert set(ext["patient_id"]) == set(plan.external) and ext["fold"].eq(-1).all()
    assert "pvf" in result.metrics["models"] and (tmp_path / "cv" / "metrics.json").is_file()
    manifest = pd.read_csv(small_xray_manifest, dtype={"patient_id": str})
    assert set(plan.fold_of) | set(plan.external) <= set(manifest["patient_id"])


def test_pvf_fold_ignores_held_out_labels(ray_session: None, small_xray_manifest: Path, tmp_path: Path) -> None:
    """Permute one fold's held-out `prevalent_fracture` labels in the manifest: the fold's scores and the cut-off
    chosen on its `tune` rows stay the same (nothing chosen in the fold sees held-out labels)."""
    import numpy as np
    import pandas as pd

    from raypipe.train.fold import FoldTask
    from raypipe.train.pvf import fit_pvf_fold
    from raypipe.tune.cv import TUNE_SPLIT, youden_cutoff

    table = pd.read_csv(small_xray_manifest, dtype={"patient_id": str, "study_id": str})
    patients = sorted(table["patient_id"].unique())
    held_out = patients[::3]
    fold = {"train": [p for p in patients if p not in held_out], "val": held_out}
    rows = np.flatnonzero(table["patient_id"].isin(held_out).to_numpy())
    permuted = table.copy()
    labels = table["prevalent_fracture"].to_numpy()
    permuted.loc[rows, "prevalent_fracture"] = labels[np.random.default_rng(3).permutation(rows)]
    assert not np.array_equal(permuted["prevalent_fracture"].to_numpy(), labels, equal_nan=True)
    other = small_xray_manifest.parent / "manifest_permuted.csv"
    permuted.to_csv(other, index=False)
    runs = {}
    for name, manifest in (("as_is", small_xray_manifest), ("permuted", other)):
        out = tmp_path / name
        fit_pvf_fold(FoldTask(fold=0, n_folds=3, config=_cv_config(), data_dir=str(manifest), out_dir=str(out),
                              patients=fold))
        runs[name] = read_predictions(out).sort_values(["split", "study_id"]).reset_index(drop=True)
    a, b = runs["as_is"], runs["permuted"]
    assert set(a["split"]) == {"val", TUNE_SPLIT}
    assert a["study_id"].tolist() == b["study_id"].tolist()
    np.testing.assert_array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    assert youden_cutoff(a[a["split"] == TUNE_SPLIT]) == youden_cutoff(b[b["split"] == TUNE_SPLIT])


def test_cached_training_inputs_are_the_streamed_ones_read_once(ray_session: None, small_xray_manifest: Path) -> None:
    """The memory cache (`cache_train`) holds, per radiograph, the input the streamed path decodes every epoch
    (float16 of it), with its label; each epoch serves every radiograph once, in a seeded order per epoch, as float16
    (converted on the device)."""
    import numpy as np

    from raypipe.train.pvf import cached_batches, dataset_for, input_batches, read_table, train_loader

    cfg = _cv_config()
    table, kind = read_table(str(small_xray_manifest))
    ids = table["study_id"].astype(str).tolist()[:12]
    ds = dataset_for(str(small_xray_manifest), kind, table, ids, cfg)
    streamed = {sid: (x.numpy(), float(y)) for xb, yb, sids in input_batches(ds, 5)
                for sid, x, y in zip(sids, xb, yb)}
    loader = train_loader(cfg, ds, 5)
    assert sorted(loader.rows.study_ids) == sorted(ids) and loader.rows.images.dtype == np.float16
    for sid, x, y in zip(loader.rows.study_ids, loader.rows.images, loader.rows.tabular["y"]):
        np.testing.assert_allclose(x.astype(np.float32), streamed[sid][0], atol=2e-3)
        assert y == streamed[sid][1] or (np.isnan(y) and np.isnan(streamed[sid][1]))

    def epoch(k: int) -> list[np.ndarray]:
        return [x.numpy().copy() for x, _, _ in cached_batches(loader, k)]

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert [len(b) for b in first] == [5, 5, 2] and all(b.dtype == np.float16 for b in first)  # float16 to the device
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # same seed and epoch: same batches
    assert not all(np.array_equal(a, b) for a, b in zip(first, second))  # a new order each epoch
    sums = lambda bs: sorted(float(x.astype(np.float64).sum()) for b in bs for x in b)  # noqa: E731
    assert np.allclose(sums(first), sums(second))  # every radiograph once per epoch
