"""QC pictures: CT crops and masks, radiograph keypoints and patches, the contact sheet of the worst studies."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raypipe.data.qc_pictures import picture_name, qc_severity, write_contact_sheet, write_picture
from raypipe.preprocess.contact_sheet import contact_sheet
from raypipe.preprocess.qc_png import ct_qc_picture, xray_qc_picture


def _rgb(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _share(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> float:
    """Share of pixels within `tol` of a colour."""
    return float((np.abs(img - np.array(rgb)).max(axis=2) <= tol).mean())


YELLOW, CYAN, RED = (255, 212, 0), (51, 214, 255), (255, 59, 59)


@pytest.fixture(scope="module")
def real_ct(shared_data: Path):
    from raypipe.io.ct import read_ct
    from raypipe.io.masks import read_masks
    from raypipe.preprocess.ct import preprocess_ct_study

    d = shared_data / "ct" / "totalseg_example"
    ct = read_ct(d / "example_ct.nii.gz")
    names = [f"vertebrae_{x}" for x in ("T11", "T12", "L1", "L2", "L3", "L4", "L5")]
    masks = read_masks(d / "example_seg", ct, names=names)
    _, info = preprocess_ct_study(ct, masks)
    return ct, masks, info


def test_ct_picture_shows_the_chosen_slices_with_boxes_and_mask_outlines(real_ct) -> None:
    ct, masks, info = real_ct
    full = _rgb(ct_qc_picture(ct.hu, masks, ct.spacing, info["geometry"], title="REAL01_CT [ok]"))
    bare = _rgb(ct_qc_picture(ct.hu, masks, ct.spacing, None, title="REAL01_CT [skipped]", problem="L3 missing"))
    assert full.shape[1] > 2.5 * bare.shape[1]  # 14 axial thumbnails beside the sagittal view
    assert _share(full, YELLOW) > 0.003 and _share(full, CYAN) > 0.003 and _share(full, RED) > 0.002
    right = full[:, bare.shape[1]:]  # thumbnails only: every one has a bone box (yellow) and a mask outline (red)
    cols = np.array_split(np.arange(right.shape[1]), 7)
    for c in cols:
        strip = right[:, c]
        assert _share(strip, YELLOW) > 0.002 and _share(strip, RED) > 0.001
    assert _share(bare, YELLOW) < 0.0005  # no span or boxes without geometry
    assert _share(bare, (255, 166, 77)) > 0  # the problem is written in orange


def test_ct_picture_survives_a_crop_centre_outside_the_volume(real_ct) -> None:
    """A geometry whose crop centres lie outside the volume still gives a picture: captions, no thumbnails."""
    ct, masks, info = real_ct
    geometry = {**info["geometry"], "centres_px": [[5000.0, 5000.0] for _ in info["geometry"]["centres_px"]]}
    pic = _rgb(ct_qc_picture(ct.hu, masks, ct.spacing, geometry, title="REAL01_CT [ok]"))
    full = _rgb(ct_qc_picture(ct.hu, masks, ct.spacing, info["geometry"], title="REAL01_CT [ok]"))
    assert pic.shape == full.shape  # same layout
    assert _share(pic[:, full.shape[1] // 3:], RED) < _share(full[:, full.shape[1] // 3:], RED) / 10  # no outlines


def test_xray_picture_marks_keypoints_and_patch_regions() -> None:
    from raypipe.preprocess.config import XrayPreprocessConfig
    from raypipe.preprocess.xray import preprocess_radiograph

    yy, xx = np.mgrid[0:600, 0:400]
    kp = np.array([[200.0, 150.0 + 60 * i] for i in range(5)])
    img = np.full((600, 400), 0.2, np.float32)
    for x, y in kp:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 12.0**2)).astype(np.float32)
    arr, info = preprocess_radiograph(img, kp, XrayPreprocessConfig(out_size=96))
    assert len(info["corners_px"]) == 5
    corners = np.asarray(info["corners_px"])
    assert np.allclose(corners.mean(axis=1), kp, atol=1.0)  # each patch is centred on its keypoint
    with_kp = _rgb(xray_qc_picture(img, kp, arr.astype(np.float32), info["corners_px"], title="SYN [ok]"))
    without = _rgb(xray_qc_picture(img, None, None, (), title="REAL [skipped]", problem="no keypoints"))
    assert _share(with_kp, RED) > 0.0002 and _share(with_kp, CYAN) > 0.001
    assert _share(without, RED) < 0.0001 and _share(without, CYAN) < 0.0001
    assert with_kp.shape[1] > without.shape[1]  # the five patches are shown beside the radiograph


def test_picture_names_hash_the_ids(tmp_path: Path) -> None:
    name = picture_name("Doe^Jane", "ACC123")
    assert name.startswith("qc/") and name.endswith(".png") and "Doe" not in name and "ACC123" not in name
    assert name == picture_name("Doe^Jane", "ACC123") != picture_name("Doe^Jane", "ACC124")
    qc = {"patient_id": "Doe^Jane", "study_id": "ACC123", "_qc_picture": b"\x89PNG fake"}
    write_picture(str(tmp_path), qc)
    assert qc["qc_png"] == name and (tmp_path / name).read_bytes() == b"\x89PNG fake" and "_qc_picture" not in qc
    qc2 = {"patient_id": "P", "study_id": "S"}
    write_picture(str(tmp_path), qc2)
    assert qc2["qc_png"] == ""


def test_severity_orders_errors_skips_and_warnings() -> None:
    rows = [
        {"status": "ok", "warnings": ""},
        {"status": "ok", "warnings": "a; b", "padded_slices_muscle": 3},
        {"status": "ok", "warnings": "", "keypoint_confidence": 0.05},
        {"status": "skipped", "warnings": ""},
        {"status": "error", "warnings": ""},
    ]
    scores = [qc_severity(r) for r in rows]
    assert scores[0] == 0 and scores[4] > scores[3] > scores[1] > scores[2] > scores[0]


def _solid(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (200, 100), color).save(buf, format="PNG")
    return buf.getvalue()


def test_contact_sheet_puts_the_worst_studies_first(tmp_path: Path) -> None:
    colors = {"A": (255, 0, 0), "B": (0, 255, 0), "C": (0, 0, 255), "D": (255, 0, 255)}
    rows = []
    for sid, status, warnings in (("A", "ok", ""), ("B", "error", ""), ("C", "ok", "x; y"), ("D", "skipped", "")):
        qc = {"patient_id": "P" + sid, "study_id": sid, "status": status, "warnings": warnings, "message": "",
              "_qc_picture": _solid(colors[sid])}
        write_picture(str(tmp_path), qc)
        rows.append(qc)
    rows.append({"patient_id": "PE", "study_id": "E", "status": "skipped", "warnings": "", "message": "", "qc_png": ""})
    path = write_contact_sheet(str(tmp_path), pd.DataFrame(rows), n=3)
    assert path == str(tmp_path / "qc" / "contact_sheet.png")
    sheet = _rgb(Path(path).read_bytes())
    # two columns; tiles in order B (error), D (skipped), then C (two warnings); A is left out (n=3)

    def top_left(color: tuple[int, int, int]) -> tuple[int, int]:
        ys, xs = np.nonzero((np.abs(sheet - np.array(color)).max(axis=2) <= 5))
        return int(ys.min()), int(xs.min())

    (by, bx), (dy, dx), (cy, cx) = top_left(colors["B"]), top_left(colors["D"]), top_left(colors["C"])
    assert by == dy < cy and bx == cx < dx
    assert _share(sheet, colors["A"], 5) == 0


def test_contact_sheet_skips_unreadable_pictures() -> None:
    assert contact_sheet([("x", b"not a png")]) is None
    png = contact_sheet([("ok", _solid((0, 0, 0))), ("bad", b"nope")], columns=2, tile_width=100)
    assert _rgb(png).shape[1] == 100 + 2 * 8


def test_inspect_png_draws_one_ct_study_from_the_command_line(shared_data: Path, tmp_path: Path, capsys) -> None:
    from raypipe.cli import main

    d = shared_data / "ct" / "totalseg_example"
    out = tmp_path / "pics" / "ct.png"
    assert main(["inspect", str(d / "example_ct.nii.gz"), "--masks", str(d / "example_seg"), "--png", str(out)]) == 0
    assert "QC picture:" in capsys.readouterr().err
    pic = _rgb(out.read_bytes())
    assert pic.shape[1] > 1000 and _share(pic, YELLOW) > 0.003 and _share(pic, RED) > 0.002
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # written via a temp name
    bare = tmp_path / "bare.png"
    assert main(["inspect", str(d / "example_ct.nii.gz"), "--png", str(bare)]) == 0
    assert _rgb(bare.read_bytes()).shape[1] < pic.shape[1] / 2


def test_inspect_png_draws_a_radiograph_with_its_keypoints(tmp_path: Path) -> None:
    from raypipe.io.inspect import inspect_picture
    from raypipe.io.keypoints import write_keypoints
    from raypipe.io.radiograph import write_radiograph_png

    yy, xx = np.mgrid[0:600, 0:400]
    kp = np.array([[200.0, 150.0 + 60 * i] for i in range(5)])
    img = np.full((600, 400), 0.2)
    for x, y in kp:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 12.0**2))
    image = write_radiograph_png(tmp_path / "xr.png", img / img.max())
    points = write_keypoints(tmp_path / "kp.json", kp)
    with_kp = _rgb(Path(inspect_picture(image, tmp_path / "a.png", keypoints=points)).read_bytes())
    without = _rgb(Path(inspect_picture(image, tmp_path / "b.png")).read_bytes())
    assert _share(with_kp, CYAN) > 0.001 and _share(without, CYAN) < 0.0001
    assert with_kp.shape[1] > without.shape[1]
