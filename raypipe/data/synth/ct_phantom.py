"""Abdominal CT phantom (pure numpy): body, organs, T11-L5 vertebrae, paravertebral muscles, and masks.

Array axis order is (z, y, x) in the canonical LPS frame of ``docs/CONTRACTS.md``: x toward patient left,
y toward posterior, z toward superior; index z = 0 is the most inferior slice. All lengths are in mm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtri

VERTEBRA_LEVELS: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")  # superior -> inferior
LEVEL_DENSITY_OFFSET_HU = dict(zip(VERTEBRA_LEVELS, (-9.0, -6.0, -3.0, 0.0, 3.0, 6.0, 9.0)))
LEVEL_HEIGHT_MM = dict(zip(VERTEBRA_LEVELS, (24.5, 25.5, 26.5, 27.5, 28.5, 28.5, 28.0)))
MUSCLES: tuple[str, ...] = ("autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right")
MATRIX = 256
SLICE_MM = 5.0
HU_MIN, HU_MAX = -1024, 3071


@dataclass
class CTPhantom:
    """A CT volume in HU with its label maps, on one grid."""
    hu: np.ndarray                 # int16 (z, y, x)
    spacing: tuple[float, float, float]   # (x, y, z) mm
    origin: tuple[float, float, float]    # world LPS of voxel (0, 0, 0)
    level: np.ndarray              # uint8: 0 none, 1..7 = T11..L5, 8 = sacrum
    body: np.ndarray               # uint8: 1 vertebral body, 2 intervertebral disc
    muscle: np.ndarray             # uint8: index into MUSCLES + 1
    level_z_mm: dict[str, tuple[float, float]] = field(default_factory=dict)  # body z-range (world)

    def masks(self) -> dict[str, np.ndarray]:
        """TotalSegmentator-named uint8 masks."""
        out = {f"vertebrae_{lv}": (self.level == i + 1).astype(np.uint8) for i, lv in enumerate(VERTEBRA_LEVELS)}
        out["sacrum"] = (self.level == 8).astype(np.uint8)
        for i, m in enumerate(MUSCLES):
            out[m] = (self.muscle == i + 1).astype(np.uint8)
        return out


def _bandpass_noise(rng: np.random.Generator, shape: tuple[int, ...], wavelength_px: float,
                    rel_width: float = 0.5) -> np.ndarray:
    """Unit-variance noise band-limited in the last two axes around ``wavelength_px`` (batched over the rest)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = np.fft.rfft2(white)
    ky = np.fft.fftfreq(shape[-2])[:, None]
    kx = np.fft.rfftfreq(shape[-1])[None, :]
    k = np.sqrt(kx * kx + ky * ky)
    k0 = 1.0 / max(wavelength_px, 2.0)
    filt = np.exp(-0.5 * ((k - k0) / (rel_width * k0)) ** 2).astype(np.float32)
    out = np.fft.irfft2(spec * filt, s=shape[-2:]).astype(np.float32)
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


def _lowpass_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = np.fft.rfft2(white)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    filt = np.exp(-2 * (math.pi * sigma_px) ** 2 * (kx * kx + ky * ky)).astype(np.float32)
    out = np.fft.irfft2(spec * filt, s=shape).astype(np.float32)
    out -= out.mean()
    out /= out.std() + 1e-6
    return out


