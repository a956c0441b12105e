"""raypipe.io.ct and raypipe.io.masks on the real CTs and masks in ../shared/data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from raypipe.io import (
    ImageReadError,
    ImageReadWarning,
    MaskError,
    mask_edge_contact,
    read_body_mask,
    read_ct,
    read_ct_series_pydicom,
    read_masks,
)

pytestmark = pytest.mark.realdata

LEVELS = ["vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4", "vertebrae_L5"]
# SOURCE.md: mean HU inside the vertebral-body voxels of T12..L5 (whole masks x body mask label 1).
SOURCE_BODY_HU = [142, 162, 173, 177, 188, 189]


@pytest.fixture(scope="module")
def example(shared_data: Path) -> dict:
    d = shared_data / "ct" / "totalseg_example"
    ct = read_ct(d / "example_ct.nii.gz")
    masks = read_masks(d / "example_seg", ct)
    body = read_body_mask(d / "extra_head_labels" / "spine_report_totalseg_vertebrae_body.nii.gz", ct)
    return {"dir": d, "ct": ct, "masks": masks, "body": body}


@pytest.fixture(scope="module")
def tptbox(shared_data: Path) -> dict:
    d = shared_data / "ct" / "tptbox_sample"
    ct = read_ct(d / "sub-ct_label-22_ct.nii.gz")
    return {"dir": d, "ct": ct}


def _dicom_files(folder: Path) -> list[Path]:
    """Slice files sorted inferior to superior (by ImagePositionPatient z)."""
    files = [f for f in folder.iterdir() if f.is_file() and not f.name.endswith(".md")]
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def test_nifti_geometry_is_canonical_lps(example: dict) -> None:
    ct = example["ct"]
    assert ct.hu.dtype == np.float32 and ct.hu.shape == (112, 101, 122)
    assert ct.spacing == (3.0, 3.0, 3.0)
    assert ct.source_orientation == "RAS"
    assert ct.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert (ct.hu.min(), ct.hu.max()) == (-1207.0, 3382.0)
    # Canonical voxel (0, 0, 0) is the stored voxel at the patient's right, anterior, inferior corner.
    stored = sitk.ReadImage(str(example["dir"] / "example_ct.nii.gz"))
    corner = stored.TransformIndexToPhysicalPoint((121, 100, 0))
    np.testing.assert_allclose(ct.origin, corner, atol=1e-4)
    back = ct.to_sitk()
    assert back.GetSize() == (122, 101, 112)
    assert back.TransformIndexToPhysicalPoint((0, 0, 0)) == pytest.approx(corner, abs=1e-4)


def test_masks_land_on_bone(example: dict) -> None:
    ct, masks, body = example["ct"], example["masks"], example["body"]
    muscle = float(ct.hu[masks["autochthon_left"] | masks["autochthon_right"]].mean())
    assert -50 < muscle < 80  # paraspinal muscle: soft tissue
    for name, expected in zip(LEVELS, SOURCE_BODY_HU, strict=True):
        inside = masks[name] & body
        assert inside.sum() > 300, name
        mean_hu = float(ct.hu[inside].mean())
        assert mean_hu == pytest.approx(expected, abs=2), name
        assert mean_hu > muscle + 60, name
    # Canonical z grows toward superior: T12 above L1 above ... above the sacrum.
    centres = [np.nonzero(masks[n])[0].mean() for n in LEVELS + ["sacrum"]]
    assert centres == sorted(centres, reverse=True)


def test_t12_touches_the_superior_edge(example: dict) -> None:
    masks = example["masks"]
    assert mask_edge_contact(masks["vertebrae_T12"]) == ["superior"]
    assert mask_edge_contact(masks["vertebrae_L3"]) == []
    assert "vertebrae_C1" not in masks  # empty TotalSegmentator files are left out
    assert masks["vertebrae_T12"].sum() == 1822


def test_multilabel_totalseg_file_matches_folder(example: dict) -> None:
    multi = read_masks(
        example["dir"] / "extra_head_labels" / "spine_report_totalseg.nii.gz",
        example["ct"],
        labels="totalseg",
        names=LEVELS,
    )
    assert sorted(multi) == sorted(LEVELS)
    for name in LEVELS:  # v2 file vs v1 folder: different model versions, same anatomy
        a, b = multi[name], example["masks"][name]
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9, name


def test_json_label_map_and_label_errors(example: dict, tmp_path: Path) -> None:
    seg = example["dir"] / "extra_head_labels" / "spine_report_totalseg.nii.gz"
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({"29": "vertebrae_L3", "32": "vertebrae_T12"}))
    got = read_masks(seg, example["ct"], labels=str(label_map))
    assert sorted(got) == ["vertebrae_L3", "vertebrae_T12"]
    with pytest.raises(MaskError, match="label convention"):
        read_masks(seg, example["ct"])
    with pytest.raises(MaskError, match="unknown label convention 'nnunet'"):
        read_masks(seg, example["ct"], labels="nnunet")
    label_map.write_text(json.dumps({"L3": "vertebrae_L3"}))
    with pytest.raises(MaskError, match="not an integer") as err:
        read_masks(seg, example["ct"], labels=label_map)
    assert err.value.field == "L3" and str(label_map) in str(err.value)
    with pytest.raises(MaskError, match="no such mask"):
        read_masks(tmp_path / "missing", example["ct"])


def test_dicom_series_sitk_and_pydicom_agree(shared_data: Path) -> None:
    folder = shared_data / "ct" / "totalseg_example" / "example_ct_dicom"
    header = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    assert float(header.RescaleIntercept) == -1024.0
    a = read_ct(folder)
    b = read_ct_series_pydicom(folder)
    assert a.hu.shape == (20, 512, 512) and a.source_orientation == "LPS"
    assert a.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert (a.hu.min(), a.hu.max()) == (-1024.0, 1839.0)  # HU: the intercept was applied
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.origin == pytest.approx(b.origin) and a.spacing == pytest.approx(b.spacing)
    assert a.origin[2] == pytest.approx(-804.5)  # slice 0 is the most inferior


def test_tptbox_pir_ct_and_verse_masks(tptbox: dict) -> None:
    ct, d = tptbox["ct"], tptbox["dir"]
    assert ct.source_orientation == "PIR" and ct.spacing == (1.5, 1.5, 1.5)
    # Independent check of the reorientation: resample the file onto an axis-aligned LPS grid.
    stored = sitk.ReadImage(str(d / "sub-ct_label-22_ct.nii.gz"))
    corners = np.array(
        [stored.TransformIndexToPhysicalPoint((i, j, k)) for i in (0, 72) for j in (0, 46) for k in (0, 72)]
    )
    lo = corners.min(axis=0)
    size = tuple(int(round(n)) + 1 for n in (corners.max(axis=0) - lo) / 1.5)
    ref = sitk.Resample(
        stored,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        tuple(lo),
        (1.5,) * 3,
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        -5000,
        stored.GetPixelID(),
    )
    np.testing.assert_array_equal(ct.hu, sitk.GetArrayFromImage(ref).astype(np.float32))
    assert ct.origin == pytest.approx(tuple(lo))
    vert = read_masks(d / "sub-ct_seg-vert_label-22_msk.nii.gz", ct, labels="verse")
    assert sorted(vert) == ["vertebrae_L2", "vertebrae_L3", "vertebrae_L4"]
    assert float(ct.hu[vert["vertebrae_L3"]].mean()) == pytest.approx(244, abs=3)
    assert float(ct.hu[vert["vertebrae_L2"]].mean()) == pytest.approx(298, abs=3)
    assert mask_edge_contact(vert["vertebrae_L3"]) == []
    sub = read_masks(d / "sub-ct_seg-subreg_label-22_msk.nii.gz", ct, labels="verse")
    body = read_body_mask(d / "sub-ct_seg-subreg_label-22_msk.nii.gz", ct, body_label=(49, 50))
    np.testing.assert_array_equal(sub["vertebral_body"], body)
    vertebrae = vert["vertebrae_L2"] | vert["vertebrae_L3"] | vert["vertebrae_L4"]
    assert body.sum() > 10000 and (body & vertebrae).sum() > 0.95 * body.sum()


def test_orientation_independence(example: dict, tmp_path: Path) -> None:
    d = example["dir"]
    pir = tmp_path / "example_ct_pir.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(d / "example_ct.nii.gz")), "PIR"), str(pir))
    t12_pir = tmp_path / "vertebrae_T12.nii.gz"
    t12 = sitk.ReadImage(str(d / "example_seg" / "vertebrae_T12.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(t12, "PIR"), str(t12_pir))
    ct = read_ct(pir)
    assert ct.source_orientation == "PIR"
    np.testing.assert_array_equal(ct.hu, example["ct"].hu)
    assert ct.origin == pytest.approx(example["ct"].origin) and ct.spacing == example["ct"].spacing
    # A PIR mask on the RAS-read CT lands on the same voxels as the original RAS mask.
    got = read_masks(tmp_path, example["ct"], names=["vertebrae_T12"])
    np.testing.assert_array_equal(got["vertebrae_T12"], example["masks"]["vertebrae_T12"])


def test_mask_on_another_grid_is_resampled(example: dict, tmp_path: Path) -> None:
    src = sitk.ReadImage(str(example["dir"] / "example_seg" / "vertebrae_L3.nii.gz"))
    fine = sitk.Resample(
        src,
        [2 * n for n in src.GetSize()],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        src.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, -0.25)),
        (1.5, 1.5, 1.5),
        src.GetDirection(),
        0,
        sitk.sitkUInt8,
    )
    (tmp_path / "fine").mkdir()
    sitk.WriteImage(fine, str(tmp_path / "fine" / "vertebrae_L3.nii.gz"))
    got = read_masks(tmp_path / "fine", example["ct"])["vertebrae_L3"]
    ref = example["masks"]["vertebrae_L3"]
    assert 2 * (got & ref).sum() / (got.sum() + ref.sum()) > 0.97


def test_mask_outside_the_ct_is_rejected(shared_data: Path, tptbox: dict) -> None:
    dicom_ct = read_ct(shared_data / "ct" / "totalseg_example" / "example_ct_dicom")
    with pytest.raises(MaskError, match="does not overlap the CT"):
        read_masks(tptbox["dir"] / "sub-ct_seg-vert_label-22_msk.nii.gz", dicom_ct, labels="verse")


def test_read_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_ct(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="folder is empty"):
        read_ct(tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image\n")
    with pytest.raises(ImageReadError, match="no DICOM image series"):
        read_ct(tmp_path / "notes")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        read_ct(broken)


def test_truncated_slice_is_named(copy_shared: Callable[..., Path]) -> None:
    folder = copy_shared("ct/totalseg_example/example_ct_dicom", "series")
    victim = _dicom_files(folder)[7]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    for reader in (read_ct, read_ct_series_pydicom):
        with pytest.raises(ImageReadError, match="truncated") as err:
            reader(folder)
        assert err.value.path == str(victim) and victim.name in str(err.value)
    with pytest.raises(ImageReadError, match="truncated") as err:
        read_ct(victim)
    assert victim.name in str(err.value)


def test_two_series_picks_the_largest_with_a_warning(copy_shared: Callable[..., Path]) -> None:
    folder = copy_shared("ct/totalseg_example/example_ct_dicom", "two_series")
    files = _dicom_files(folder)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1" if i < 14 else "1.2.826.0.1.3680043.8.498.2"
        ds.save_as(f)
    with pytest.warns(ImageReadWarning, match="2 DICOM series") as record:
        ct = read_ct(folder)
    assert str(folder) in str(record[0].message)
    assert ct.hu.shape == (14, 512, 512) and ct.origin[2] == pytest.approx(-804.5)
    small = read_ct(folder, series_uid="1.2.826.0.1.3680043.8.498.2")
    assert small.hu.shape == (6, 512, 512) and small.origin[2] == pytest.approx(-804.5 + 14 * 2.0)
    with pytest.raises(ImageReadError, match="not found") as err:
        read_ct(folder, series_uid="1.2.3")
    assert err.value.field == "series_uid"


def test_missing_slice_warns_about_spacing(copy_shared: Callable[..., Path]) -> None:
    folder = copy_shared("ct/totalseg_example/example_ct_dicom", "gap")
    _dicom_files(folder)[10].unlink()
    with pytest.warns(ImageReadWarning, match="uneven slice spacing"):
        ct = read_ct(folder)
    assert ct.hu.shape[0] == 19
