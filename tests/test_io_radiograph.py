"""raypipe.io.radiograph and raypipe.io.keypoints on the real radiographs in ../shared/data/xray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from raypipe.io import (
    ImageReadError,
    KeypointsError,
    Radiograph,
    read_keypoints,
    read_radiograph,
    write_keypoints,
    write_radiograph_png,
)
from raypipe.io.radiograph import window_to_unit

DICOM_FILES = {
    "fo_dicom/CR-MONO1-10-chest": ("MONOCHROME1", (440, 440), None),
    "fo_dicom/CR-ModalitySequenceLUT.dcm": ("MONOCHROME1", (1576, 1976), (0.15, 0.15)),
    # GH133: VOI LUT Sequence (first of 3 LUTs used), JPEG lossless, ImagerPixelSpacing only.
    "fo_dicom/GH133.dcm": ("MONOCHROME2", (3062, 2394), (0.09409090909091, 0.09409090909091)),
    "fo_dicom/GH342.dcm": ("MONOCHROME2", (512, 512), (0.9765625, 0.9765625)),
    "pydicom_data/RG1_J2KI.dcm": ("MONOCHROME1", (1955, 1841), None),  # PixelSpacing "0.000\0.000"
    "pydicom_data/RG3_J2KR.dcm": ("MONOCHROME1", (1760, 1760), None),
    "pydicom_data/vlut_04.dcm": ("MONOCHROME2", (512, 512), None),
    "pydicom_data/mlut_18.dcm": ("MONOCHROME2", (512, 512), None),
}


def _region(a: np.ndarray, r0: float, r1: float, c0: float, c1: float) -> float:
    rows, cols = a.shape
    return float(a[int(rows * r0) : int(rows * r1), int(cols * c0) : int(cols * c1)].mean())


def _xray(shared_data: Path, name: str) -> Path:
    return shared_data / "xray" / name


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(DICOM_FILES))
def test_every_dicom_reads_to_unit_range(shared_data: Path, name: str) -> None:
    photometric, shape, spacing = DICOM_FILES[name]
    image = read_radiograph(_xray(shared_data, name))
    assert isinstance(image, Radiograph)
    assert image.pixels.dtype == np.float32 and image.shape == shape
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert image.pixels.std() > 0.05
    assert image.photometric == photometric
    assert image.pixel_spacing == (None if spacing is None else pytest.approx(spacing))
    assert image.path.endswith(Path(name).name)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["fo_dicom/CR-MONO1-10-chest", "pydicom_data/RG1_J2KI.dcm"])
def test_chest_lungs_darker_than_mediastinum(shared_data: Path, name: str) -> None:
    a = read_radiograph(_xray(shared_data, name)).pixels
    lungs = (_region(a, 0.3, 0.6, 0.2, 0.35) + _region(a, 0.3, 0.6, 0.65, 0.8)) / 2
    spine = _region(a, 0.3, 0.6, 0.45, 0.55)
    assert spine > lungs + 0.15


@pytest.mark.realdata
def test_tibia_bone_brighter_than_air(shared_data: Path) -> None:
    a = read_radiograph(_xray(shared_data, "pydicom_data/RG3_J2KR.dcm")).pixels
    air = _region(a, 0.2, 0.5, 0.30, 0.36)  # exposed air beside the leg
    bone = _region(a, 0.2, 0.5, 0.45, 0.50)  # tibial shaft
    assert bone > air + 0.3


@pytest.mark.realdata
def test_monochrome1_convention_vs_pydicom_and_simpleitk(shared_data: Path) -> None:
    """Window from the raw values (pydicom), invert after: matches pydicom's VOI; SimpleITK is pre-inverted."""
    path = _xray(shared_data, "pydicom_data/RG3_J2KR.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    voi = apply_voi_lut(apply_modality_lut(raw, ds), ds, index=0)  # unsigned 10-bit: output range 0..1023
    ours = read_radiograph(path).pixels
    np.testing.assert_allclose(ours, 1.0 - voi / 1023.0, atol=1e-6)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]
    np.testing.assert_array_equal(itk, 1023 - raw)  # GDCM inverts MONOCHROME1 on read
    sub = (slice(None, None, 8), slice(None, None, 8))
    assert np.corrcoef(ours[sub].ravel(), itk[sub].ravel())[0, 1] > 0.9
    assert np.corrcoef(ours[sub].ravel(), raw[sub].ravel())[0, 1] < -0.9


