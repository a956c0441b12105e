"""Image metrics (PSNR, SSIM, MS-SSIM) and agreement statistics against closed forms and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, stats

from raypipe.metrics import bland_altman, correlation_ci, ms_ssim, ms_ssim_scales, psnr, ssim


def _phantom(side: int, seed: int = 0) -> np.ndarray:
    """A smooth radiograph-like test image in [0, 1]: blurred blocks plus a gradient."""
    rng = np.random.default_rng(seed)
    img = ndimage.zoom(rng.random((8, 8)), side / 8, order=1)[:side, :side]
    return np.clip(0.6 * img + 0.4 * np.linspace(0, 1, side)[None, :], 0, 1)


def test_psnr_closed_form_and_skimage():
    a = _phantom(64)
    b = np.clip(a + np.random.default_rng(1).normal(0, 0.05, a.shape), 0, 1)
    mse = np.mean((a - b) ** 2)
    assert psnr(a, b, 1.0) == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-9)
    assert psnr(a * 255, b * 255, 255.0) == pytest.approx(psnr(a, b, 1.0), abs=1e-9)
    assert psnr(a, a, 1.0) == math.inf
    try:
        from skimage.metrics import peak_signal_noise_ratio
    except ImportError:
        return
    assert psnr(a, b, 1.0) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-6)


def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Wang et al. SSIM with scipy's Gaussian filter (sigma 1.5, 11 taps) on the valid region."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def f(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]

    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(s.mean())


def test_ssim_equals_independent_scipy_computation():
    a = _phantom(48)
    b = np.clip(a + np.random.default_rng(2).normal(0, 0.1, a.shape), 0, 1)
    assert ssim(a, b, 1.0) == pytest.approx(_ssim_reference(a, b, 1.0), abs=1e-9)


def test_ms_ssim_scales_rule():
    assert ms_ssim_scales(161) == 5 and ms_ssim_scales(160) == 4 and ms_ssim_scales(384) == 5
    assert ms_ssim_scales(81) == 4 and ms_ssim_scales(80) == 3 and ms_ssim_scales(11) == 1
    with pytest.raises(ValueError, match="at least 11"):
        ms_ssim_scales(10)
    with pytest.raises(ValueError, match="scales must be in 1..3"):
        ms_ssim(np.zeros((64, 64)), np.zeros((64, 64)), 1.0, scales=5)


@pytest.mark.parametrize("side", [168, 64])  # five scales, and three with renormalised weights
def test_ms_ssim_identity_and_monotone_in_noise(side):
    a = _phantom(side)
    assert ms_ssim(a, a, 1.0) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(3)
    noise = rng.normal(size=a.shape)
    values = [ms_ssim(a, np.clip(a + s * noise, 0, 1), 1.0) for s in (0.01, 0.05, 0.1, 0.3)]
    assert all(x > y for x, y in zip(values, values[1:], strict=False))
    assert 0 < values[-1] < values[0] < 1


def test_ms_ssim_single_scale_is_ssim_and_batches_average():
    a, b = _phantom(40, 0), _phantom(40, 1)
    assert ms_ssim(a, b, 1.0, scales=1) == pytest.approx(ssim(a, b, 1.0), abs=1e-12)
    batch_a, batch_b = np.stack([a, b])[:, None], np.stack([b, a])[:, None]  # (N, C, H, W)
    assert ms_ssim(batch_a, batch_b, 1.0) == pytest.approx(ms_ssim(a, b, 1.0), abs=1e-12)


def test_image_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)), 1.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((4, 4)), np.zeros((4, 4)), 0.0)


def test_bland_altman_hand_computation():
    a = np.array([10.0, 12.0, 9.0, 15.0, 11.0])
    b = np.array([9.0, 13.0, 9.0, 13.0, 10.0])
    res = bland_altman(a, b)
    d = np.array([1.0, -1.0, 0.0, 2.0, 1.0])  # mean 0.6, sample SD sqrt(1.3)
    assert res.mean_difference == pytest.approx(0.6)
    assert res.sd_difference == pytest.approx(math.sqrt(1.3))
    assert res.sd_difference == pytest.approx(d.std(ddof=1))
    assert res.loa_low == pytest.approx(0.6 - 1.959964 * math.sqrt(1.3), abs=1e-5)
    assert res.loa_high == pytest.approx(0.6 + 1.959964 * math.sqrt(1.3), abs=1e-5)


def test_correlation_ci_fisher_z():
    rng = np.random.default_rng(4)
    a = rng.normal(size=50)
    b = a + rng.normal(size=50)
    res = correlation_ci(a, b)
    r = np.corrcoef(a, b)[0, 1]
    half = 1.959964 / math.sqrt(47)
    assert res.value == pytest.approx(r, abs=1e-12)
    assert res.ci_low == pytest.approx(math.tanh(math.atanh(r) - half), abs=1e-6)
    assert res.ci_high == pytest.approx(math.tanh(math.atanh(r) + half), abs=1e-6)
    ci = stats.pearsonr(a, b).confidence_interval(0.95)  # scipy uses the same Fisher transform
    assert (res.ci_low, res.ci_high) == (pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9))
    with pytest.raises(ValueError, match="constant"):
        correlation_ci(np.ones(5), a[:5])
