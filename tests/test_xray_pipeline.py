"""X-ray Ray Data pipeline: synthetic radiographs + a DRR of the real CT + the real DICOM radiographs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raypipe.data.shards import shard_sizes
from raypipe.data.xray_pipeline import NO_KEYPOINTS, load_xray_shards, preprocess_xray
from raypipe.preprocess.config import XrayPreprocessConfig

REAL_XRAYS = (
    "fo_dicom/CR-MONO1-10-chest",
    "fo_dicom/GH342.dcm",
    "fo_dicom/CR-ModalitySequenceLUT.dcm",
    "pydicom_data/RG3_J2KR.dcm",
)


@pytest.fixture(scope="module")
def cohort(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One manifest: 2 synthetic X-rays (keypoints), the real CT's DRR (keypoints), 4 real DICOMs (none)."""
    from raypipe.data.drr import synth_drr
    from raypipe.data.synth import synth_cohort

    root = tmp_path_factory.mktemp("xray_cohort")
    synth = pd.read_csv(synth_cohort("xray", root / "synth", patients=2, seed=7, workers=1), dtype={"sex": str})
    for c in ("image_path", "keypoints_path"):
        synth[c] = [str(root / "synth" / v) for v in synth[c]]
    d = shared_data / "ct" / "totalseg_example"
    drr = synth_drr(d / "example_ct.nii.gz", d / "example_seg", root / "drr")
    drr_row = pd.read_csv(drr["manifest"])
    drr_row["image_path"] = drr["image"]
    drr_row["keypoints_path"] = drr["keypoints"]
    real = pd.DataFrame([
        {"patient_id": f"REAL{i}", "study_id": f"REAL{i}_XR", "modality": "XR",
         "image_path": str(shared_data / "xray" / rel), "time_days": 365.0, "event": 0}
        for i, rel in enumerate(REAL_XRAYS)
    ])
    keep = ["patient_id", "study_id", "modality", "image_path", "time_days", "event", "keypoints_path",
            "age", "sex", "bmi", "prevalent_fracture"]
    table = pd.concat([synth[[c for c in keep if c in synth]], drr_row, real], ignore_index=True)
    manifest = root / "manifest.csv"
    table.to_csv(manifest, index=False)
    return {"root": root, "manifest": manifest, "n_keypoints": 3, "n_real": len(REAL_XRAYS)}


