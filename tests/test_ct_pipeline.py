"""`raypipe preprocess ct` end to end on a real local Ray: synthetic DICOM cohort + the real example CT."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import pandas as pd
import pytest

from raypipe.data.ct_pipeline import QC_DIR, load_ct_shards, preprocess_ct
from raypipe.preprocess.config import CTPreprocessConfig

N_SYNTH = 3
CFG = CTPreprocessConfig(shard_size=2)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from raypipe.ray_utils import init_ray

    started = not ray.is_initialized()
    init_ray()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, shared_data: Path) -> Path:
    """Synthetic studies, one real CT row (absolute shared paths) and one row whose mask folder is missing."""
    synth = pytest.importorskip("raypipe.data.synth")
    root = tmp_path_factory.mktemp("ct_cohort")
    m = pd.read_csv(synth.synth_cohort("ct", root / "cohort", N_SYNTH, seed=3, workers=1), dtype={"patient_id": str, "study_id": str})
    d = shared_data / "ct" / "totalseg_example"
    real = m.iloc[[0]].assign(
        patient_id="REAL01", study_id="REAL01_CT", image_path=str(d / "example_ct.nii.gz"),
        mask_path=str(d / "example_seg"), mask_labels=None,
        body_mask_path=str(d / "extra_head_labels" / "spine_report_totalseg_vertebrae_body.nii.gz"),
    )
    broken = m.iloc[[1]].assign(patient_id="BROKEN01", study_id="BROKEN01_CT", mask_path="masks/DOES_NOT_EXIST",
                                body_mask_path=None)
    path = root / "cohort" / "manifest_test.csv"
    pd.concat([m, real, broken], ignore_index=True).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(ray_local, manifest: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct_shards")
    return out, preprocess_ct(manifest, out, config=CFG)


def test_qc_reports_every_study(run):
    out, summary = run
    qc = pd.read_csv(out / "qc.csv", dtype={"study_id": str}, keep_default_na=False)
    assert len(qc) == N_SYNTH + 2 == summary["studies"]
    by = qc.set_index("study_id")
    assert by.loc["BROKEN01_CT", "status"] == "skipped"
    assert "DOES_NOT_EXIST" in by.loc["BROKEN01_CT", "message"]
    assert (qc["status"] == "ok").sum() == N_SYNTH + 1 == summary["ok"]
    assert "T12 may be truncated" in by.loc["REAL01_CT", "warnings"]
    assert by.loc["REAL01_CT", "spacing_mm"] == "3.000x3.000x3.000"
    assert summary["shards"] == 3 and summary["shards_written"] == 3
    pictures = by["qc_png"]
    assert pictures["BROKEN01_CT"] == ""  # its mask folder is missing: nothing read, nothing drawn
    for sid in [s for s in by.index if s != "BROKEN01_CT"]:
        assert pictures[sid].startswith("qc/") and sid not in pictures[sid] and "REAL01" not in pictures[sid]
        assert (out / pictures[sid]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["qc_contact_sheet"] == str(out / "qc" / "contact_sheet.png")
    assert (out / "qc" / "contact_sheet.png").stat().st_size > 10_000


def test_shards_hold_crops_and_manifest_columns(run):
    out, _ = run
    df = load_ct_shards(out, backend="pandas")
    assert sorted(df["study_id"]) == sorted([f"SYN{i:05d}_CT" for i in range(N_SYNTH)] + ["REAL01_CT"])
    for _, r in df.iterrows():
        s = r["n_slices"]
        assert r["bone"].shape == (s, 96, 96) and r["bone"].dtype == np.float16
        assert r["bone_muscle"].shape == (s, 96, 144)
        assert len(r["slice_level"]) == len(r["slice_z_mm"]) == s
        assert r["slice_level"][0] == "T12" and r["slice_level"][-1] == "L4"
    for c in ("time_days", "event", "age", "sex", "split"):
        assert c in df.columns
    assert "image_path" not in df.columns and "mask_path" not in df.columns
    real = df.set_index("study_id").loc["REAL01_CT"]
    assert real["n_slices"] == 56


def test_rerun_skips_complete_shards(run, manifest: Path):
    out, first = run
    files = sorted(out.glob("part-*.parquet"))
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    # Simulate a job killed while writing the last shard: its QC part (the completion mark) is missing.
    last = sorted((out / QC_DIR).glob("part-*.csv"))[-1]
    last.unlink()
    again = preprocess_ct(manifest, out, config=CFG)
    assert again["shards_written"] == 1 and again["shards_reused"] == 2
    now = {f.name: f.stat().st_mtime_ns for f in sorted(out.glob("part-*.parquet"))}
    assert now.keys() == mtimes.keys()
    assert all(now[k] == v for k, v in mtimes.items() if not k.startswith(last.stem))  # complete shards untouched
    assert again["ok"] == first["ok"] and again["skipped"] == first["skipped"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp files left behind


def test_training_batches_from_ray_dataset(run, ray_local):
    """The trainers' collate (`SliceBatch`) on real shards through Ray Data: 14 slices, seeded per study and epoch."""
    from raypipe.data.collate import SliceBatch, StudyMoves

    out, _ = run
    ds = load_ct_shards(out, backend="ray")
    assert ds.count() == N_SYNTH + 1
    train = SliceBatch("bone_muscle", 14, True, seed=0, epoch=1, clinical=None, targets=["fracture_5y"])
    batch = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    b1, b2 = train(batch), train(batch)
    assert b1["x"].shape == (4, 14, 1, 96, 144) and b1["x"].dtype == torch.float32
    assert torch.equal(b1["x"], b2["x"])  # same seed, epoch and study: same slices
    other = SliceBatch("bone_muscle", 14, True, seed=0, epoch=2, clinical=None, targets=[])(batch)
    centred = SliceBatch("bone", 14, False, seed=0, epoch=0, clinical=None, targets=[])(batch)
    assert centred["x"].shape == (4, 14, 1, 96, 96)
    n = int(np.asarray(batch["bone"][0]).shape[0]) if np.asarray(batch["bone"][0]).dtype != object else len(batch["bone"][0])
    assert n >= 14 and other["x"].shape == b1["x"].shape
    moved = SliceBatch("bone_muscle", 14, True, seed=0, epoch=1, clinical=None, targets=[],
                       moves=StudyMoves(1.0, 0.0, seed=0))(batch)
    assert torch.equal(moved["x"], torch.flip(b1["x"], dims=[-1]))  # same slices, every one flipped
