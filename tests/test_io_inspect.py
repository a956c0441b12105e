"""raypipe.io.inspect: the `inspect --json` schema on real CTs, masks and radiographs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from raypipe.io import RaypipeInputError, detect_kind, format_inspection, inspect_path, write_radiograph_png

pytestmark = pytest.mark.realdata

SCHEMA = {"path", "kind", "shape", "spacing", "origin", "orientation", "intensity", "masks", "qc_warnings"}


def test_ct_with_totalsegmentator_masks(shared_data: Path) -> None:
    d = shared_data / "ct" / "totalseg_example"
    result = inspect_path(d / "example_ct.nii.gz", masks=d / "example_seg")
    assert SCHEMA <= set(result)
    assert json.loads(json.dumps(result)) == result  # JSON-ready, no numpy types
    assert result["kind"] == "ct" and result["orientation"] == "RAS"
    assert result["shape"] == [122, 101, 112] and result["spacing"] == [3.0, 3.0, 3.0]
    assert result["origin"] == pytest.approx([177.956, -11.319, 94.302], abs=1e-3)
    assert result["intensity"]["min"] == -1207.0 and result["intensity"]["max"] == 3382.0
    t12 = result["masks"]["vertebrae_T12"]
    assert t12["voxels"] == 1822 and 150 < t12["mean"] < 250
    assert result["masks"]["autochthon_left"]["mean"] < 80
    assert "vertebrae_T12 touches the superior edge" in result["qc_warnings"]
    assert not any(w.startswith("vertebrae_L3 ") for w in result["qc_warnings"])
    text = format_inspection(result)
    assert "RAS" in text and "vertebrae_T12" in text and "touches the superior edge" in text


def test_tptbox_with_verse_labels(shared_data: Path) -> None:
    d = shared_data / "ct" / "tptbox_sample"
    result = inspect_path(
        d / "sub-ct_label-22_ct.nii.gz", masks=d / "sub-ct_seg-vert_label-22_msk.nii.gz", mask_labels="verse"
    )
    assert result["orientation"] == "PIR" and result["shape"] == [73, 47, 73]
    assert result["masks"]["vertebrae_L3"]["mean"] == pytest.approx(244, abs=3)
    assert "vertebrae_L2 touches the superior edge" in result["qc_warnings"]
    assert "vertebrae_L4 touches the inferior edge" in result["qc_warnings"]


def test_dicom_series_and_single_slice(shared_data: Path) -> None:
    folder = shared_data / "ct" / "totalseg_example" / "example_ct_dicom"
    result = inspect_path(folder)
    assert result["kind"] == "ct" and result["shape"] == [512, 512, 20] and result["orientation"] == "LPS"
    assert result["intensity"]["min"] == -1024.0 and result["qc_warnings"] == []
    one = sorted(folder.iterdir())[0]
    assert detect_kind(one) == "ct"
    assert inspect_path(one)["shape"][:2] == [512, 512]


def test_missing_slice_is_a_qc_warning(copy_shared: Callable[..., Path]) -> None:
    folder = copy_shared("ct/totalseg_example/example_ct_dicom", "gap")
    sorted(folder.iterdir())[10].unlink()
    result = inspect_path(folder)
    assert any("uneven slice spacing" in w for w in result["qc_warnings"])


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("xray/fo_dicom/GH342.dcm", "CT"),
        ("xray/fo_dicom/CR-MONO1-10-chest", "CR"),
        ("xray/pydicom_data/RG3_J2KR.dcm", "CR"),
    ],
)
def test_radiographs_and_localizer(shared_data: Path, name: str, modality: str) -> None:
    result = inspect_path(shared_data / name)  # GH342 is Modality CT but a LOCALIZER: a radiograph
    assert result["kind"] == "radiograph" and result["modality"] == modality
    assert SCHEMA <= set(result) and json.loads(json.dumps(result)) == result
    assert 0.0 <= result["intensity"]["min"] < result["intensity"]["mean"] < result["intensity"]["max"] <= 1.0
    assert ("no usable pixel spacing: sizes are in pixels only" in result["qc_warnings"]) == (result["spacing"] is None)
    assert "rows, cols" in format_inspection(result)


def test_png_and_masks_on_a_radiograph(tmp_path: Path) -> None:
    png = write_radiograph_png(tmp_path / "drr.png", np.linspace(0, 1, 64 * 48).reshape(64, 48))
    result = inspect_path(png)
    assert result["kind"] == "radiograph" and result["shape"] == [64, 48]
    with pytest.raises(RaypipeInputError, match="CT only"):
        inspect_path(png, masks=tmp_path)
