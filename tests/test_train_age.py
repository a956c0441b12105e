"""`raypipe train age`: the thesis's age regressor (papers/004 Methods 8) on the pVF network and input.

What the synthetic cohort lets it learn: a patient's age shows in the radiograph only through bone density
(density falls 2.2 HU a year, SD 28 HU around that trend, plus sex/BMI/steroid terms), rendered as cortical
brightness and trabecular texture. The ceiling is modest: a linear fit of age on the true density and BMI over
3000 draws gives R-square 0.21 and MAE 5.3 years against 6.0 for predicting the mean. The learning test asks
only that the tiny regressor beats the training mean on the same held-out studies; a model that ignored the
image would not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _diffx_data import save_age_dir, save_pvf_dir

CONFIGS = Path(__file__).parents[1] / "jobs" / "configs"


def test_standardised_mse_ignores_unknown_ages() -> None:
    from raypipe.train.age import mse_standardised

    pred = torch.tensor([0.0, 1.0, 5.0])
    y = torch.tensor([70.0, 78.0, float("nan")])
    assert float(mse_standardised(pred, y, 70.0, 8.0)) == pytest.approx(0.0)  # (70-70)/8 = 0, (78-70)/8 = 1
    assert float(mse_standardised(pred, torch.tensor([62.0, 70.0, float("nan")]), 70.0, 8.0)) == pytest.approx(1.0)


def test_held_out_metrics_compare_with_the_training_mean() -> None:
    from raypipe.metrics.diffx import age_regression
    from raypipe.train.age import held_out_metrics

    frame = pd.DataFrame({"age": [60.0, 65.0, 70.0, 80.0], "predicted_age": [62.0, 66.0, 69.0, 75.0],
                          "mean_baseline": 68.0})
    m = held_out_metrics(frame, "age")["models"]["age"]
    assert m["mae"]["value"] == pytest.approx(np.mean([2, 1, 1, 5]))
    assert m["mae_mean_baseline"]["value"] == pytest.approx(np.mean([8, 3, 2, 12]))
    assert m["r_squared"]["value"] == pytest.approx(age_regression(frame["age"], frame["predicted_age"]).r_squared)
    assert m["n"]["value"] == 4


def test_age_scorer_reads_outputs_as_years_and_refuses_a_pvf_folder(tmp_path: Path) -> None:
    from raypipe.io.errors import RaypipeInputError
    from raypipe.scoring.pvf import load_age_regressor, load_pvf

    folder = save_age_dir(tmp_path / "age", mean=70.0, sd=8.0)
    images = [np.random.default_rng(i).random((200, 100)).astype(np.float32) for i in range(3)]
    raw = load_pvf(folder).outputs(images)
    assert np.allclose(load_age_regressor(folder)(images), 70.0 + 8.0 * raw)
    with pytest.raises(RaypipeInputError, match="not an age regressor"):
        load_age_regressor(save_pvf_dir(tmp_path / "pvf"))


def test_age_configs_follow_the_pvf_input() -> None:
    from raypipe.config import load_config
    from raypipe.tasks import get_task
    from raypipe.train.age import AgeRegressorConfig
    from raypipe.train.pvf import PVFTrainConfig

    task = get_task("age")
    assert task.config_class() is AgeRegressorConfig and issubclass(AgeRegressorConfig, PVFTrainConfig)
    paper = load_config(AgeRegressorConfig, CONFIGS / "age.yaml", {"pretrained": "none", "pretrained_path": None})
    pvf = load_config(PVFTrainConfig, CONFIGS / "pvf.yaml", {"pretrained": "none", "pretrained_path": None})
    assert paper.model == pvf.model == "pvf_efficientnet_b4" and paper.preprocess() == pvf.preprocess()
    assert (paper.label, paper.monitor, paper.monitor_mode) == ("age", "val_mae", "min")


@pytest.mark.slow
def test_tiny_age_regressor_beats_the_training_mean(ray_session: None, xray_cohort: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    """On real synthetic radiographs the regressor's held-out MAE is below predicting the training mean."""
    from raypipe.config import load_config
    from raypipe.io.radiograph import read_radiograph
    from raypipe.scoring.pvf import load_age_regressor
    from raypipe.train.age import AgeRegressorConfig, fit_age

    manifest, _ = xray_cohort
    fit_age(load_config(AgeRegressorConfig, CONFIGS / "age_tiny.yaml"), str(manifest), str(tmp_path))
    held = pd.read_parquet(tmp_path / "age_predictions.parquet")
    assert len(held) >= 150 and set(held["split"]) <= {"val", "test"}
    model_mae = np.mean(np.abs(held["predicted_age"] - held["age"]))
    mean_mae = np.mean(np.abs(held["mean_baseline"] - held["age"]))  # the same rows, the training mean
    assert model_mae < mean_mae, (model_mae, mean_mae)
    assert np.corrcoef(held["age"], held["predicted_age"])[0, 1] > 0.1
    # the scorer generation uses repeats the training input: a held-out study gets the same predicted age
    row = pd.read_csv(manifest, dtype={"study_id": str}).set_index("study_id").loc[held["study_id"].iloc[0]]
    pixels = read_radiograph(manifest.parent / row["image_path"]).pixels
    assert load_age_regressor(tmp_path)([pixels])[0] == pytest.approx(held["predicted_age"].iloc[0], abs=1e-3)