def test_pipeline_writes_shards_and_qc_and_is_idempotent(cohort, ray_session, tmp_path: Path) -> None:
    out = tmp_path / "xr"
    cfg = XrayPreprocessConfig(shard_size=4)
    summary = preprocess_xray(cohort["manifest"], out, config=cfg)
    assert summary["studies"] == cohort["n_keypoints"] + cohort["n_real"]
    assert summary["ok"] == cohort["n_keypoints"] and summary["error"] == 0
    assert summary["skipped"] == cohort["n_real"]
    n_shards = len(shard_sizes(summary["studies"], 4))  # 4, then smaller ones at the end
    assert summary["shards"] == n_shards and summary["shards_written"] == n_shards

    qc = pd.read_csv(out / "qc.csv", dtype={"study_id": str}, keep_default_na=False)
    assert len(qc) == summary["studies"] and qc["study_id"].is_unique
    real = qc[qc["study_id"].str.startswith("REAL")]
    assert set(real["status"]) == {"skipped"}
    assert all(NO_KEYPOINTS in m for m in real["message"]), real["message"].tolist()
    assert (real["image_rows"].astype(int) > 0).all(), "real radiographs must still be read"
    ok = qc[qc["status"] == "ok"]
    assert set(ok["keypoints_source"]) == {"manifest"}
    # a QC picture per study that could be read (skipped ones too: they show why), named by a hash
    assert qc["qc_png"].str.match(r"^qc/[0-9a-f]{16}\.png$").all() and qc["qc_png"].is_unique
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in qc["qc_png"])
    assert summary["qc_contact_sheet"] and (out / "qc" / "contact_sheet.png").exists()

    df = load_xray_shards(out, backend="pandas")
    assert len(df) == cohort["n_keypoints"]
    for col in ("patient_id", "study_id", "image", "keypoints", "keypoints_source", "time_days", "event"):
        assert col in df.columns, col
    assert "image_path" not in df.columns and "keypoints_path" not in df.columns
    for image, kp in zip(df["image"], df["keypoints"]):
        assert image.shape == (5, 384, 384) and image.dtype == np.float16
        assert kp.shape == (5, 2)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    drr_row = df[df["study_id"].str.startswith("DRR_")].iloc[0]
    drr_kp = json.loads((cohort["root"] / "drr" / "keypoints.json").read_text())
    np.testing.assert_allclose(drr_row["keypoints"], [drr_kp[f"L{i}"] for i in range(1, 6)], atol=1e-3)

    ds = load_xray_shards(out, backend="ray")
    assert ds.count() == cohort["n_keypoints"]

    parquet = sorted(out.glob("part-*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in parquet}
    again = preprocess_xray(cohort["manifest"], out, config=cfg)
    assert again["shards_written"] == 0 and again["shards_reused"] == n_shards
    assert again["ok"] == summary["ok"]
    assert {p: p.stat().st_mtime_ns for p in parquet} == stamps, "completed shards must not be rewritten"
    assert not list(out.rglob(".*")), "temporary files left behind"


def test_implausible_keypoints_are_skipped_not_used(cohort, tmp_path: Path) -> None:
    table = pd.read_csv(cohort["manifest"], dtype={"sex": str})
    row = table[table["study_id"].str.startswith("SYN")].iloc[[0]].copy()
    kp = json.loads(Path(row["keypoints_path"].iloc[0]).read_text())
    kp["L2"], kp["L3"] = kp["L3"], kp["L2"]
    bad = tmp_path / "swapped.json"
    bad.write_text(json.dumps(kp))
    row["keypoints_path"] = str(bad)
    manifest = tmp_path / "manifest.csv"
    row.to_csv(manifest, index=False)
    summary = preprocess_xray(manifest, tmp_path / "out", use_ray=False)
    assert summary["ok"] == 0 and summary["skipped"] == 1
    qc = pd.read_csv(tmp_path / "out" / "qc.csv", keep_default_na=False)
    assert "implausible keypoints" in qc.loc[0, "message"] and "top to bottom" in qc.loc[0, "message"]
    assert qc.loc[0, "keypoints_source"] == "manifest"
    assert not list((tmp_path / "out").glob("part-*.parquet"))


def test_keypoint_model_fallback(cohort, tmp_path: Path) -> None:
    """Without keypoints_path a configured model predicts them (random weights: any QC outcome but error)."""
    import torch

    from raypipe.models.registry import build_model

    weights = tmp_path / "kp.pt"
    torch.manual_seed(0)
    torch.save(build_model("keypoints_tiny").state_dict(), weights)
    table = pd.read_csv(cohort["manifest"], dtype={"sex": str})
    rows = table[table["study_id"].str.startswith("SYN")].iloc[:1].copy()
    rows["keypoints_path"] = None
    manifest = tmp_path / "manifest.csv"
    rows.to_csv(manifest, index=False)
    cfg = XrayPreprocessConfig(keypoint_model_path=str(weights), keypoint_model_name="keypoints_tiny",
                               keypoint_input_size=128)
    summary = preprocess_xray(manifest, tmp_path / "out", config=cfg, use_ray=False)
    assert summary["error"] == 0 and summary["ok"] + summary["skipped"] == 1
    qc = pd.read_csv(tmp_path / "out" / "qc.csv", keep_default_na=False)
    assert qc.loc[0, "keypoints_source"] == "model"
    assert qc.loc[0, "keypoint_confidence"] != ""
    if qc.loc[0, "status"] == "skipped":
        assert "implausible keypoints" in qc.loc[0, "message"]
