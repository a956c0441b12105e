"""Diff-X scores: BpVF/GpVF aggregation and risk groups by hand, and the whole chain on a tiny cohort."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _diffx_data import save_age_dir, save_diffx_dir, save_pvf_dir, synthetic_cohort
from raypipe.generate import aggregate_scores, future_prompts
from raypipe.metrics.diffx import age_regression


def test_aggregation_matches_hand_computation() -> None:
    # year 1 mean 0.5; year 5 mean 0.6 (SD 0.1); year 10 mean 0.6 (SD 0.05)
    gpvf = {10: [0.55, 0.65, 0.6], 1: [0.4, 0.5, 0.6], 5: [0.7, 0.5, 0.6]}
    r = aggregate_scores(0.3, gpvf)
    assert r["gpvf_by_year"]["1"]["mean"] == pytest.approx(0.5)
    assert r["gpvf_by_year"]["5"]["sd"] == pytest.approx(0.1)
    assert r["gpvf_by_year"]["10"]["sd"] == pytest.approx(0.05)
    # thesis: GpVF = seed mean of the 10-year image, uncertainty its SD over seeds
    assert r["gpvf_rule"] == "horizon_mean" and r["gpvf"] == pytest.approx(0.6) and r["gpvf_year"] == 10.0
    assert r["uncertainty"] == pytest.approx(0.05)
    assert r["group"] == "LH"  # BpVF 0.3 < 0.5 and GpVF 0.6 >= 0.6
    # the named option: maximum over years of the seed means (year 5 and 10 tie at 0.6: the earliest)
    m = aggregate_scores(0.3, gpvf, rule="max_over_years")
    assert m["gpvf"] == pytest.approx(0.6) and m["gpvf_year"] == 5.0 and m["uncertainty"] == pytest.approx(0.1)
    rising = {1: [0.9, 0.9], 10: [0.2, 0.4]}
    assert aggregate_scores(0.3, rising)["gpvf"] == pytest.approx(0.3)  # not the larger 1-year score
    assert aggregate_scores(0.3, rising)["group"] == "LL"
    assert aggregate_scores(0.3, rising, rule="max_over_years")["group"] == "LH"
    # without a 10-year image the latest generated year is scored and named
    assert aggregate_scores(0.3, {1: [0.1], 5: [0.7]})["gpvf_year"] == 5.0
    with pytest.raises(ValueError, match="gpvf_rule"):
        aggregate_scores(0.3, gpvf, rule="mean_of_years")
    assert aggregate_scores(0.5, gpvf)["group"] == "HIGH"  # BpVF >= 0.5 regardless of GpVF
    assert aggregate_scores(0.49, {1: [0.59, 0.59]})["group"] == "LL"
    assert aggregate_scores(0.49, {1: [0.59]}, low=0.6, high=0.55)["group"] == "LH"  # thresholds configurable
    assert aggregate_scores(0.2, {1: [0.3]})["uncertainty"] == 0.0  # one seed: no spread
    assert aggregate_scores(None, {1: [0.3]})["group"] is None


def test_future_prompts_add_years_to_age() -> None:
    base, prompts = future_prompts(70.2, "M", [1, 5, 10, 3.4])
    assert base == "An image of 70 years old male"
    assert prompts[10.0] == "An image of 80 years old male" and prompts[3.4] == "An image of 74 years old male"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Synthetic cohort, an (untrained) tiny Diff-X folder and a tiny pVF folder."""
    from raypipe.models.registry import build_model

    base = tmp_path_factory.getbasetemp()
    manifest = synthetic_cohort(base)
    torch.manual_seed(0)
    ldm = save_diffx_dir(build_model("diffx_tiny"), base / "chain_ldm", sampler={"steps": 3, "eta": 0.5})
    return manifest, ldm, save_pvf_dir(base / "chain_pvf")


def test_generate_cli_writes_images_and_scores(folders: tuple[Path, Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from raypipe.cli import add_generate_arguments
    from raypipe.generate import generate_cli

    manifest, ldm, pvf = folders
    row = pd.read_csv(manifest).iloc[0]
    parser = add_generate_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--image", str(manifest.parent / row["image_path"]), "--age", str(row["age"]),
                              "--sex", row["sex"], "--years", "1,5,10", "--seeds", "2", "--model", str(ldm),
                              "--pvf", str(pvf), "--out", str(tmp_path / "gen"), "--last-followup", "2.5"])
    assert generate_cli(args) == 0
    err = capsys.readouterr().err  # progress on stderr: inversion + denoising steps (3 + 3), rate and ETA
    assert "Diff-X 4 year(s) x 2 seed(s)" in err and "6/6" in err and "step" in err
    rec = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert rec["years"] == [1.0, 5.0, 10.0, 2.5] and rec["seeds"] == [0, 1]
    assert len(list((tmp_path / "gen").glob("year*_seed*.png"))) == 8
    assert rec["prompts"]["10"].startswith(f"An image of {int(round(row['age'])) + 10} years old")
    assert 0 <= rec["bpvf"] <= 1 and set(rec["gpvf_by_year"]) == {"1", "5", "10", "2.5"}
    assert rec["gpvf"] == pytest.approx(rec["gpvf_by_year"]["10"]["mean"]) and rec["gpvf_year"] == 10.0
    assert rec["group"] in ("LL", "LH", "HIGH")
    # same seeds, same images
    again = json.loads(json.dumps(rec))
    assert generate_cli(args) == 0
    assert json.loads((tmp_path / "gen" / "generation.json").read_text())["gpvf_by_year"] == again["gpvf_by_year"]


