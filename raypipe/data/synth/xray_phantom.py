"""Lateral lumbar radiograph phantom (pure numpy): analytic projection of T11-S1, soft tissue, noise.

Image convention: rows run superior -> inferior, the patient faces the image left (anterior = low column).
Pixel values are 12-bit, bone bright (MONOCHROME2). Keypoints are L1-L5 body centres, ``[x=column, y=row]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

ROWS, COLS = 512, 384
LEVELS: tuple[str, ...] = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")
KEYPOINT_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
BONE_KAPPA = 2.5        # bone attenuation gain relative to CT numbers at radiographic energies


@dataclass
class XRPhantom:
    """A lateral radiograph (uint16, 12 bits stored) with its L1-L5 centre keypoints."""
    pixels: np.ndarray
    pixel_spacing: float       # mm per pixel (rows and columns)
    keypoints: dict[str, list[float]]


def _weq(hu: float) -> float:
    """Water-equivalent path per mm of a tissue with CT number ``hu``."""
    return 1.0 + (BONE_KAPPA if hu > 100 else 1.0) * hu / 1000.0


def make_xray_phantom(rng: np.random.Generator, density_hu: float, wedge: dict[str, float], bmi: float) -> XRPhantom:
    """Render one lateral lumbar radiograph; vertebral density ``density_hu`` and per-level wedge fractions."""
    native = float(rng.choice([0.143, 0.148, 0.15, 0.16, 0.175, 0.2]))
    binning = max(1, round(0.78 / native))
    p = round(native * binning, 4)                      # mm per stored pixel
    theta = math.radians(rng.uniform(-15.0, 15.0))
    mag = rng.uniform(0.88, 1.15)
    cx = (COLS - 1) / 2 + rng.uniform(-25, 25)
    cy = (ROWS - 1) / 2 + rng.uniform(-30, 30)
    yy, xx = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    ct, st = math.cos(theta), math.sin(theta)
    dx, dy = (xx - cx) * p / mag, (yy - cy) * p / mag
    U = ct * dx + st * dy          # phantom AP (posterior +), mm
    W = -st * dx + ct * dy         # phantom SI (inferior +), mm

    def to_px(u: float, w: float) -> list[float]:
        x = cx + (ct * u - st * w) * mag / p
        y = cy + (st * u + ct * w) * mag / p
        return [round(float(x), 2), round(float(y), 2)]

    scale = rng.uniform(0.93, 1.07)
    # soft tissue: lateral path through an elliptic abdomen
    Bx = (120.0 + 5.0 * (bmi - 24.0)) * rng.uniform(0.95, 1.05)
    Ba = (118.0 + 4.0 * (bmi - 24.0)) * rng.uniform(0.95, 1.05)
    ub = rng.uniform(-32.0, -20.0)          # abdomen centre is anterior of the spine
    r = np.clip(1.0 - ((U - ub) / Ba) ** 2, 0.0, None)
    P = 2 * Bx * np.sqrt(r) * _weq(30.0)
    # bowel gas
    for _ in range(int(rng.integers(3, 8))):
        gu, gw, gr = rng.uniform(-150, -40), rng.uniform(-120, 140), rng.uniform(8, 25)
        P -= 30.0 * np.exp(-(((U - gu) ** 2 + (W - gw) ** 2) / (2 * gr * gr)))

    d = float(density_hu)
    cortex = 330.0 + 1.4 * d
    soft = _weq(40.0)
    tex = gaussian_filter(rng.standard_normal((ROWS, COLS)).astype(np.float32), 1.2)
    tex /= tex.std() + 1e-6
    tex_amp = 22.0 + 0.18 * (250.0 - d)

    heights = dict(zip(LEVELS, (24.5, 25.5, 26.5, 27.5, 28.5, 28.5, 28.0)))
    discs = [rng.uniform(8.0, 11.0) for _ in LEVELS]
    # centres along the SI axis, L3 at 0
    w_c: dict[str, float] = {}
    w = 0.0
    order = list(LEVELS)
    i3 = order.index("L3")
    w_c["L3"] = 0.0
    for i in range(i3 - 1, -1, -1):
        w -= (heights[order[i]] + heights[order[i + 1]]) / 2 * scale + discs[i]
        w_c[order[i]] = w
    w = 0.0
    for i in range(i3 + 1, len(order)):
        w += (heights[order[i]] + heights[order[i - 1]]) / 2 * scale + discs[i]
        w_c[order[i]] = w
    lord = rng.uniform(10.0, 25.0)
    span = w_c["L5"] - w_c["T12"]

    def u_of(wv: float) -> float:      # lordotic curve: most anterior near L3/L4
        return -lord * math.cos(math.pi * (wv - w_c["L3"] - 0.1 * span) / (1.6 * span))

    keypoints: dict[str, list[float]] = {}
    bodies: list[tuple[float, float, float, float, float, float, str]] = []
    for lv in LEVELS:
        wc = w_c[lv]
        uc = u_of(wc)
        tilt = math.atan2(u_of(wc + 1.0) - u_of(wc - 1.0), 2.0)  # follow the curve
        bodies.append((uc, wc, tilt, heights[lv] * scale, (16.0 + 0.4 * LEVELS.index(lv)) * scale, wedge.get(lv, 0.0), lv))
    # S1: tilted block below L5
    l5 = bodies[-1]
    s1w = l5[1] + l5[3] / 2 + discs[-1] + 14.0
    bodies.append((u_of(s1w) + 6.0, s1w, math.radians(rng.uniform(30, 45)), 28.0 * scale, 19.0 * scale, 0.0, "S1"))

    for uc, wc, tilt, h, b, wg, lv in bodies:
        ca, sa = math.cos(tilt), math.sin(tilt)
        du, dw = U - uc, W - wc
        a = ca * du - sa * dw          # local AP
        e = sa * du + ca * dw          # local SI (inferior +)
        alat = 1.3 * b
        top = -h / 2 + wg * h * np.clip((b - a) / (2 * b), 0, 1) + 0.8 * (1 - np.clip(a / b, -1, 1) ** 2)
        bot = h / 2 - 0.8 * (1 - np.clip(a / b, -1, 1) ** 2)
        inside = (np.abs(a) <= b) & (e >= top) & (e <= bot)
        ro = np.sqrt(np.clip(1 - (a / b) ** 2, 0, None))
        ri = np.sqrt(np.clip(1 - (a / (b - 1.6)) ** 2, 0, None))
        l_out = 2 * alat * ro
        l_in = 2 * (alat - 1.6) * ri
        endplate = (e - top < 1.5) | (bot - e < 1.5)
        trab_hu = d + 15.0 * wg + tex_amp * tex
        val = np.where(endplate, l_out * (_weq(cortex) - soft),
                       l_in * (1.0 + BONE_KAPPA * trab_hu / 1000.0 - soft) + (l_out - l_in) * (_weq(cortex) - soft))
        P += np.where(inside, val, 0.0)
        if lv != "S1":
            # pedicles + posterior arch (two lateral bony plates) and spinous process
            ped = (a > b) & (a < b + 16 * scale) & (e > -h / 2) & (e < 0.1 * h)
            P += np.where(ped, 16.0 * (_weq(0.8 * cortex) - soft), 0.0)
            arch = (a > b + 16 * scale) & (a < b + 30 * scale) & (e > -0.3 * h) & (e < 0.5 * h)
            P += np.where(arch, 14.0 * (_weq(0.7 * cortex) - soft), 0.0)
            spin = (a > b + 30 * scale) & (a < b + 55 * scale) & (e > -0.1 * h) & (e < 0.45 * h)
            P += np.where(spin, 7.0 * (_weq(0.7 * cortex) - soft), 0.0)
        if lv in KEYPOINT_LEVELS:
            ec = (wg * h / 2) / 2         # wedge lowers the anterior top: centre moves down a little
            keypoints[lv] = to_px(uc + sa * ec, wc + ca * ec)

    # iliac crest overlapping L5/S1 and ribs near T12/L1
    iu, iw = rng.uniform(-10, 30), w_c["L5"] + rng.uniform(0, 25)
    ring = np.abs(np.sqrt(((U - iu) / 70.0) ** 2 + ((W - iw) / 45.0) ** 2) - 1.0) < 0.08
    P += np.where(ring & (W > iw - 40), 10.0, 0.0)
    for k in range(3):
        rw = w_c["T12"] + (k - 1) * 30 + rng.uniform(-5, 5)
        band = np.abs(W - rw - 0.35 * (U - 20)) < 5.0
        P += np.where(band & (U > -120) & (U < 80), 6.0, 0.0)

    P = gaussian_filter(P.astype(np.float32), 0.8)
    # processing: unsharp equalisation, then quantum-like noise and window to 12 bits
    P = P - 0.75 * gaussian_filter(P, 30.0 / p)
    P += rng.standard_normal(P.shape).astype(np.float32) * rng.uniform(0.4, 0.9)
    lo, hi = np.percentile(P, [0.5, 99.8])
    img = np.clip((P - lo) / (hi - lo), 0, 1) ** rng.uniform(0.8, 1.2)
    pix = np.rint(200 + 3700 * img).astype(np.uint16)
    return XRPhantom(pixels=pix, pixel_spacing=p, keypoints=keypoints)
