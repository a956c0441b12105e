"""Diff-X scores: BpVF/GpVF aggregation and risk groups by hand, and the whole chain on a tiny cohort."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from _diffx_data import save_diffx_dir, save_pvf_dir, synthetic_cohort
from raypipe.generate import aggregate_scores, future_prompts


def test_aggregation_matches_hand_computation() -> None:
    # year 1 mean 0.5; year 5 mean 0.6 (SD 0.1); year 10 mean 0.6 -> GpVF 0.6 at year 5 (first of the tie)
    gpvf = {10: [0.55, 0.65, 0.6], 1: [0.4, 0.5, 0.6], 5: [0.7, 0.5, 0.6]}
    r = aggregate_scores(0.3, gpvf)
    assert r["gpvf_by_year"]["1"]["mean"] == pytest.approx(0.5)
    assert r["gpvf_by_year"]["5"]["sd"] == pytest.approx(0.1)
    assert r["gpvf_by_year"]["10"]["sd"] == pytest.approx(0.05)
    assert r["gpvf"] == pytest.approx(0.6) and r["gpvf_year"] == 5.0
    assert r["uncertainty"] == pytest.approx(0.1)
    assert r["group"] == "LH"  # BpVF 0.3 < 0.5 and GpVF 0.6 >= 0.6
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
    means = [v["mean"] for v in rec["gpvf_by_year"].values()]
    assert rec["gpvf"] == pytest.approx(max(means)) and rec["group"] in ("LL", "LH", "HIGH")
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
        res = generate_cohort(str(manifest), str(ldm), str(tmp_path / "batch"), str(pvf), cfg)
    n = len(pd.read_csv(manifest))
    assert res["studies"] == n
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Diff-X: ")]
    assert len(lines) == n and lines[-1].startswith(f"Diff-X: {n}/{n} studies done") and "left" in lines[0]
    assert len(list((tmp_path / "batch" / "studies").glob("*/generation.json"))) == n
    preds = read_predictions(res["predictions"])
    assert set(preds["model"]) == {"diffx"} and len(preds) == n
    assert {"bpvf", "group", "gpvf_sd"} <= set(preds.columns)
    assert set(preds["group"]) <= {"LL", "LH", "HIGH"}
    metrics = json.loads((tmp_path / "batch" / "diffx_metrics.json").read_text())
    assert metrics["n"] == n and sum(metrics["groups"].values()) == n
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
    report = evaluate(res["predictions"], tmp_path / "eval", n_boot=20)
    assert "diffx" in report["models"]
    assert (tmp_path / "eval" / "report.html").exists()
