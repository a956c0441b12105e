"""The image models learn the realistic synthetic cohort end to end, to within 0.15 of its ceiling out of fold.

The reduced version of `bench/ceiling.py` (issue 14): each cohort comes from `raypipe synth` (DICOM, masks,
keypoints), goes through the Ray Data preprocessing and the real `raypipe cv` (nested selection, the tiny
configs as committed), and the pooled out-of-fold figure is compared with the cohort's ceiling on the same rows
(`raypipe.data.synth.ceiling`): Harrell C of `true_lp` for DeepSurv (image + clinical), AUROC of `true_image_lp`
for the image-only CT CNN-RNN. The full-size figures (more patients, within 0.10) are in bench/RESULTS.md.

DeepSurv runs in `make test` on the suite's shared 500-patient X-ray cohort (`xray_cohort`). The CT check runs in
`make test-slow` (~10 minutes) and is a strict expected failure: 300 patients leave ~80 development patients per fold,
too few for the CT model, which learns at 900 (bench/ceiling.py, about an hour on 2 cores).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from raypipe.data.synth.ceiling import compare

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
MAX_GAP = 0.15
CT_PATIENTS = 300


def _manifest(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"patient_id": str, "study_id": str})


def _check(comps, what: str) -> None:
    oof = [c for c in comps if c.model.rows == "out-of-fold"]
    assert oof, f"{what}: no out-of-fold rows"
    c = oof[0]
    print(c.line() + f"  gap {c.gap:.3f}")
    assert c.above_chance, c.line()
    assert c.gap <= MAX_GAP, c.line()


def test_deepsurv_learns_to_the_ceiling(ray_session, xray_cohort, tmp_path: Path) -> None:
    """DeepSurv (image + clinical model 3) out of fold within 0.15 of the Harrell C of `true_lp`."""
    from raypipe.tune.cv import cv_cli

    manifest, shards = xray_cohort
    result = cv_cli("deepsurv", str(CONFIGS / "xray_deepsurv_tiny.yaml"), 3, str(shards), str(tmp_path / "cv"))
    preds = pd.read_parquet(Path(result.out_dir) / "predictions.parquet")
    comps, _ = compare(preds, _manifest(manifest), "DeepSurv", "survival", "true_lp", splits=("val",), n_boot=100)
    _check(comps, "DeepSurv")


@pytest.fixture(scope="module")
def ct_cohort(tmp_path_factory: pytest.TempPathFactory, ray_session) -> tuple[Path, Path]:
    """(manifest, shards) of a CT cohort from `raypipe synth ct`, preprocessed on Ray Data."""
    from raypipe.data.ct_pipeline import preprocess_ct
    from raypipe.data.synth import synth_cohort
    from raypipe.preprocess.config import CTPreprocessConfig

    root = tmp_path_factory.mktemp("ct_ceiling")
    manifest = Path(synth_cohort("ct", root / "cohort", patients=CT_PATIENTS, seed=21))
    preprocess_ct(manifest, root / "shards", CTPreprocessConfig(qc_pictures=False))
    return manifest, root / "shards"


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "known gap (issue 14): at 300 patients a fold trains on ~80 development patients (~20 positives) and the tiny "
    "CNN-RNN stays at chance (run 2026-12-06: out-of-fold AUROC 0.47 [0.38, 0.60] vs ceiling 0.79 on 122 rows); it "
    "learns at 900 patients (bench/RESULTS.md: 0.74 vs 0.83). Strict: the day it passes, this marker must go"))
def test_ct_cnn_rnn_learns_to_the_ceiling(ct_cohort, tmp_path: Path) -> None:
    """The image-only CT CNN-RNN (bone + muscle) out of fold within 0.15 of the AUROC of `true_image_lp`."""
    from raypipe.tune.cv import cv_cli

    manifest, shards = ct_cohort
    result = cv_cli("cnn-rnn", str(CONFIGS / "ct_tiny.yaml"), 3, str(shards), str(tmp_path / "cv"))
    preds = pd.read_parquet(Path(result.out_dir) / "predictions.parquet")
    comps, _ = compare(preds, _manifest(manifest), "CT CNN-RNN", "fracture_5y", "true_image_lp", splits=("val",),
                       n_boot=100)
    _check(comps, "CT CNN-RNN")