def _ell(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return (u * u) / (a * a) + (v * v) / (b * b) <= 1.0


def _blur3(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """[1, 2, 1] / 4 smoothing along the given axes (edge rows/columns are kept as they are: air)."""
    for ax in axes:
        y = np.moveaxis(x, ax, 0)
        out = y.copy()
        out[1:-1] *= 0.5
        out[1:-1] += 0.25 * y[:-2]
        out[1:-1] += 0.25 * y[2:]
        x = np.moveaxis(out, 0, ax)
    return x


def make_ct_phantom(rng: np.random.Generator, density_hu: float, fat_fraction: float, bmi: float,
                    wedge: dict[str, float] | None = None) -> CTPhantom:
    """Render one abdomen CT: trabecular mean ``density_hu``, muscle fat fraction, BMI-dependent habitus.

    ``wedge`` maps lumbar levels to an anterior height loss fraction (compression deformity).
    """
    wedge = wedge or {}
    n = MATRIX
    s = float(np.clip(0.70 + 0.2 * (bmi - 18.0) / 17.0 + rng.normal(0, 0.03), 0.70, 0.90))
    s = round(s, 4)
    half = (n - 1) / 2 * s
    coords = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * s
    U = np.broadcast_to(coords[None, :], (n, n))   # x (left +), per column
    V = np.broadcast_to(coords[:, None], (n, n))   # y (posterior +), per row

    # --- habitus -------------------------------------------------------------------------------------
    A = half * 0.90 * rng.uniform(0.96, 1.02)
    B = A * rng.uniform(0.72, 0.80)
    bcx, bcy = rng.normal(0, 2.5), rng.normal(0, 2.5)
    t_fat = float(np.clip(6.0 + 1.6 * (bmi - 20.0) + rng.normal(0, 2), 4.0, 25.0))
    scale = rng.uniform(0.93, 1.07)             # vertebral size
    xs0 = bcx + rng.normal(0, 1.5)
    ys0 = bcy + B - t_fat - 60.0 * scale
    bu, bv = U - bcx, V - bcy
    body_out = _ell(bu, bv, A, B)
    inner = _ell(bu, bv, A - t_fat, B - t_fat)
    wall_in = _ell(bu, bv, A - t_fat - 7, B - t_fat - 7)

    static = np.full((n, n), -1000.0, dtype=np.float32)
    static[body_out] = -105.0
    static[inner] = 45.0
    visc_noise = _lowpass_noise(rng, (n, n), 6.0 / s)
    liver = _ell(U - (bcx - 0.42 * A), V - (bcy - 0.05 * B), 0.48 * A, 0.62 * B) & wall_in
    kid_l = _ell(U - (xs0 + 0.52 * A), V - (ys0 + 4), 0.14 * A, 0.11 * A)
    kid_r = _ell(U - (xs0 - 0.52 * A), V - (ys0 + 4), 0.14 * A, 0.11 * A)
    aorta_hu = float(rng.choice([45.0, 160.0]))   # non-contrast or portal-venous phase
    aorta = _ell(U - (xs0 + 11), V - (ys0 - 31 * scale), 9.5, 9.5)
    ivc = _ell(U - (xs0 - 19), V - (ys0 - 27 * scale), 11, 7.5)
    gas_centres = [(rng.uniform(-0.5, 0.5) * A + bcx, rng.uniform(-0.85, -0.3) * B + bcy, rng.uniform(5, 12))
                   for _ in range(int(rng.integers(2, 5)))]
    gas = np.zeros((n, n), bool)
    for gx, gy, gr in gas_centres:
        gas |= _ell(U - gx, V - gy, gr, gr * 0.8)
    gas &= wall_in

    # --- z layout (local mm, 0 = bottom of the volume) ------------------------------------------------
    sacrum_h = 12.0
    z = sacrum_h
    body_range: dict[str, tuple[float, float]] = {}
    for lv in reversed(VERTEBRA_LEVELS):
        z += rng.uniform(8.0, 10.0)                         # disc below this level
        h = LEVEL_HEIGHT_MM[lv] * scale * rng.uniform(0.96, 1.04)
        body_range[lv] = (z, z + h)
        z += h
    z_top = z + rng.uniform(4.0, 6.0)
    nz = int(math.ceil(z_top / SLICE_MM))
    spine_lo, spine_hi = 0.0, nz * SLICE_MM
    z_l5, z_t11 = body_range["L5"][0], body_range["T11"][1]
    lordosis = rng.uniform(3.0, 9.0)
    z_l1_top = body_range["L1"][1]

    # --- per-level tissue values -----------------------------------------------------------------------
    d = float(density_hu)
    cortex_hu = 330.0 + 1.4 * d
    post_hu = 200.0 + 0.9 * d
    disc_hu = rng.uniform(70.0, 95.0)
    tex_amp = 22.0 + 0.18 * (250.0 - d)
    tex_wl_mm = 2.2 + 2.0 * (1.0 - (d - 60.0) / 190.0)
    f = float(fat_fraction)
    musc_lean_hu = rng.uniform(48.0, 56.0)
    fat_hu = -95.0
    thr_auto = float(ndtri(1.0 - f))
    thr_psoas = float(ndtri(1.0 - 0.6 * f))
    area = float(np.clip(1.08 - 0.6 * (f - 0.2), 0.8, 1.15))

    # trabecular texture only where the spine can be (window around it)
    r0, r1 = int(max(0, (ys0 - 45 + half) / s)), int(min(n, (ys0 + 30 + half) / s + 1))
    c0, c1 = int(max(0, (xs0 - 45 + half) / s)), int(min(n, (xs0 + 45 + half) / s + 1))
    tex = np.zeros((nz, n, n), np.float32)
    tex[:, r0:r1, c0:c1] = _bandpass_noise(rng, (nz, r1 - r0, c1 - c0), tex_wl_mm / s)
    speck = _lowpass_noise(rng, (n, n), 1.2 / s)
    musc_tex = _lowpass_noise(rng, (n, n), 0.8 / s)

    hu = np.empty((nz, n, n), np.float32)
    level = np.zeros((nz, n, n), np.uint8)
    body = np.zeros((nz, n, n), np.uint8)
    muscle = np.zeros((nz, n, n), np.uint8)

    span = max(z_t11 - z_l5, 1.0)
    for k in range(nz):
        zc = (k + 0.5) * SLICE_MM
        z0s, z1s = zc - SLICE_MM / 2, zc + SLICE_MM / 2
        t = float(np.clip((zc - z_l5) / span, 0, 1))         # 0 at L5 bottom, 1 at T11 top
        xs = xs0 + 1.5 * math.sin(2.0 * t * math.pi)
        ys = ys0 - lordosis * math.sin(math.pi * min(1.0, t * 1.4))
        a = (25.0 - 6.0 * t) * scale                          # body semi-axes (lateral, AP)
        b = (17.5 - 3.0 * t) * scale
        u, v = U - xs, V - ys

        sl = static.copy()
        roll = visc_noise if k == 0 else np.roll(visc_noise, (3 * k, 5 * k), axis=(0, 1))
        visc = wall_in & (roll < 0.2)
        sl[wall_in] = -95.0
        sl[visc] = 28.0
        if zc > body_range["L2"][0] - 5:
            sl[liver & (zc > body_range["L1"][0])] = 62.0
            sl[(kid_l | kid_r)] = 32.0
        elif zc > body_range["L3"][0]:
            sl[(kid_l | kid_r)] = 32.0
        sl[gas] = -880.0
        sl[aorta] = aorta_hu
        sl[ivc] = 38.0

        # muscles
        mlab = np.zeros((n, n), np.uint8)
        ax_, ay_ = 17.0 * area, 15.0 * area
        auto_l = _ell(u - 21.0 * scale, v - 42.0 * scale, ax_, ay_)
        auto_r = _ell(u + 21.0 * scale, v - 42.0 * scale, ax_, ay_)
        mlab[auto_l] = 1
        mlab[auto_r] = 2
        if zc < z_l1_top:
            g = float(np.clip((z_l1_top - zc) / max(z_l1_top - z_l5, 1.0), 0, 1))
            rp = (5.0 + 15.0 * g) * area * scale
            px = a + rp + 1.5
            mlab[_ell(u - px, v - 2.0, rp, rp * 0.85)] = 3
            mlab[_ell(u + px, v - 2.0, rp, rp * 0.85)] = 4
        sroll = np.roll(speck, (7 * k, 11 * k), axis=(0, 1))
        mroll = np.roll(musc_tex, (5 * k, 3 * k), axis=(0, 1))
        is_m = mlab > 0
        lean = musc_lean_hu + 9.0 * mroll
        thr = np.where(mlab <= 2, thr_auto, thr_psoas)
        mhu = np.where(sroll > thr, fat_hu + 10.0 * mroll, lean)
        sl[is_m] = mhu[is_m]

        # spine: canal, posterior elements, bodies, discs
        canal_v = b + 11.0 * scale
        canal = _ell(u, v - canal_v, 11.0 * scale, 8.0 * scale)
        foot = _ell(u, v, a, b)
        trab = _ell(u, v, a - 1.6, b - 1.6)
        in_spine_z = spine_lo <= zc <= spine_hi
        frac = np.zeros((n, n), np.float32)
        body_lab = np.zeros((n, n), bool)
        lev_lab = np.zeros((n, n), np.uint8)
        lev_hu = np.zeros((n, n), np.float32)
        for li, lv in enumerate(VERTEBRA_LEVELS):
            zb, zt = body_range[lv]
            h = zt - zb
            if z1s < zb - 6 or z0s > zt + 6:
                continue
            w = float(wedge.get(lv, 0.0))
            ztop = zt - w * h * np.clip((b - v) / (2 * b), 0.0, 1.0) if w > 0 else np.float32(zt)
            ov = np.clip(np.minimum(z1s, ztop) - max(z0s, zb), 0.0, SLICE_MM) / SLICE_MM
            inside = (zc >= zb) & (zc < ztop)
            frac = frac + ov * foot
            body_lab |= foot & inside
            lev_lab[foot & inside] = li + 1
            lev_hu[foot & (ov > 0)] = d + LEVEL_DENSITY_OFFSET_HU[lv] + 15.0 * w
            # posterior elements
            post = np.zeros((n, n), bool)
            if zb + 0.35 * h <= zc <= zt:                      # pedicles
                for sx in (-1.0, 1.0):
                    post |= (np.abs(u - sx * 12.5 * scale) < 4.0 * scale) & (v > b - 2) & (v < canal_v + 3)
            if zb - 4 <= zc <= zt - 4:                         # lamina + spinous process
                lam = _ell(u, v - canal_v, 17.0 * scale, 14.0 * scale) & ~canal & (v > canal_v - 2)
                spin = (np.abs(u) < 3.5 * scale) & (v > canal_v + 8) & (v < canal_v + 36 * scale)
                post |= lam | spin
            if lv.startswith("L") and zb + 0.3 * h <= zc <= zb + 0.7 * h:   # transverse processes
                post |= (np.abs(v - canal_v + 3) < 4.5) & (np.abs(u) > 14 * scale) & (np.abs(u) < 42 * scale)
            post &= ~foot
            sl[post] = post_hu + 0.6 * tex_amp * tex[k][post]
            lev_lab[post] = li + 1
            mlab[post] = 0
        # sacrum block below the L5/S1 disc
        if zc < 12.0:
            sac = foot
            body_lab_s = sac
            frac = frac + np.clip(12.0 - z0s, 0, SLICE_MM) / SLICE_MM * sac
            lev_lab[sac] = 8
            lev_hu[sac] = d + 20.0
        else:
            body_lab_s = np.zeros((n, n), bool)
        if in_spine_z:
            sl[canal] = 12.0
            mlab[canal] = 0
            frac = np.clip(frac, 0.0, 1.0)
            bone = np.where(trab, lev_hu + tex_amp * tex[k], cortex_hu)
            fz = foot
            sl[fz] = (frac * bone + (1.0 - frac) * disc_hu)[fz]
            mlab[fz] = 0
            body[k][foot & body_lab] = 1
            body[k][foot & ~body_lab & ~body_lab_s] = 2
        level[k] = lev_lab
        muscle[k] = mlab
        hu[k] = sl

    # scanner: in-plane PSF (blur), correlated noise
    sigma = rng.uniform(8.0, 16.0)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(sigma / 0.375)
    hu = _blur3(hu, (1, 2))
    hu_i = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    origin_z = round(float(rng.uniform(-450.0, -150.0)), 1)
    origin = (round(-half + float(rng.normal(0, 4)), 3), round(-half + float(rng.normal(-20, 4)), 3), origin_z)
    level_z = {lv: (origin_z + zb - SLICE_MM / 2, origin_z + zt - SLICE_MM / 2) for lv, (zb, zt) in body_range.items()}
    return CTPhantom(hu=hu_i, spacing=(s, s, SLICE_MM), origin=origin, level=level, body=body, muscle=muscle,
                     level_z_mm=level_z)