def test_batch_pipeline_then_evaluate(ray_session: None, folders: tuple[Path, Path, Path], tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    from raypipe.data.generate_pipeline import GenerateJobConfig, generate_cohort
    from raypipe.evaluate import evaluate
    from raypipe.predictions import read_predictions

    manifest, ldm, pvf = folders
    table = pd.read_csv(manifest)
    # a "real follow-up" radiograph for half the patients (their own image, 2 years on) -> pVF agreement block
    half = table.index < len(table) // 2
    table.loc[half, "followup_image_path"] = table.loc[half, "image_path"]
    table.loc[half, "followup_years"] = 2.0
    manifest = manifest.parent / "manifest_followup.csv"
    table.to_csv(manifest, index=False)
    cfg = GenerateJobConfig(years=[1, 10], seeds=2, steps=3, include_last_followup=False, write_images=False,
                            n_boot=20, image_quality=True)
    with caplog.at_level("INFO", logger="raypipe.data.generate_pipeline"):
        res = generate_cohort(str(manifest), str(ldm), str(tmp_path / "batch"), str(pvf), cfg,
                              age_dir=str(save_age_dir(tmp_path / "age")))
    n = len(pd.read_csv(manifest))
    assert res["studies"] == n
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Diff-X: ")]
    assert len(lines) == n and lines[-1].startswith(f"Diff-X: {n}/{n} studies done") and "left" in lines[0]
    assert len(list((tmp_path / "batch" / "studies").glob("*/generation.json"))) == n
    preds = read_predictions(res["predictions"])
    patients = pd.read_csv(manifest)["patient_id"].nunique()
    assert set(preds["model"]) == {"diffx"} and len(preds) == patients and preds["patient_id"].is_unique
    studies = pd.read_parquet(tmp_path / "batch" / "studies.parquet")
    assert len(studies) == n and (studies["gpvf_year"] == 10.0).all()
    # the prompts are the training prompts: this model was trained with clinical attributes (BMI among them)
    first = json.loads((tmp_path / "batch" / "studies" / str(table["study_id"].iloc[0]) / "generation.json").read_text())
    assert first["clinical_prompts"] is True and "BMI" in first["prompts"]["10"]
    assert {"bpvf", "group", "gpvf_sd"} <= set(preds.columns)
    assert set(preds["group"]) <= {"LL", "LH", "HIGH"}
    metrics = json.loads((tmp_path / "batch" / "diffx_metrics.json").read_text())
    assert metrics["n"] == patients and sum(metrics["groups"].values()) == patients
    assert {"cox_univariable", "cox_age_sex_bmi", "cox_frax_mof", "td_auroc_gpvf", "logrank"} <= set(metrics)
    quality = metrics["image_quality"]
    assert set(quality) == {"diffx_ms_ssim", "diffx_psnr", "single_ms_ssim", "single_psnr"}
    assert all(q["n"] == n for q in quality.values()) and 0 <= quality["diffx_ms_ssim"]["mean"] <= 1
    assert quality["diffx_ms_ssim"]["mean"] == pytest.approx(preds["quality_diffx_ms_ssim"].mean())
    agree = metrics["followup_agreement"]
    followed = preds.dropna(subset=["pvf_followup_real"])
    assert agree["n"] == len(followed) == n // 2
    diff = followed["pvf_followup_generated"] - followed["pvf_followup_real"]
    assert agree["bland_altman"]["mean_difference"] == pytest.approx(diff.mean())
    for sid, followed_row in zip(table["study_id"].astype(str), half):  # the follow-up year is generated too
        rec = json.loads((tmp_path / "batch" / "studies" / sid / "generation.json").read_text())
        assert ("2" in rec["gpvf_by_year"]) == bool(followed_row), (sid, list(rec["gpvf_by_year"]))
    # the age check: every generated image (studies x 2 years x 2 seeds, + the follow-up year of half the
    # studies) has its predicted and prompted age
    images = pd.read_parquet(tmp_path / "batch" / "age_predictions.parquet")
    assert len(images) == n * 2 * 2 + (n // 2) * 2 and set(images["year"]) == {1.0, 2.0, 10.0}
    ages = table.assign(study_id=table["study_id"].astype(str)).set_index("study_id")["age"]
    assert np.allclose(images["prompt_age"], images["study_id"].map(ages) + images["year"])
    expected = age_regression(images["prompt_age"], images["predicted_age"])
    check = metrics["age_regression"]
    assert check["n"] == len(images) and check["r_squared"] == pytest.approx(expected.r_squared)
    assert check["mae"] == pytest.approx(expected.mae) and check["images"] == len(images)
    report = evaluate(res["predictions"], tmp_path / "eval", n_boot=20)
    assert "diffx" in report["models"]
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "predicted vs prompted age" in html and f"{expected.r_squared:.3f}" in html


def test_participant_aggregation_takes_the_maximum_over_baseline_images() -> None:
    """Thesis Methods 7: per participant the maximum over their baseline images; one row per participant."""
    from raypipe.data.generate_pipeline import aggregate_participants, diffx_metrics

    studies = pd.DataFrame({
        "patient_id": ["A", "A", "B", "C", "C", "C"],
        "study_id": ["a1", "a2", "b1", "c1", "c2", "c3"],
        "time_days": [3000.0, 1200.0, 2000.0, 900.0, 2500.0, 400.0],
        "event": [1, 1, 0, 0, 0, 0],
        "age": [70.0, 75.0, 60.0, 66.0, 61.0, 68.0],
        "bpvf": [0.30, 0.45, 0.55, 0.10, 0.20, 0.15],
        "gpvf": [0.50, 0.65, 0.40, 0.58, 0.30, 0.20],
        "gpvf_sd": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06],
        "gpvf_year": 10.0,
    })
    out = aggregate_participants(studies).set_index("patient_id")
    assert list(out.index) == ["A", "B", "C"]
    assert out.loc["A", "bpvf"] == 0.45 and out.loc["A", "gpvf"] == 0.65 and out.loc["A", "score"] == 0.65
    assert out.loc["A", "gpvf_sd"] == 0.02  # the uncertainty of the image that gave the GpVF
    assert out.loc["A", "study_id"] == "a1" and out.loc["A", "time_days"] == 3000.0  # earliest baseline
    assert out.loc["A", "age"] == 70.0 and out.loc["A", "event"] == 1
    assert out.loc["C", "study_id"] == "c2" and out.loc["C", "n_images"] == 3
    # groups from the participant scores: A LH (0.45 < 0.5, 0.65 >= 0.6), B HIGH, C LL (0.58 < 0.6)
    assert out["group"].to_dict() == {"A": "LH", "B": "HIGH", "C": "LL"}
    with pytest.raises(ValueError, match="participant 'A' has several rows"):
        diffx_metrics(studies.assign(group="LL"))


def test_gpvf_is_scored_on_the_baseline_geometry(shared_data: Path, tmp_path: Path) -> None:
    """A radiograph pushed through ldm_input and cut back to its content box scores as the baseline does.

    Tolerance: after the 512 x 512 round trip, the 1024 x 512 pVF inputs differ by < 0.1 (mean absolute, in
    normalised units; 0.025 of the [0, 1] range) with identical padding, and the pVF scores by < 0.02;
    scored uncropped (the square with its padding bars) the inputs differ many times more.
    """
    from raypipe.io.radiograph import read_radiograph
    from raypipe.preprocess.pvf import crop_ldm_content, from_ldm_output, ldm_input, pvf_input
    from raypipe.scoring.pvf import load_pvf

    pixels = read_radiograph(shared_data / "xray" / "pydicom_data" / "RG1_J2KI.dcm").pixels
    assert pixels.shape[0] != pixels.shape[1]
    square = from_ldm_output(ldm_input(pixels)[0])
    back = crop_ldm_content(square, pixels.shape)
    assert abs(back.shape[0] / back.shape[1] - pixels.shape[0] / pixels.shape[1]) < 0.01
    ref, same, old = pvf_input(pixels)[0], pvf_input(back)[0], pvf_input(square)[0]
    pad = ref == ref.min()
    np.testing.assert_array_equal(pad[:, :4], (same == same.min())[:, :4])
    d_same, d_old = np.abs(ref - same).mean(), np.abs(ref - old).mean()
    assert d_same < 0.1 and d_old > 5 * d_same
    pvf = load_pvf(save_pvf_dir(tmp_path / "pvf", size=(512, 256)))
    s_ref, s_back = pvf([pixels])[0], pvf([back])[0]
    assert abs(float(s_ref) - float(s_back)) < 0.02
