"""CT preprocessing (raypipe.preprocess.ct) on the real TotalSegmentator example CT and the TPTBox crop."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import ValidationError

from raypipe.io.ct import read_ct
from raypipe.io.errors import MaskError
from raypipe.io.masks import read_body_mask, read_masks
from raypipe.preprocess.config import CTPreprocessConfig
from raypipe.preprocess.ct import (
    geometric_body,
    hu_window,
    preprocess_ct_study,
    resample_axial,
    resample_axial_mask,
    sample_slices,
    slices_spanning,
    vertebra_crop,
    vertebra_crop_centre,
    vertebral_bodies,
)

pytestmark = pytest.mark.realdata
LEVELS = ("T12", "L1", "L2", "L3", "L4")
MASKS = [f"vertebrae_{x}" for x in ("T11", "T12", "L1", "L2", "L3", "L4", "L5")] + ["autochthon_left", "autochthon_right"]
BODY_FILE = "extra_head_labels/spine_report_totalseg_vertebrae_body.nii.gz"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def example(shared_data: Path):
    d = shared_data / "ct" / "totalseg_example"
    ct = read_ct(d / "example_ct.nii.gz")
    masks = read_masks(d / "example_seg", ct, names=MASKS)
    body = read_body_mask(d / BODY_FILE, ct)
    return ct, masks, body


@pytest.fixture(scope="module")
def result(example):
    ct, masks, body = example
    return preprocess_ct_study(ct, masks, body)


def _stub(ct, hu: np.ndarray) -> SimpleNamespace:
    """Same geometry as `ct`, other intensities: lets a mask go through the exact cropping path."""
    return SimpleNamespace(hu=hu.astype(np.float32), spacing=ct.spacing, origin=ct.origin, path="stub")


# ------------------------------------------------------------------------------------------ intensity


def test_hu_window_maps_paper_window_to_unit_range():
    hu = np.array([-1024, -200, 400, 1000, 3000], dtype=np.float32)
    np.testing.assert_allclose(hu_window(hu), [-1, -1, 0, 1, 1], atol=1e-6)


def test_real_crops_are_in_unit_range(result):
    arrays, _ = result
    for k in ("bone", "bone_muscle"):
        assert arrays[k].min() >= -1 and arrays[k].max() <= 1
        assert arrays[k].max() > 0.5  # cortical bone is bright


def test_resample_3mm_to_1mm_keeps_nodes_and_slices(example):
    ct, masks, _ = example
    assert ct.spacing == pytest.approx((3.0, 3.0, 3.0))
    up = resample_axial(ct.hu, ct.spacing)
    z, y, x = ct.hu.shape
    assert up.shape == (z, 3 * (y - 1) + 1, 3 * (x - 1) + 1)
    np.testing.assert_allclose(up[:, ::3, ::3], ct.hu, atol=1e-3)  # linear interpolation passes through samples
    mid = up[:, 1::3, ::3][:, : y - 1]
    assert mid.min() >= min(ct.hu.min(), 0) - 1e-3  # no overshoot (linear, not cubic)
    m = resample_axial_mask(masks["vertebrae_L3"], ct.spacing)
    assert m.dtype == bool and m.shape == up.shape
    assert m.sum() == pytest.approx(9 * masks["vertebrae_L3"].sum(), rel=0.1)


# --------------------------------------------------------------------------------------------- study


def test_shapes_levels_and_z(example, result):
    ct, _, _ = example
    arrays, qc = result
    s = qc["n_slices"]
    # T12 body tops out at z index 111 (volume edge), L4 body starts at 56 (SOURCE.md)
    assert s == 111 - 56 + 1
    assert arrays["bone"].shape == (s, 96, 96) and arrays["bone"].dtype == np.float16
    assert arrays["bone_muscle"].shape == (s, 96, 144) and arrays["bone_muscle"].dtype == np.float16
    levels = list(arrays["slice_level"])
    assert levels[0] == "T12" and levels[-1] == "L4"
    assert list(dict.fromkeys(levels)) == list(LEVELS)  # each level once, in order, top first
    z = arrays["slice_z_mm"]
    assert z[0] == pytest.approx(ct.origin[2] + 111 * 3.0)
    np.testing.assert_allclose(np.diff(z), -3.0, atol=1e-4)
    assert qc["status"] == "ok" and qc["body_rule"] == "mask"
    assert qc["vertebrae_found"][:5] == list(LEVELS)


def test_crop_centre_is_on_the_vertebral_body(example):
    ct, masks, body = example
    union = np.zeros_like(body)
    for lvl in LEVELS:
        union |= masks[f"vertebrae_{lvl}"] & body
    arrays, _ = preprocess_ct_study(_stub(ct, np.where(union, 1000, -1000)), masks, body)
    offsets = []
    for crop in arrays["bone"]:
        c = vertebra_crop_centre(crop > 0)
        if c is not None:  # disc slices have no body voxels
            offsets.append(np.hypot(c[0] - 48, c[1] - 48))  # 1 mm pixels: offsets are in mm
    offsets = np.array(offsets)
    assert len(offsets) > 40
    # Thin endplate slices upsampled 3x from 3 mm shift a little; the bulk sits within 2 mm.
    assert np.mean(offsets < 2.0) > 0.9 and offsets.max() < 5.0


def test_muscle_crop_holds_most_autochthon(example):
    ct, masks, body = example
    aut = masks["autochthon_left"] | masks["autochthon_right"]
    hu = np.where(aut, 1000, -1000)
    shifted = CTPreprocessConfig(muscle_crop_centre="posterior_shift", muscle_crop_shift_mm=24.0)
    arrays, _ = preprocess_ct_study(_stub(ct, hu), masks, body, shifted)
    literal, _ = preprocess_ct_study(_stub(ct, hu), masks, body)
    ref = resample_axial_mask(aut, ct.spacing)[np.arange(111, 55, -1)].sum(axis=(1, 2))
    frac = (arrays["bone_muscle"] > 0).sum(axis=(1, 2)) / ref
    frac_literal = (literal["bone_muscle"] > 0).sum(axis=(1, 2)) / ref
    # This patient's erector spinae reach ~105 mm behind the body centroid: a 96 mm box cannot hold body
    # and all muscle; the posterior shift (sensitivity option) keeps most of it, the paper's centring about half.
    assert np.median(frac) > 0.7 and frac.sum() / len(frac) > 0.7
    assert np.median(frac) > np.median(frac_literal) + 0.15
    # Both sides present in every slice: left and right halves of the crop each hold muscle.
    both = (arrays["bone_muscle"][:, :, :72] > 0).any(axis=(1, 2)) & (arrays["bone_muscle"][:, :, 72:] > 0).any(axis=(1, 2))
    assert both.all()


def _body_union(masks, body, levels=LEVELS) -> np.ndarray:
    union = np.zeros_like(body)
    for lvl in levels:
        union |= masks[f"vertebrae_{lvl}"] & body
    return union


def _centroid_offsets(crops: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """Per slice with body pixels: (row, col) of the body centroid in the crop minus `centre` (1 mm pixels)."""
    out = [np.subtract(c, centre) for crop in crops if (c := vertebra_crop_centre(crop > 0)) is not None]
    return np.array(out)


@pytest.mark.parametrize("option, muscle_row", [("vertebral_body", 48.0), ("posterior_shift", 48.0 - 24.0)])
def test_boxes_land_on_the_body_centroid_on_the_example_ct(example, option, muscle_row):
    """Both boxes centred on the body by default (paper 000); the posterior shift moves only the muscle box 24 mm."""
    ct, masks, body = example
    cfg = CTPreprocessConfig(muscle_crop_centre=option)
    arrays, qc = preprocess_ct_study(_stub(ct, np.where(_body_union(masks, body), 1000, -1000)), masks, body, cfg)
    bone = _centroid_offsets(arrays["bone"], (48.0, 48.0))
    muscle = _centroid_offsets(arrays["bone_muscle"], (muscle_row, 72.0))
    assert len(bone) > 40 and len(muscle) == len(bone)
    # 3 mm slices upsampled to 1 mm: the bulk of the slices within 2 mm, none beyond 5 mm (the shifted box
    # cuts the front of the widest endplates 24 mm in front of its centre, which moves their cut centroid)
    for off in (bone, muscle):
        dist = np.hypot(off[:, 0], off[:, 1])
        assert np.mean(dist < 2.0) > 0.9
    assert np.hypot(bone[:, 0], bone[:, 1]).max() < 5.0
    if option == "vertebral_body":
        assert np.hypot(muscle[:, 0], muscle[:, 1]).max() < 5.0
    assert abs(np.median(muscle[:, 0])) < 1.0  # AP: centred (or exactly 24 mm anterior of the shifted centre)
    assert qc["muscle_crop_centre"] == option and qc["muscle_crop_shift_mm"] == (24.0 if option != "vertebral_body" else 0.0)


def test_boxes_land_on_the_body_centroid_on_the_tptbox_crop(tptbox):
    """Second scanner (PIR, 1.5 mm, subregion body labels 49 + 50): the L3 boxes sit on the L3 body centroid."""
    ct, masks, body = tptbox
    union = _body_union(masks, body, ("L3",))
    cfg = CTPreprocessConfig(levels=("L3",))
    arrays, qc = preprocess_ct_study(_stub(ct, np.where(union, 1000, -1000)), masks, body, cfg)
    bone = _centroid_offsets(arrays["bone"], (48.0, 48.0))
    muscle = _centroid_offsets(arrays["bone_muscle"], (48.0, 72.0))
    assert len(bone) == qc["n_slices"] - qc["slices_without_body"] and len(bone) >= 15
    for off in (bone, muscle):
        assert np.median(np.hypot(off[:, 0], off[:, 1])) < 1.5 and np.hypot(off[:, 0], off[:, 1]).max() < 3.0


def test_bone_only_input_is_masked_to_the_vertebral_body(example):
    """Default bone-only crop: window values on the body, pad value elsewhere; `window` keeps the plain crop."""
    ct, masks, body = example
    masked, qc = preprocess_ct_study(ct, masks, body)
    plain, qc_plain = preprocess_ct_study(ct, masks, body, CTPreprocessConfig(bone_input="window"))
    assert qc["bone_input"] == "body_masked" and qc_plain["bone_input"] == "window"
    np.testing.assert_array_equal(masked["bone_muscle"], plain["bone_muscle"])  # the muscle box is never masked
    kept = masked["bone"] != -1
    np.testing.assert_array_equal(masked["bone"][kept], plain["bone"][kept])
    # the kept pixels are the body: compare with the body itself pushed through the same crop path
    marked, _ = preprocess_ct_study(_stub(ct, np.where(_body_union(masks, body), 1000, -1000)), masks, body,
                                    CTPreprocessConfig(bone_input="window"))
    assert dice(kept, marked["bone"] > 0) > 0.9
    frac_kept = kept.mean(axis=(1, 2))
    assert 0.05 < np.median(frac_kept) < 0.35  # a ~35-45 mm body in a 96 mm box; most of the box is gone
    assert (plain["bone"] != -1).mean() > 0.95
    # slices between two bodies (discs) have no body pixels: all pad value, counted in the QC
    blank = int((~kept.any(axis=(1, 2))).sum())
    assert blank == qc["slices_without_body"] and 0 < blank < qc["n_slices"] // 3


def test_legacy_resolved_config_keeps_its_crops():
    """A preprocess.yaml written before muscle_crop_centre existed reads as the shifted, unmasked crops it made."""
    old = CTPreprocessConfig.model_validate({"muscle_crop_shift_mm": 24.0, "n_slices": 14})
    assert (old.muscle_crop_centre, old.bone_input) == ("posterior_shift", "window")
    new = CTPreprocessConfig()
    assert (new.muscle_crop_centre, new.bone_input) == ("vertebral_body", "body_masked")


def test_t12_truncation_is_flagged(result):
    _, qc = result
    assert any("vertebrae_T12 touches the superior edge of the volume" in w for w in qc["warnings"])
    assert not any("vertebrae_L3" in w for w in qc["warnings"])


def test_missing_level_raises_mask_error(example):
    ct, masks, body = example
    partial = {k: v for k, v in masks.items() if k != "vertebrae_L2"}
    with pytest.raises(MaskError, match=r"\['L2'\]"):
        preprocess_ct_study(ct, partial, body)


def test_mask_rule_requires_a_body_mask(example):
    ct, masks, _ = example
    with pytest.raises(MaskError, match="body mask"):
        preprocess_ct_study(ct, masks, None, CTPreprocessConfig(body_rule="mask"))


def test_geometric_rule_matches_real_body_mask(example):
    _, masks, body = example
    geo = vertebral_bodies(masks, LEVELS, body_mask=None)
    for lvl in LEVELS:
        v = masks[f"vertebrae_{lvl}"]
        assert geometric_body(v)[1] == "canal"
        assert dice(geo[lvl], v & body) > 0.7, lvl


def test_geometric_rule_runs_end_to_end(example, result):
    ct, masks, _ = example
    arrays, qc = preprocess_ct_study(ct, masks, None)
    assert qc["body_rule"] == "geometric"
    assert abs(qc["n_slices"] - result[1]["n_slices"]) <= 2


def test_geometric_fraction_fallback_without_canal():
    v = np.zeros((4, 40, 10), bool)
    v[:, 10:30, 2:8] = True  # a solid block: no canal in the projection
    b, rule = geometric_body(v, fraction=0.5)
    assert rule == "fraction"
    assert b[:, 10:20, 2:8].all() and not b[:, 20:].any()


@pytest.mark.parametrize("code", ["PIR", "LPS"])
def test_orientation_independence(example, result, shared_data, tmp_path, code):
    d = shared_data / "ct" / "totalseg_example"
    out = tmp_path / code
    (out / "seg").mkdir(parents=True)

    def reorient(src: Path, dst: Path) -> None:
        sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(src)), code), str(dst))

    reorient(d / "example_ct.nii.gz", out / "ct.nii.gz")
    for name in MASKS:
        reorient(d / "example_seg" / f"{name}.nii.gz", out / "seg" / f"{name}.nii.gz")
    reorient(d / BODY_FILE, out / "body.nii.gz")
    ct = read_ct(out / "ct.nii.gz")
    assert ct.source_orientation == code
    arrays, qc = preprocess_ct_study(ct, read_masks(out / "seg", ct), read_body_mask(out / "body.nii.gz", ct))
    ref, _ = result
    for k in ("bone", "bone_muscle", "slice_z_mm"):
        np.testing.assert_array_equal(arrays[k], ref[k])
    assert list(arrays["slice_level"]) == list(ref["slice_level"])


# --------------------------------------------------------------------------------------------- tptbox


@pytest.fixture(scope="module")
def tptbox(shared_data: Path):
    d = shared_data / "ct" / "tptbox_sample"
    ct = read_ct(d / "sub-ct_label-22_ct.nii.gz")
    masks = read_masks(d / "sub-ct_seg-vert_label-22_msk.nii.gz", ct, labels="verse")
    body = read_body_mask(d / "sub-ct_seg-subreg_label-22_msk.nii.gz", ct, body_label=(49, 50))
    return ct, masks, body


def test_tptbox_without_t12_l4_is_reported(tptbox):
    ct, masks, body = tptbox
    assert ct.source_orientation == "PIR"
    with pytest.raises(MaskError, match="T12") as err:
        preprocess_ct_study(ct, masks, body)
    assert "T12" in err.value.value and "L3" not in err.value.value


def test_tptbox_l3_only_crop_is_padded_and_reported(tptbox):
    ct, masks, body = tptbox
    arrays, qc = preprocess_ct_study(ct, masks, body, CTPreprocessConfig(levels=("L3",)))
    s = qc["n_slices"]
    assert 15 <= s <= 30  # ~25-40 mm body height at 1.5 mm slices
    assert arrays["bone_muscle"].shape == (s, 96, 144) and set(arrays["slice_level"]) == {"L3"}
    assert qc["padded_slices_muscle"] == s
    assert any("narrower than the 144" in w and "padded" in w for w in qc["warnings"])
    # Padding is the -1 background value, in the outermost columns (field 110 mm < 144 mm).
    assert (arrays["bone_muscle"][:, :, 0] == -1).all() and (arrays["bone_muscle"][:, :, -1] == -1).all()
    g = vertebral_bodies(masks, ("L3",))["L3"]
    assert dice(g, masks["vertebrae_L3"] & body) > 0.7


# --------------------------------------------------------------------------------------- small units


def test_sample_slices_evaluation_is_centred_and_deterministic():
    idx = sample_slices(56, 14)
    np.testing.assert_array_equal(idx, 2 + 4 * np.arange(14))
    np.testing.assert_array_equal(idx, sample_slices(56, 14))


def test_sample_slices_training_is_equidistant_with_random_start():
    rng = np.random.default_rng(0)
    draws = [sample_slices(56, 14, rng) for _ in range(50)]
    for d in draws:
        assert d.min() >= 0 and d.max() <= 55 and len(d) == 14
        assert set(np.diff(d)) <= {4}
    assert len({int(d[0]) for d in draws}) == 4  # every start offset 0..3 is used


def test_sample_slices_with_few_slices_repeats_in_order():
    idx = sample_slices(5, 14)
    assert len(idx) == 14 and (np.diff(idx) >= 0).all() and set(idx) == set(range(5))
    np.testing.assert_array_equal(sample_slices(1, 14), np.zeros(14))
    idx = sample_slices(5, 14, np.random.default_rng(1))
    assert len(idx) == 14 and (np.diff(idx) >= 0).all() and idx.max() <= 4


def test_slices_spanning_labels_disc_slices_by_nearest_body():
    upper = np.zeros((20, 4, 4), bool)
    lower = np.zeros_like(upper)
    upper[12:18] = True
    lower[3:8] = True  # disc gap 8..11
    span = slices_spanning({"L1": upper, "L2": lower}, z_origin_mm=100.0, z_spacing_mm=2.0)
    assert list(span.indices) == list(range(17, 2, -1))
    assert span.levels == ("L1",) * 6 + ("L1", "L1") + ("L2", "L2") + ("L2",) * 5
    assert span.z_mm[0] == pytest.approx(134.0)


def test_vertebra_crop_pads_outside_the_field():
    img = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    c = vertebra_crop(img, (2.0, 28.0), (8, 8), pad_value=-1)
    assert c.shape == (8, 8)
    assert (c[:2] == -1).all() and (c[:, 6:] == -1).all()
    assert c[2, 0] == img[0, 24]


def test_config_rejects_non_contiguous_levels():
    with pytest.raises(ValidationError):
        CTPreprocessConfig(levels=("T12", "L2"))
    with pytest.raises(ValidationError):
        CTPreprocessConfig(window_low=100, window_high=0)
    assert CTPreprocessConfig().n_slices == 14