@pytest.mark.realdata
def test_file_without_file_meta(shared_data: Path) -> None:
    path = _xray(shared_data, "fo_dicom/CR-MONO1-10-chest")
    assert path.read_bytes()[128:132] != b"DICM"
    image = read_radiograph(path)
    ds = pydicom.dcmread(path, force=True)
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", {})
    expected = 1.0 - window_to_unit(_raw_implicit(path), 550, 1024)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def _raw_implicit(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds.pixel_array


@pytest.mark.realdata
def test_modality_lut_sequence(shared_data: Path) -> None:
    path = _xray(shared_data, "fo_dicom/CR-ModalitySequenceLUT.dcm")
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds and "WindowCenter" not in ds
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = 1.0 - (values - values.min()) / (values.max() - values.min())  # no VOI: min-max, then invert
    np.testing.assert_allclose(read_radiograph(path).pixels, expected, atol=1e-6)


@pytest.mark.realdata
def test_voi_lut_sequence(shared_data: Path) -> None:
    path = _xray(shared_data, "pydicom_data/vlut_04.dcm")
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    first = int(item.LUTDescriptor[1])
    lut = np.asarray(item.LUTData, dtype=np.float64)
    expected = lut[np.clip(ds.pixel_array.astype(int) - first, 0, len(lut) - 1)] / 65535.0
    np.testing.assert_allclose(read_radiograph(path).pixels, expected, atol=1e-6)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["pydicom_data/RG3_J2KR.dcm", "fo_dicom/GH342.dcm"])
def test_truncated_dicom_names_the_file(shared_data: Path, tmp_path: Path, name: str) -> None:
    data = _xray(shared_data, name).read_bytes()
    broken = tmp_path / f"half_{Path(name).name}"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        read_radiograph(broken)
    assert broken.name in str(err.value) and err.value.path == str(broken)


def test_missing_and_non_dicom_files(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_radiograph(tmp_path / "absent.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(ImageReadError, match="junk.dcm"):
        read_radiograph(junk)
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_radiograph(bad_png)


def test_png_round_trip_and_raster_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.random((37, 53)).astype(np.float32)
    out16 = write_radiograph_png(tmp_path / "sub" / "a.png", pixels)
    back = read_radiograph(out16)
    assert Image.open(out16).mode.startswith("I")  # 16-bit grey
    np.testing.assert_allclose(back.pixels, pixels, atol=0.5 / 65535 + 1e-7)
    assert back.pixel_spacing is None and back.photometric == "MONOCHROME2"
    out8 = write_radiograph_png(tmp_path / "b.png", Radiograph(pixels, None, "MONOCHROME2", "x"), bits=8)
    np.testing.assert_allclose(read_radiograph(out8).pixels, pixels, atol=0.5 / 255 + 1e-7)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    rgb[..., :] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg")
    assert read_radiograph(tmp_path / "c.jpg").pixels.mean() == pytest.approx(200 / 255, abs=0.02)


def test_keypoints_round_trip(tmp_path: Path) -> None:
    xy = np.array([[100.5, 40], [102, 80], [104, 120], [106, 160], [108, 200]])
    path = write_keypoints(tmp_path / "k.json", xy, confidence=[0.9, 0.8, float("nan"), 0.7, 0.6])
    got = read_keypoints(path)
    np.testing.assert_array_equal(got.xy, xy)
    assert got.confidence is not None and np.isnan(got.confidence[2]) and got.confidence[0] == 0.9
    assert json.loads(path.read_text())["L1"] == [100.5, 40.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]
    write_keypoints(path, xy)
    assert read_keypoints(path).confidence is None
    with pytest.raises(KeypointsError, match=r"shape \(5, 2\)"):
        write_keypoints(tmp_path / "bad.json", xy[:4])


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        ({"L1": [1, 2], "L2": [1, 2], "L4": [1, 2], "L5": [1, 2]}, "L3", "missing keypoints: L3"),
        ({"L1": [1, 2], "L2": [1, 2], "L3": ["a", 2], "L4": [1, 2], "L5": [1, 2]}, "L3", "numbers"),
        ({"L1": [1, 2], "L2": [1, 2], "L3": [1, 2, 3], "L4": [1, 2], "L5": [1, 2]}, "L3", r"\[x, y\]"),
        ({"L1": [1, 2], "L2": [True, 2], "L3": [1, 2], "L4": [1, 2], "L5": [1, 2]}, "L2", "numbers"),
        (
            {"L1": [1, 2], "L2": [1, 2], "L3": [1, 2], "L4": [1, 2], "L5": [1, 2], "confidence": {"L1": "x"}},
            "confidence.L1",
            "numbers",
        ),
    ],
)
def test_keypoints_validation_names_file_and_key(tmp_path: Path, payload: dict, field: str, message: str) -> None:
    path = tmp_path / "kp.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(KeypointsError, match=message) as err:
        read_keypoints(path)
    assert err.value.field == field and str(path) in str(err.value)


def test_keypoints_non_finite_and_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "kp.json"
    path.write_text('{"L1": [1, 2], "L2": [1, 2], "L3": [NaN, 2], "L4": [1, 2], "L5": [1, 2]}')
    with pytest.raises(KeypointsError, match="L3 is not finite"):
        read_keypoints(path)
    path.write_text("{not json")
    with pytest.raises(KeypointsError, match="invalid JSON"):
        read_keypoints(path)
    with pytest.raises(KeypointsError, match="no such keypoints file"):
        read_keypoints(tmp_path / "absent.json")
