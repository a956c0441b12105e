"""Digitally reconstructed radiographs (DRR): a lateral spine X-ray computed from a CT, as pure functions.

Why: the X-ray branch needs lateral radiographs with known L1-L5 body centres. Projecting a real CT with
vertebra masks gives both: the image (a line integral of attenuation) and the keypoints (mask centroids
pushed through the very same projection, so they land exactly where the bodies appear).

Geometry (canonical LPS, docs/CONTRACTS.md: x toward patient Left, y toward Posterior, z toward Superior):
- A *left lateral* view: rays travel along +x (source on the patient's right, detector on the left).
- Image rows run superior -> inferior (row 0 is the most superior), columns run **anterior -> posterior**
  (column 0 is anterior), i.e. the patient faces the image's left, as lateral spine films are usually
  displayed. DICOM PatientOrientation of the result is therefore ``P\\F``.
- ``parallel``: every ray is parallel to x; the line integral is a sum over x (times the x spacing),
  resampled (linear) onto square pixels of ``pixel_mm``; no magnification.
- ``cone``: a point source ``source_distance_mm`` before the isocentre (default: the volume centre) on
  the patient's right and a flat detector ``detector_distance_mm`` behind it; divergent rays are sampled
  every ``step_mm`` along x with trilinear interpolation. ``pixel_mm`` is the detector pixel; objects at
  the isocentre are magnified by ``(source_distance + detector_distance) / source_distance``.
`project_points` uses the same `DRRGeometry`, so world points (e.g. vertebral-body centroids) map to the
pixel where their ray hits the detector.

Intensity: HU -> linear attenuation at ~60 keV (`ct_to_attenuation`), integrated along each ray (a
dimensionless optical depth, i.e. -log of the transmitted fraction, which is what a log-responding
detector shows), unsharp-masked like processed radiographs, then windowed between robust percentiles to
[0, 1]: bone bright, air dark.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

import numpy as np
from scipy import ndimage as ndi

log = logging.getLogger(__name__)

# Linear attenuation coefficient of water at 60 keV: mass attenuation 0.2059 cm^2/g (NIST XCOM) x 1 g/cm^3.
MU_WATER_60KEV_PER_MM = 0.02059
DEFAULT_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
Geometry = Literal["parallel", "cone"]


class VolumeLike(Protocol):
    """What the DRR needs from `raypipe.io.ct.CTVolume` (structural, so tests can pass stubs)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


@dataclass(frozen=True)
class DRRGeometry:
    """Everything needed to map world LPS mm to DRR pixels, shared by `lateral_drr` and `project_points`.

    ``y_ref``/``z_ref`` are the world y/z of the detector pixel ``(col_ref, row_ref)``; for ``parallel`` they
    describe the image plane itself, for ``cone`` the detector plane at ``x = detector_x``.
    """

    kind: Geometry
    rows: int
    cols: int
    pixel_mm: float
    y_ref: float
    z_ref: float
    col_ref: float
    row_ref: float
    source_x: float = float("nan")
    detector_x: float = float("nan")
    source_distance_mm: float = float("inf")
    detector_distance_mm: float = 0.0

    @property
    def magnification(self) -> float:
        """Magnification of an object at the isocentre (1 for parallel projection)."""
        if self.kind == "parallel":
            return 1.0
        return (self.source_distance_mm + self.detector_distance_mm) / self.source_distance_mm

    @property
    def pixel_mm_at_isocentre(self) -> float:
        """Pixel size in the patient (isocentre plane): DICOM PixelSpacing of the DRR."""
        return self.pixel_mm / self.magnification


@dataclass(frozen=True)
class DRR:
    """A lateral DRR: ``image`` float32 (rows, cols) in [0, 1] bone bright, ``line_integral`` unnormalised."""

    image: np.ndarray
    line_integral: np.ndarray
    geometry: DRRGeometry


def ct_to_attenuation(hu: np.ndarray, mu_water: float = MU_WATER_60KEV_PER_MM) -> np.ndarray:
    """Linear attenuation (1/mm) from HU: ``mu = mu_water * (1 + HU / 1000)``, clipped at 0 (air).

    HU is defined by ``HU = 1000 (mu - mu_water) / mu_water`` at the scan energy; using mu_water at ~60 keV
    (the mean energy of a ~120 kVp beam, typical of radiography too) gives a plausible X-ray contrast.
    """
    mu = np.float32(mu_water) * (1.0 + np.asarray(hu, dtype=np.float32) / np.float32(1000.0))
    return np.maximum(mu, np.float32(0.0))


