"""Synthetic cohort generator: determinism, DICOM/NIfTI geometry, planted signals, Cox outcomes, atomicity."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from raypipe.data.synth import MANIFEST_COLUMNS, draw_clinical, synth_cohort
from raypipe.data.synth import cohort as cohort_mod
from raypipe.data.synth.clinical import HORIZON_5Y_DAYS

REQUIRED = ("patient_id", "study_id", "modality", "image_path", "time_days", "event")
CLINICAL = ("age", "sex", "height_cm", "weight_kg", "bmi", "smoker", "alcohol", "glucocorticoid",
            "secondary_osteoporosis", "rheumatoid_arthritis", "prior_fracture", "t2dm", "hiv", "hcv",
            "renal_failure", "frax_mof", "frax_hip")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture(scope="module")
def ct_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_cohort("ct", tmp_path_factory.mktemp("ct") / "cohort", patients=8, seed=11, workers=1)


@pytest.fixture(scope="module")
def xray_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_cohort("xray", tmp_path_factory.mktemp("xr") / "cohort", patients=6, seed=12, workers=1)


def test_deterministic_across_workers_and_both_layout(tmp_path: Path) -> None:
    m1 = synth_cohort("both", tmp_path / "w1", patients=3, seed=5, workers=1)
    m2 = synth_cohort("both", tmp_path / "w2", patients=3, seed=5, workers=2)
    assert _tree_digest(m1.parent) == _tree_digest(m2.parent)
    df = pd.read_csv(m1)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert set(REQUIRED + CLINICAL) <= set(df.columns)
    assert len(df) == 6 and df.groupby("patient_id")["study_id"].nunique().eq(2).all()
    assert set(df["modality"]) == {"CT", "XR"}
    same = df.groupby("patient_id")[["time_days", "event", "age", "true_lp", "split"]].nunique()
    assert (same == 1).all().all()
    assert (df["time_days"] > 0).all() and df["event"].isin([0, 1]).all()
    assert set(df["split"]) <= {"train", "test"} and set(df["site"]) <= {"A", "B"}
    ct = df[df.modality == "CT"].iloc[0]
    assert (m1.parent / ct.image_path).is_dir() and (m1.parent / ct.body_mask_path).is_file()
    assert pd.isna(ct.keypoints_path) and pd.isna(ct.mask_labels)
    xr = df[df.modality == "XR"].iloc[0]
    assert pd.isna(xr.mask_path) and (m1.parent / xr.keypoints_path).is_file()
    # another seed gives other data
    m3 = synth_cohort("ct", tmp_path / "s6", patients=1, seed=6, workers=1)
    assert pd.read_csv(m3)["true_lp"].iloc[0] != df["true_lp"].iloc[0]


def test_ct_dicom_reads_back_in_hu_with_5mm_slices(ct_cohort: Path) -> None:
    df = pd.read_csv(ct_cohort)
    row = df.iloc[0]
    folder = ct_cohort.parent / row.image_path
    ds = pydicom.dcmread(next(iter(sorted(folder.glob("*.dcm")))))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert ds.PatientID == row.patient_id and float(ds.SliceThickness) == 5.0
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.RescaleIntercept) == -1024 and 0.7 <= float(ds.PixelSpacing[0]) <= 0.9
    img = _read_series(folder)
    assert img.GetSpacing()[2] == pytest.approx(5.0)
    hu = sitk.GetArrayFromImage(img)
    assert hu.min() >= -1024 and hu[0, 0, 0] < -900                 # air in the corner
    for name in ("vertebrae_T11", "vertebrae_L5", "autochthon_left", "iliopsoas_right", "vertebrae_body"):
        m = sitk.ReadImage(str(ct_cohort.parent / row.mask_path / f"{name}.nii.gz"))
        assert m.GetPixelID() == sitk.sitkUInt8 and m.GetSize() == img.GetSize()
        np.testing.assert_allclose(m.GetOrigin(), img.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(m.GetSpacing(), img.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(m.GetDirection(), img.GetDirection(), atol=1e-6)
        assert sitk.GetArrayFromImage(m).any()
    # a vertebra's mask sits on bone: world centroid of L3 maps to a bright voxel
    l3 = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_cohort.parent / row.mask_path / "vertebrae_L3.nii.gz")))
    assert hu[l3 > 0].mean() > hu[(l3 == 0) & (hu > -500)].mean() + 80


def test_planted_bone_and_muscle_signals(ct_cohort: Path) -> None:
    df = pd.read_csv(ct_cohort)
    body_hu, muscle_hu = [], []
    for row in df.itertuples():
        hu = sitk.GetArrayFromImage(_read_series(ct_cohort.parent / row.image_path)).astype(np.float32)
        md = ct_cohort.parent / row.mask_path
        body = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_cohort.parent / row.body_mask_path)))
        levels = np.zeros_like(body, dtype=bool)
        for lv in ("T12", "L1", "L2", "L3", "L4"):
            levels |= sitk.GetArrayFromImage(sitk.ReadImage(str(md / f"vertebrae_{lv}.nii.gz"))) > 0
        body_hu.append(hu[(body == 1) & levels].mean())
        auto = sum(sitk.GetArrayFromImage(sitk.ReadImage(str(md / f"autochthon_{s}.nii.gz"))) for s in ("left", "right"))
        muscle_hu.append(hu[auto > 0].mean())
    assert np.corrcoef(body_hu, df["bone_density_hu"])[0, 1] > 0.9
    assert np.corrcoef(muscle_hu, df["muscle_fat_fraction"])[0, 1] < -0.9


def test_xray_dicom_and_keypoints_on_vertebrae(xray_cohort: Path) -> None:
    df = pd.read_csv(xray_cohort)
    assert (df["modality"] == "XR").all()
    assert df["prevalent_fracture"].eq((df["deformity"] >= 0.2).astype(int)).all()
    for row in df.itertuples():
        ds = pydicom.dcmread(xray_cohort.parent / row.image_path)
        assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 12
        assert ds.PatientID == row.patient_id and 0.5 < float(ds.PixelSpacing[0]) < 1.0
        img = ds.pixel_array.astype(np.float32)
        kp = json.loads((xray_cohort.parent / row.keypoints_path).read_text())
        assert list(kp) == ["L1", "L2", "L3", "L4", "L5"]
        ys = [kp[lv][1] for lv in kp]
        assert ys == sorted(ys)                                       # L1 above L5
        bg = np.median(img)
        for x, y in kp.values():
            r, c = int(round(y)), int(round(x))
            assert 2 <= r < img.shape[0] - 2 and 2 <= c < img.shape[1] - 2
            assert img[r - 2:r + 3, c - 2:c + 3].mean() > bg


def test_cox_model_ceiling_and_event_rate() -> None:
    from sksurv.metrics import concordance_index_censored

    pts = [draw_clinical(0, i) for i in range(3000)]
    t = np.array([p.time_days for p in pts])
    e = np.array([p.event for p in pts]).astype(bool)
    lp = np.array([p.true_lp for p in pts])
    assert 0.15 <= e.mean() <= 0.25
    assert t.max() <= 3652 and t.min() >= 1
    assert concordance_index_censored(e, t, lp)[0] > 0.75
    img = np.array([p.image_lp["ct"] for p in pts])
    assert concordance_index_censored(e, t, img)[0] > 0.7
    f5 = np.array([p.fracture_5y for p in pts])
    assert np.all(f5[e & (t <= HORIZON_5Y_DAYS)] == 1) and np.all(f5[t > HORIZON_5Y_DAYS] == 0)
    assert np.all(np.isnan(f5[~e & (t <= HORIZON_5Y_DAYS)]))
    age = np.array([p.age for p in pts])
    assert 50 <= age.min() and age.max() <= 85 and 65 <= age.mean() <= 71
    assert 0.65 < np.mean([p.sex == "F" for p in pts]) < 0.8


def test_refuses_nonempty_and_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synth_cohort("xray", out, patients=1, seed=0, workers=1)
    assert (out / "keep.txt").exists()
    synth_cohort("xray", out, patients=1, seed=0, workers=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.csv").exists()

    real = cohort_mod._make_patient

    def flaky(kind, root, seed, index, split):  # noqa: ANN001, ANN202
        if index == 1:
            raise RuntimeError("interrupted")
        return real(kind, root, seed, index, split)

    monkeypatch.setattr(cohort_mod, "_make_patient", flaky)
    with pytest.raises(RuntimeError):
        synth_cohort("xray", tmp_path / "d", patients=2, seed=0, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
