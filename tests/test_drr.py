"""DRR: geometry consistency (image vs projected points) and a lateral DRR of the real TotalSegmentator CT."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from raypipe.preprocess.drr import (
    DEFAULT_LEVELS,
    MU_WATER_60KEV_PER_MM,
    ct_to_attenuation,
    lateral_drr,
    project_points,
    vertebra_centres,
    voxel_to_world,
)
from raypipe.preprocess.xray import align_spine, check_keypoints, warp_affine


@dataclass(frozen=True)
class _Vol:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


@pytest.fixture(scope="module")
def real_ct(shared_data: Path):
    """The real example CT and its TotalSegmentator masks on the canonical grid."""
    from raypipe.io.ct import read_ct
    from raypipe.io.masks import read_masks

    d = shared_data / "ct" / "totalseg_example"
    ct = read_ct(d / "example_ct.nii.gz")
    masks = read_masks(d / "example_seg", ct)
    return ct, masks


def test_attenuation_from_hu() -> None:
    mu = ct_to_attenuation(np.array([-1200.0, -1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(mu, [0.0, 0.0, MU_WATER_60KEV_PER_MM, 2 * MU_WATER_60KEV_PER_MM], rtol=1e-6)


@pytest.mark.parametrize("geometry", ["parallel", "cone"])
def test_projected_point_hits_the_projected_object(geometry: str) -> None:
    """A dense bead must appear exactly where project_points puts its centre (same geometry for both)."""
    hu = np.full((60, 50, 40), -1000.0, dtype=np.float32)
    zyx = np.array([41, 12, 30])
    hu[zyx[0] - 1: zyx[0] + 2, zyx[1] - 1: zyx[1] + 2, zyx[2] - 1: zyx[2] + 2] = 3000.0
    vol = _Vol(hu, (2.0, 1.5, 1.0), (-40.0, -30.0, 100.0))
    drr = lateral_drr(vol, geometry, source_distance_mm=400.0, detector_distance_mm=150.0, enhance=0.0)
    x, y = project_points(voxel_to_world(vol, zyx[None]), drr.geometry)[0]
    li = drr.line_integral  # air is 0, so the image's centroid is the bead's
    rows, cols = np.mgrid[0: li.shape[0], 0: li.shape[1]]
    cx, cy = (li * cols).sum() / li.sum(), (li * rows).sum() / li.sum()
    assert abs(cx - x) <= 0.5 and abs(cy - y) <= 0.5, (cx, cy, x, y)
    # Superior voxels appear higher in the image, posterior voxels further right.
    up, back = voxel_to_world(vol, np.array([[50, 12, 30], [41, 30, 30]]))
    (xu, yu), (xb, yb) = project_points(np.stack([up, back]), drr.geometry)
    assert yu < y and xb > x
    if geometry == "cone":
        assert drr.geometry.magnification > 1.0


def test_real_ct_lateral_drr(real_ct) -> None:
    """L1-L5 centres project top to bottom onto bright bone, ~25-40 mm apart, anterior of the back muscles."""
    ct, masks = real_ct
    centres = vertebra_centres(masks, ct)
    assert list(centres) == list(DEFAULT_LEVELS)
    world = np.stack([centres[lvl] for lvl in DEFAULT_LEVELS])
    drr = lateral_drr(ct, "cone", isocentre_mm=world.mean(axis=0))
    img = drr.image
    assert img.dtype == np.float32 and 0.0 <= img.min() and img.max() <= 1.0
    kp = project_points(world, drr.geometry)
    assert np.all(np.diff(kp[:, 1]) > 0), "L1..L5 must run top to bottom"
    values = [img[int(round(y)), int(round(x))] for x, y in kp]
    assert min(values) > np.median(img), (values, float(np.median(img)))
    spacing_mm = np.linalg.norm(np.diff(kp, axis=0), axis=1) * drr.geometry.pixel_mm_at_isocentre
    assert np.all((spacing_mm > 25) & (spacing_mm < 40)), spacing_mm
    # Columns run anterior -> posterior: the paraspinal muscles lie to the right of the bodies.
    back = voxel_to_world(ct, np.argwhere(masks["autochthon_left"]).mean(axis=0)[None])
    assert project_points(back, drr.geometry)[0, 0] > kp[:, 0].max()
    spacing = drr.geometry.pixel_mm_at_isocentre
    assert check_keypoints(kp, img.shape, (spacing, spacing)) == []


def test_alignment_on_drr(real_ct) -> None:
    """align_spine puts the L1 and L5 *image content* (marker blobs) within 2 px of the targets."""
    ct, masks = real_ct
    centres = vertebra_centres(masks, ct)
    drr = lateral_drr(ct, "cone")
    kp = project_points(np.stack([centres[lvl] for lvl in DEFAULT_LEVELS]), drr.geometry)
    targets = ((191.5, 95.75), (191.5, 287.25))
    aligned = align_spine(drr.image, kp, 384, *targets)
    np.testing.assert_allclose(aligned.keypoints[[0, -1]], targets, atol=1e-6)
    assert aligned.image.shape == (384, 384)
    for level, target in ((0, targets[0]), (4, targets[1])):
        yy, xx = np.mgrid[0: drr.image.shape[0], 0: drr.image.shape[1]]
        marker = np.exp(-((xx - kp[level, 0]) ** 2 + (yy - kp[level, 1]) ** 2) / (2 * 1.0**2))
        warped = warp_affine(marker, aligned.matrix, (384, 384))
        ys, xs = np.mgrid[0:384, 0:384]
        centroid = np.array([(warped * xs).sum(), (warped * ys).sum()]) / warped.sum()
        assert np.linalg.norm(centroid - np.array(target)) < 2.0, (level, centroid, target)


def test_synth_drr_writes_a_valid_study(shared_data: Path, tmp_path: Path) -> None:
    """drr.png (16-bit), drr.dcm (DX, MONOCHROME2, PixelSpacing), keypoints.json and a valid manifest row."""
    import pydicom
    from PIL import Image

    from raypipe.data.drr import synth_drr_cli
    from raypipe.io.keypoints import read_keypoints
    from raypipe.io.manifest import load_manifest
    from raypipe.io.radiograph import read_radiograph

    d = shared_data / "ct" / "totalseg_example"
    out = tmp_path / "drr"
    args = argparse.Namespace(ct=str(d / "example_ct.nii.gz"), masks=str(d / "example_seg"), out=str(out))
    assert synth_drr_cli(args) == 0
    png = Image.open(out / "drr.png")
    assert png.mode.startswith("I;16") or png.mode == "I"
    assert np.asarray(png).max() > 255
    ds = pydicom.dcmread(out / "drr.dcm")
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and list(ds.PatientOrientation) == ["P", "F"]
    assert float(ds.PixelSpacing[0]) > 0 and float(ds.ImagerPixelSpacing[0]) > float(ds.PixelSpacing[0])
    rad = read_radiograph(out / "drr.dcm")
    assert rad.pixels.shape == (ds.Rows, ds.Columns) and rad.pixel_spacing is not None
    kp = read_keypoints(out / "keypoints.json")
    assert check_keypoints(kp.xy, rad.shape, rad.pixel_spacing) == []
    table = load_manifest(out / "manifest.csv")
    assert len(table) == 1 and table.loc[0, "modality"] == "XR"
    assert Path(table.loc[0, "keypoints_path"]) == out / "keypoints.json"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
