"""Image-similarity metrics for generated radiographs: PSNR, SSIM and MS-SSIM (torch, CPU or GPU).

MS-SSIM follows Wang, Simoncelli & Bovik (2003): an 11-tap Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, "valid" filtering, 2x average-pool downsampling between scales and the
standard five scale weights. Five scales need the smaller image side to stay >= 11 px after four
halvings, i.e. >= 161 px. Smaller images use the largest number of scales that fits, with the
leading weights renormalised to sum to one; such values are not comparable with 5-scale MS-SSIM
(report the number of scales with them: `ms_ssim_scales(side)`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WIN, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03


def _pair(a: ArrayLike | torch.Tensor, b: ArrayLike | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as float64 tensors of shape (N, C, H, W) on one device."""
    ta = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    tb = b.detach() if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b))
    if ta.shape != tb.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    if not 2 <= ta.ndim <= 4:
        raise ValueError(f"images must be (H, W), (C, H, W) or (N, C, H, W), got shape {tuple(ta.shape)}")
    ta, tb = ta.to(torch.float64), tb.to(device=ta.device, dtype=torch.float64)
    if not (torch.isfinite(ta).all() and torch.isfinite(tb).all()):
        raise ValueError("images contain NaN or infinite values")
    while ta.ndim < 4:
        ta, tb = ta.unsqueeze(0), tb.unsqueeze(0)
    return ta, tb


def _check_range(data_range: float) -> float:
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return float(data_range)


def psnr(a: ArrayLike | torch.Tensor, b: ArrayLike | torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(range^2 / MSE); inf for identical images."""
    rng = _check_range(data_range)
    ta, tb = _pair(a, b)
    mse = float(torch.mean((ta - tb) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(rng * rng / mse)


def ms_ssim_scales(side: int) -> int:
    """Number of MS-SSIM scales usable for images whose smaller side is `side` (5 from 161 px)."""
    if side < _WIN:
        raise ValueError(f"images need a side of at least {_WIN} px for SSIM, got {side}")
    return max(m for m in range(1, len(MS_SSIM_WEIGHTS) + 1) if math.ceil(side / 2 ** (m - 1)) >= _WIN)


def _gaussian_filter(x: torch.Tensor) -> torch.Tensor:
    """Separable 11-tap Gaussian blur per channel, 'valid' (no padding) as in the reference code."""
    coords = torch.arange(_WIN, dtype=x.dtype, device=x.device) - (_WIN - 1) / 2
    g = torch.exp(-(coords**2) / (2 * _SIGMA**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per (image, channel)."""
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mu_x, mu_y = _gaussian_filter(x), _gaussian_filter(y)
    var_x = _gaussian_filter(x * x) - mu_x**2
    var_y = _gaussian_filter(y * y) - mu_y**2
    cov = _gaussian_filter(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).mean(dim=(-2, -1)), cs.mean(dim=(-2, -1))


def ssim(a: ArrayLike | torch.Tensor, b: ArrayLike | torch.Tensor, data_range: float) -> float:
    """Single-scale SSIM (Gaussian window), averaged over images and channels."""
    rng = _check_range(data_range)
    ta, tb = _pair(a, b)
    ms_ssim_scales(min(ta.shape[-2:]))
    return float(_ssim_cs(ta, tb, rng)[0].mean())


def ms_ssim(
    a: ArrayLike | torch.Tensor, b: ArrayLike | torch.Tensor, data_range: float, scales: int | None = None
) -> float:
    """Multi-scale SSIM in [0, 1] (1 = identical); fewer than 5 scales below 161 px, see the module note."""
    rng = _check_range(data_range)
    x, y = _pair(a, b)
    max_scales = ms_ssim_scales(min(x.shape[-2:]))
    n_scales = max_scales if scales is None else int(scales)
    if not 1 <= n_scales <= max_scales:
        raise ValueError(f"scales must be in 1..{max_scales} for images of side {min(x.shape[-2:])}, got {scales}")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:n_scales], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    terms = []
    for level in range(n_scales):
        s, cs = _ssim_cs(x, y, rng)
        terms.append(torch.relu(s if level == n_scales - 1 else cs))
        if level < n_scales - 1:
            x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
            y = F.avg_pool2d(y, kernel_size=2, stride=2, ceil_mode=True)
    stacked = torch.stack(terms, dim=-1)  # (N, C, scales)
    return float(torch.prod(stacked**weights, dim=-1).mean())
