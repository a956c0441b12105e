"""X-ray preprocessing (papers/001): keypoint QC, L1/L5 alignment, the six input variants, CLAHE."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raypipe.io.errors import KeypointsError
from raypipe.preprocess.config import XRAY_VARIANTS, XrayPreprocessConfig
from raypipe.preprocess.xray import (
    align_spine,
    body_masks,
    check_keypoints,
    clahe,
    min_max,
    preprocess_radiograph,
    vertebra_patches,
    warp_affine,
)

SHAPE = (600, 450)


def _spine(tilt_deg: float = 12.0, spacing: float = 55.0, top: tuple[float, float] = (200.0, 150.0)) -> np.ndarray:
    """Five tilted, slightly lordotic L1-L5 centres (x, y)."""
    t = np.deg2rad(tilt_deg)
    down, side = np.array([np.sin(t), np.cos(t)]), np.array([np.cos(t), -np.sin(t)])
    bulge = np.array([0.0, -6.0, -9.0, -6.0, 0.0])  # lordosis: L3 most anterior (toward low x)
    return np.array(top) + np.outer(np.arange(5) * spacing, down) + np.outer(bulge, side)


def _blobs(kp: np.ndarray, shape: tuple[int, int] = SHAPE, sigma: float = 6.0, background: float = 0.2) -> np.ndarray:
    """A drawn "radiograph": soft background plus one bright Gaussian body per keypoint."""
    yy, xx = np.mgrid[0: shape[0], 0: shape[1]]
    img = background + 0.05 * xx / shape[1]
    for x, y in kp:
        img = img + 0.7 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img.astype(np.float32)


def _centroid(img: np.ndarray, near: tuple[float, float], radius: float = 15.0) -> np.ndarray:
    yy, xx = np.mgrid[0: img.shape[0], 0: img.shape[1]]
    w = np.where((xx - near[0]) ** 2 + (yy - near[1]) ** 2 < radius**2, img - np.median(img), 0.0).clip(0)
    return np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()


def test_min_max_and_constant() -> None:
    out = min_max(np.array([[2.0, 4.0], [6.0, 10.0]]))
    np.testing.assert_allclose(out, [[0, 0.25], [0.5, 1.0]])
    assert np.all(min_max(np.full((3, 3), 7.0)) == 0)
    masked = min_max(np.array([0.0, 5.0, 10.0]), mask=np.array([False, True, True]))
    np.testing.assert_allclose(masked, [0.0, 0.0, 1.0])


def test_clahe_raises_local_contrast() -> None:
    rng = np.random.default_rng(0)
    img = (0.45 + 0.05 * rng.random((128, 96))).astype(np.float32)  # low contrast
    out = clahe(img, clip_limit=0.02, tiles=(4, 4))
    assert out.shape == img.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out.std() > 3 * img.std()
    assert np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.8  # monotone-ish mapping, not noise
    assert np.isfinite(clahe(np.zeros((30, 17), np.float32))).all()


def test_plausible_keypoints_pass() -> None:
    assert check_keypoints(_spine(), SHAPE) == []
    assert check_keypoints(_spine(), SHAPE, pixel_spacing=(0.6, 0.6)) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p[[0, 2, 1, 3, 4]], "not ordered top to bottom"),
        (lambda p: p[::-1], "L1 is not above L5"),
        (lambda p: np.repeat(p[:1], 5, axis=0) + 0.5, "collapsed"),
        (lambda p: p + np.array([400.0, 0.0]), "outside"),
        (lambda p: np.vstack([p[:4], p[3] + 3.0 * (p[3] - p[2])]), "uneven spacing"),
        (lambda p: p + np.array([[0, 0], [0, 0], [90, 0], [0, 0], [0, 0]]), "off the L1-L5 line"),
    ],
    ids=["swapped", "reversed", "collapsed", "outside", "uneven", "off-line"],
)
def test_implausible_keypoints_are_reported(mutate, expected: str) -> None:
    problems = check_keypoints(mutate(_spine()), SHAPE)
    assert any(expected in p for p in problems), problems


def test_spacing_in_mm_is_checked() -> None:
    problems = check_keypoints(_spine(spacing=55.0), SHAPE, pixel_spacing=(0.1, 0.1))  # 5.5 mm apart
    assert any("mm" in p for p in problems)
    assert check_keypoints(np.zeros((4, 2)), SHAPE) == ["expected 5 keypoints (L1-L5), got 4"]


def test_implausible_keypoints_raise_from_preprocess() -> None:
    with pytest.raises(KeypointsError, match="implausible keypoints") as err:
        preprocess_radiograph(_blobs(_spine()), _spine()[[0, 2, 1, 3, 4]])
    assert err.value.field == "keypoints" and err.value.value


@pytest.mark.parametrize("tilt", [-20.0, 0.0, 15.0])
def test_alignment_moves_l1_and_l5_content_to_targets(tilt: float) -> None:
    kp = _spine(tilt_deg=tilt)
    img = _blobs(kp)
    targets = ((191.5, 95.75), (191.5, 287.25))
    out = align_spine(img, kp, 384, *targets)
    m = out.matrix
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m[:, :2] @ m[:, :2].T, np.eye(2) * np.linalg.det(m[:, :2]), atol=1e-9)  # similarity
    np.testing.assert_allclose(out.keypoints[[0, -1]], targets, atol=1e-6)
    for i, target in ((0, targets[0]), (4, targets[1])):
        c = _centroid(out.image, target)
        assert np.linalg.norm(c - np.array(target)) < 2.0, (tilt, i, c)
    # Middle levels follow the same transform.
    for i in (1, 2, 3):
        assert np.linalg.norm(_centroid(out.image, tuple(out.keypoints[i])) - out.keypoints[i]) < 2.0


def test_alignment_on_synthetic_cohort_radiograph(tmp_path: Path) -> None:
    """A phantom radiograph from raypipe.data.synth: a marker at L1/L5 lands within 2 px of the targets."""
    synth = pytest.importorskip("raypipe.data.synth")
    from raypipe.io.keypoints import read_keypoints
    from raypipe.io.manifest import load_manifest
    from raypipe.io.radiograph import read_radiograph

    manifest = synth.synth_cohort("xray", tmp_path / "cohort", patients=1, seed=3, workers=1)
    row = load_manifest(manifest).iloc[0]
    rad = read_radiograph(row["image_path"])
    kp = read_keypoints(row["keypoints_path"]).xy
    assert check_keypoints(kp, rad.shape, rad.pixel_spacing) == []
    out = align_spine(rad.pixels, kp, 384)
    for i in (0, 4):
        marker = _blobs(kp[i: i + 1], rad.shape, sigma=1.5, background=0.0)
        c = _centroid(warp_affine(marker, out.matrix, (384, 384)), tuple(out.keypoints[i]))
        assert np.linalg.norm(c - out.keypoints[i]) < 2.0
    image, qc = preprocess_radiograph(rad, kp, XrayPreprocessConfig())
    assert image.shape == (5, 384, 384) and image.dtype == np.float16 and qc["channels"] == 5


@pytest.mark.parametrize("variant", XRAY_VARIANTS)
def test_six_variants_have_documented_shapes(variant: str) -> None:
    kp = _spine()
    img = _blobs(kp)
    image, qc = preprocess_radiograph(img, kp, XrayPreprocessConfig(variant=variant))
    channels = 5 if variant.startswith("patches") else 1
    assert image.shape == (channels, 384, 384) and image.dtype == np.float16
    assert float(image.min()) >= 0.0 and float(image.max()) == pytest.approx(1.0, abs=1e-3)
    assert qc["variant"] == variant and qc["channels"] == channels
    if variant.endswith("_masked"):
        unmasked, _ = preprocess_radiograph(img, kp, XrayPreprocessConfig(variant=variant.removesuffix("_masked")))
        assert (image == 0).mean() > (unmasked == 0).mean()
    if variant.startswith("patches"):
        # Each patch is centred on its body: the centre is brighter than the patch corners.
        centre = image[:, 182:202, 182:202].astype(np.float32).mean(axis=(1, 2))
        corner = image[:, :20, :20].astype(np.float32).mean(axis=(1, 2))
        assert np.all(centre > corner)


def test_full_variants_zero_pad_to_square_and_l1l4_crops_tighter() -> None:
    kp = _spine(tilt_deg=0.0)
    img = _blobs(kp)
    full5, qc5 = preprocess_radiograph(img, kp, XrayPreprocessConfig(variant="full_l1l5"))
    full4, qc4 = preprocess_radiograph(img, kp, XrayPreprocessConfig(variant="full_l1l4"))
    # The ROI is taller than wide, so the sides are zero padding.
    assert np.all(full5[0, :, :20] == 0) and np.all(full5[0, :, -20:] == 0)
    box5, box4 = qc5["roi_aligned"], qc4["roi_aligned"]
    assert (box4[3] - box4[1]) < (box5[3] - box5[1])


def test_l1l4_patches_and_body_masks() -> None:
    kp = _spine()
    patches, info = vertebra_patches(_blobs(kp), kp, size=384, levels=4)
    assert patches.shape == (4, 384, 384) and len(info["patch_side_px"]) == 4
    mask = body_masks(SHAPE, kp)
    for x, y in kp:
        assert mask[int(round(y)), int(round(x))]
    mid = (kp[1] + kp[2]) / 2  # the disc between L2 and L3 is not body
    assert not mask[int(round(mid[1])), int(round(mid[0]))]


def test_config_rejects_unknown_variant() -> None:
    from raypipe.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="variant"):
        parse_config(XrayPreprocessConfig, {"variant": "patches_l1l4"})
    assert XrayPreprocessConfig().variant == "patches_l1l5" and XrayPreprocessConfig().out_size == 384