def _index_to_world(ct: VolumeLike) -> tuple[np.ndarray, np.ndarray]:
    """(3x3 matrix, origin) mapping voxel index (x, y, z) to world LPS mm (direction-aware)."""
    direction = np.asarray(getattr(ct, "direction", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    return direction @ np.diag(np.asarray(ct.spacing, dtype=float)), np.asarray(ct.origin, dtype=float)


def _check_axis_aligned(ct: VolumeLike) -> None:
    """The DRR samples along array axes; a canonical LPS CT has (near) identity direction cosines."""
    direction = np.asarray(getattr(ct, "direction", np.eye(3).ravel()), dtype=float).reshape(3, 3)
    if not np.allclose(direction, np.eye(3), atol=1e-3):
        raise ValueError(
            "lateral_drr needs a CT on the canonical LPS grid with identity direction (read it with read_ct); "
            f"got direction {direction.round(4).tolist()}"
        )


def _world_bounds(ct: VolumeLike) -> tuple[np.ndarray, np.ndarray]:
    """World LPS coordinates (x, y, z) of the first and last voxel centres."""
    m, o = _index_to_world(ct)
    nz, ny, nx = ct.hu.shape
    return o, o + m @ np.array([nx - 1, ny - 1, nz - 1], dtype=float)


def make_geometry(
    ct: VolumeLike,
    geometry: Geometry = "parallel",
    source_distance_mm: float = 1000.0,
    detector_distance_mm: float = 200.0,
    pixel_mm: float | None = None,
    isocentre_mm: Sequence[float] | None = None,
) -> DRRGeometry:
    """The detector grid that covers the whole projected volume for the given geometry (see module doc)."""
    _check_axis_aligned(ct)
    lo, hi = _world_bounds(ct)
    sx, sy, sz = (float(s) for s in ct.spacing)
    if geometry == "parallel":
        px = float(pixel_mm) if pixel_mm else min(sy, sz)
        cols = int(np.floor((hi[1] - lo[1]) / px + 1e-6)) + 1
        rows = int(np.floor((hi[2] - lo[2]) / px + 1e-6)) + 1
        return DRRGeometry("parallel", rows, cols, px, y_ref=lo[1], z_ref=hi[2], col_ref=0.0, row_ref=0.0)
    if geometry != "cone":
        raise ValueError(f"geometry must be 'parallel' or 'cone', got {geometry!r}")
    if source_distance_mm <= 0 or detector_distance_mm < 0:
        raise ValueError("source_distance_mm must be > 0 and detector_distance_mm >= 0")
    iso = (lo + hi) / 2 if isocentre_mm is None else np.asarray(isocentre_mm, dtype=float)
    source_x = iso[0] - source_distance_mm
    detector_x = iso[0] + detector_distance_mm
    if lo[0] <= source_x or hi[0] >= detector_x:
        raise ValueError(
            f"the CT spans x {lo[0]:.0f}..{hi[0]:.0f} mm: the source ({source_x:.0f}) and detector "
            f"({detector_x:.0f}) must lie outside it; increase source_distance_mm / detector_distance_mm"
        )
    mag = (source_distance_mm + detector_distance_mm) / source_distance_mm
    px = float(pixel_mm) if pixel_mm else min(sy, sz) * mag
    probe = DRRGeometry("cone", 1, 1, px, iso[1], iso[2], 0.0, 0.0, source_x, detector_x,
                        float(source_distance_mm), float(detector_distance_mm))
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    uv = project_points(corners, probe)
    cmin, rmin = np.floor(uv.min(axis=0))
    cmax, rmax = np.ceil(uv.max(axis=0))
    return DRRGeometry(
        "cone",
        rows=int(rmax - rmin) + 1,
        cols=int(cmax - cmin) + 1,
        pixel_mm=px,
        y_ref=iso[1],
        z_ref=iso[2],
        col_ref=-cmin,
        row_ref=-rmin,
        source_x=source_x,
        detector_x=detector_x,
        source_distance_mm=float(source_distance_mm),
        detector_distance_mm=float(detector_distance_mm),
    )


def project_points(points_world_mm: np.ndarray, geometry: DRRGeometry) -> np.ndarray:
    """World LPS points (N, 3) -> DRR pixel coords (N, 2) as (x = column, y = row), same geometry as the image."""
    p = np.atleast_2d(np.asarray(points_world_mm, dtype=float))
    if p.shape[-1] != 3:
        raise ValueError(f"points must be (N, 3) world mm, got shape {p.shape}")
    y, z = p[:, 1], p[:, 2]
    if geometry.kind == "cone":
        dx = p[:, 0] - geometry.source_x
        if np.any(dx <= 0):
            raise ValueError("points behind the X-ray source cannot be projected")
        t = (geometry.detector_x - geometry.source_x) / dx
        # The source lies at (source_x, y_ref, z_ref): the central ray passes through the isocentre.
        y = geometry.y_ref + (y - geometry.y_ref) * t
        z = geometry.z_ref + (z - geometry.z_ref) * t
    col = geometry.col_ref + (y - geometry.y_ref) / geometry.pixel_mm
    row = geometry.row_ref + (geometry.z_ref - z) / geometry.pixel_mm
    return np.stack([col, row], axis=1)


def _normalise(line_integral: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Window the optical depth between robust percentiles to [0, 1] (bone bright), like a displayed film."""
    lo, hi = np.percentile(line_integral, [low_pct, high_pct])
    if hi <= lo:
        return np.zeros_like(line_integral, dtype=np.float32)
    return np.clip((line_integral - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _parallel_integral(mu: np.ndarray, ct: VolumeLike, g: DRRGeometry) -> np.ndarray:
    """Sum along x (times spacing), then resample the (z, y) plane to square pixels, superior row first."""
    sx, sy, sz = (float(s) for s in ct.spacing)
    plane = mu.sum(axis=2, dtype=np.float64) * sx  # (z, y)
    lo, _ = _world_bounds(ct)
    rows, cols = np.meshgrid(np.arange(g.rows, dtype=float), np.arange(g.cols, dtype=float), indexing="ij")
    y = g.y_ref + (cols - g.col_ref) * g.pixel_mm
    z = g.z_ref - (rows - g.row_ref) * g.pixel_mm
    coords = np.stack([(z - lo[2]) / sz, (y - lo[1]) / sy])
    return ndi.map_coordinates(plane, coords, order=1, mode="nearest").astype(np.float32)


def _cone_integral(mu: np.ndarray, ct: VolumeLike, g: DRRGeometry, step_mm: float, chunk_rows: int) -> np.ndarray:
    """Divergent rays from the source to each detector pixel, sampled every `step_mm` in x (trilinear)."""
    lo, hi = _world_bounds(ct)
    sx, sy, sz = (float(s) for s in ct.spacing)
    xs = np.arange(lo[0], hi[0] + 1e-6, step_mm)
    cols = np.arange(g.cols, dtype=float)
    det_y = g.y_ref + (cols - g.col_ref) * g.pixel_mm
    out = np.zeros((g.rows, g.cols), dtype=np.float32)
    sdd = g.detector_x - g.source_x
    t = (xs - g.source_x) / sdd  # fraction of the way from source to detector at each x plane
    xi = (xs - lo[0]) / sx
    for r0 in range(0, g.rows, chunk_rows):
        rws = np.arange(r0, min(g.rows, r0 + chunk_rows), dtype=float)
        det_z = g.z_ref - (rws - g.row_ref) * g.pixel_mm
        # Ray through detector pixel (det_y, det_z) from the source at (source_x, y_ref, z_ref).
        y = g.y_ref + (det_y[None, :, None] - g.y_ref) * t[None, None, :]
        z = g.z_ref + (det_z[:, None, None] - g.z_ref) * t[None, None, :]
        shape = (len(rws), g.cols, len(xs))
        coords = np.stack([
            np.broadcast_to((z - lo[2]) / sz, shape),
            np.broadcast_to((y - lo[1]) / sy, shape),
            np.broadcast_to(xi[None, None, :], shape),
        ]).reshape(3, -1)
        vals = ndi.map_coordinates(mu, coords, order=1, mode="constant", cval=0.0).reshape(shape)
        # Path length per x step grows with the ray's obliquity: ds = dx * |ray| / |ray_x|.
        ray_len = np.sqrt(sdd**2 + (det_y[None, :] - g.y_ref) ** 2 + (det_z[:, None] - g.z_ref) ** 2) / sdd
        out[int(r0):int(r0) + len(rws)] = vals.sum(axis=2) * step_mm * ray_len
    return out


def lateral_drr(
    ct: VolumeLike,
    geometry: Geometry = "parallel",
    source_distance_mm: float = 1000.0,
    detector_distance_mm: float = 200.0,
    pixel_mm: float | None = None,
    isocentre_mm: Sequence[float] | None = None,
    step_mm: float | None = None,
    window_percentiles: tuple[float, float] = (1.0, 99.8),
    mu_water: float = MU_WATER_60KEV_PER_MM,
    enhance: float = 0.7,
    enhance_sigma_mm: float = 25.0,
    chunk_rows: int = 32,
) -> DRR:
    """Left-lateral DRR of a canonical-LPS CT (rows superior->inferior, columns anterior->posterior).

    ``pixel_mm`` defaults to the finer of the CT's y/z spacings at the isocentre; ``step_mm`` (cone only) to
    half the x spacing. ``enhance`` subtracts that fraction of a Gaussian blur (``enhance_sigma_mm``) from the
    optical depth before windowing: the unsharp masking of radiography post-processing, which lifts the spine
    out of the thick soft-tissue background (0 = plain windowed line integral). See the module docstring.
    """
    if not 0.0 <= enhance < 1.0:
        raise ValueError(f"enhance must be in [0, 1), got {enhance}")
    g = make_geometry(ct, geometry, source_distance_mm, detector_distance_mm, pixel_mm, isocentre_mm)
    mu = ct_to_attenuation(ct.hu, mu_water)
    if g.kind == "parallel":
        integral = _parallel_integral(mu, ct, g)
    else:
        step = float(step_mm) if step_mm else float(ct.spacing[0]) / 2
        integral = _cone_integral(mu, ct, g, step, chunk_rows)
    shown = integral
    if enhance > 0:
        sigma_px = enhance_sigma_mm / g.pixel_mm_at_isocentre
        shown = integral - np.float32(enhance) * ndi.gaussian_filter(integral, sigma_px, mode="nearest")
    log.debug("DRR %s %dx%d px %.3f mm", g.kind, g.rows, g.cols, g.pixel_mm)
    return DRR(_normalise(shown, *window_percentiles), integral, g)


def voxel_to_world(ct: VolumeLike, zyx: np.ndarray) -> np.ndarray:
    """Voxel indices (N, 3) in array order (z, y, x) -> world LPS mm (N, 3) as (x, y, z)."""
    m, o = _index_to_world(ct)
    idx = np.atleast_2d(np.asarray(zyx, dtype=float))[:, ::-1]
    return idx @ m.T + o


def vertebra_centres(
    masks: Mapping[str, np.ndarray],
    ct: VolumeLike,
    levels: Sequence[str] = DEFAULT_LEVELS,
    body_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """World-mm centroid (x, y, z) of each level's vertebral *body* (the paper's keypoints are body centres).

    The body is the vertebra mask intersected with ``body_mask`` (or ``masks["vertebral_body"]``) when
    available, else `raypipe.preprocess.ct.geometric_body` (voxels anterior to the vertebral canal), so
    posterior elements do not pull the centre backwards. Missing or empty levels are left out.
    """
    from raypipe.preprocess.ct import vertebral_bodies

    if body_mask is None and "vertebral_body" in masks:
        body_mask = masks["vertebral_body"]
    bodies = vertebral_bodies(masks, levels=levels, body_mask=body_mask)
    out: dict[str, np.ndarray] = {}
    for lvl in levels:
        b = bodies.get(lvl)
        if b is None or not b.any():
            whole = masks.get(f"vertebrae_{lvl}")
            if whole is None or not np.asarray(whole).any():
                continue
            b = np.asarray(whole, dtype=bool)  # body intersection empty: fall back to the whole vertebra
            log.warning("level %s: empty vertebral body, using the whole vertebra's centroid", lvl)
        out[lvl] = voxel_to_world(ct, np.array(ndi.center_of_mass(b)))[0]
    return out
