"""L1-L5 vertebral-body centre detection on lateral radiographs (paper 001): HRNet heatmaps.

:class:`KeypointHeatmapNet` is timm's HRNet (``features_only``, raw branch outputs at strides
4/8/16/32, random init unless a local checkpoint is given) with an HRNetV2-style head: the four
branches are upsampled to stride 4, concatenated, mixed by a 1x1 conv and mapped to one heatmap per
keypoint at 1/4 input resolution. Input sides must be multiples of 32 (384x384 in the paper).

Two heatmap kinds: ``gaussian`` (the HRNet paper's: logits regressed onto Gaussian targets with MSE) and
``softmax`` (a spatial softmax per keypoint trained with cross-entropy against the normalised Gaussian,
which learns the peak location from random init in far fewer steps); :func:`heatmap_loss` and
:meth:`KeypointHeatmapNet.decode` follow the model's kind, so a saved model decodes as it was trained.

Coordinates are ``(x, y)`` = (column, row), as in the keypoints JSON. A heatmap pixel ``(i, j)``
stands for input position ``(j * stride, i * stride)``; :func:`render_heatmaps` and
:func:`decode_heatmaps` use the same convention so that they invert each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raypipe.models.backbones import load_pretrained

__all__ = [
    "KEYPOINTS_HRNET_W32",
    "KEYPOINTS_TINY",
    "KEYPOINT_NAMES",
    "KeypointHeatmapNet",
    "decode_heatmaps",
    "heatmap_loss",
    "heatmap_probabilities",
    "keypoints_hrnet_w32",
    "keypoints_tiny",
    "object_keypoint_similarity",
    "oks_ap",
    "render_heatmaps",
]

KEYPOINT_NAMES: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
KEYPOINTS_HRNET_W32: dict[str, Any] = {"variant": "hrnet_w32"}
KEYPOINTS_TINY: dict[str, Any] = {"variant": "hrnet_w18_small"}
# gaussian is the constructor default so that models saved before `heatmap_kind` existed decode as trained
HEATMAP_KINDS = ("gaussian", "softmax")
# timm HRNet parts that only the classification model has; ignored when loading its checkpoints.
_HRNET_CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


class KeypointHeatmapNet(nn.Module):
    """HRNet + heatmap head: images ``(B, C, H, W)`` -> heatmaps ``(B, K, H/4, W/4)``."""

    def __init__(
        self,
        *,
        variant: str = "hrnet_w32",
        in_chans: int = 1,
        num_keypoints: int = len(KEYPOINT_NAMES),
        pretrained_path: str | Path | None = None,
        heatmap_kind: str = "gaussian",
    ) -> None:
        super().__init__()
        if heatmap_kind not in HEATMAP_KINDS:
            raise ValueError(f"heatmap_kind must be one of {HEATMAP_KINDS}, got {heatmap_kind!r}")
        self.heatmap_kind = heatmap_kind
        import timm  # deferred: importing timm is slow and only keypoint models need it

        self.backbone = timm.create_model(
            variant,
            pretrained=False,
            features_only=True,
            in_chans=in_chans,
            feature_location="",
            out_indices=(1, 2, 3, 4),
        )
        if pretrained_path is not None:
            load_pretrained(self.backbone, pretrained_path, ignore_prefixes=_HRNET_CLASSIFIER_PREFIXES)
        channels = sum(self.backbone.feature_info.channels())
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(channels, num_keypoints, 1)
        self.num_keypoints = num_keypoints
        self.stride = 4

    @property
    def gradcam_layer(self) -> nn.Module:
        """Fused stride-4 features, where the heatmaps are read from."""
        return self.fuse

    def forward(self, x: Tensor) -> Tensor:
        """Heatmap logits ``(B, K, H/4, W/4)``; train against :func:`render_heatmaps` targets with `heatmap_loss`."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"HRNet needs input sides that are multiples of 32, got {tuple(x.shape[-2:])}")
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        up = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return self.head(self.fuse(torch.cat(up, dim=1)))

    @torch.no_grad()
    def decode(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Keypoints ``(B, K, 2)`` in input pixels and confidence ``(B, K)`` from :meth:`forward`'s output."""
        window = 0 if self.heatmap_kind == "gaussian" else 2
        return decode_heatmaps(heatmap_probabilities(logits, self.heatmap_kind), stride=self.stride, window=window)


def keypoints_hrnet_w32(**kwargs: Any) -> KeypointHeatmapNet:
    """Paper setting: HRNet-W32 (about 29 M parameters in the trunk), 5 heatmaps at 1/4 resolution."""
    return KeypointHeatmapNet(**{**KEYPOINTS_HRNET_W32, **kwargs})


def keypoints_tiny(**kwargs: Any) -> KeypointHeatmapNet:
    """HRNet-W18-small (about 1.5 M parameters) with the same head, for tests and smoke runs."""
    return KeypointHeatmapNet(**{**KEYPOINTS_TINY, **kwargs})


def render_heatmaps(
    coords: Tensor, shape: tuple[int, int], sigma: float = 2.0, *, stride: float = 1.0
) -> Tensor:
    """Gaussian target heatmaps ``(..., K, H, W)`` with peak 1 at ``coords / stride``.

    ``coords`` is ``(..., K, 2)`` in input pixels ``(x, y)``; non-finite coordinates (missing
    keypoints) give all-zero maps. ``sigma`` is in heatmap pixels.
    """
    coords = torch.as_tensor(coords, dtype=torch.float32)
    height, width = shape
    c = coords / stride
    valid = torch.isfinite(c).all(dim=-1)
    c = torch.where(valid[..., None], c, torch.zeros_like(c))
    xs = torch.arange(width, dtype=torch.float32, device=c.device)
    ys = torch.arange(height, dtype=torch.float32, device=c.device)
    gx = torch.exp(-((xs - c[..., 0:1]) ** 2) / (2 * sigma**2))
    gy = torch.exp(-((ys - c[..., 1:2]) ** 2) / (2 * sigma**2))
    maps = gy[..., :, None] * gx[..., None, :]
    return maps * valid[..., None, None]


def heatmap_probabilities(logits: Tensor, kind: str) -> Tensor:
    """Decodable heatmaps: the logits themselves (gaussian) or a spatial softmax per keypoint (softmax)."""
    if kind == "gaussian":
        return logits
    b, k, h, w = logits.shape
    return logits.float().reshape(b, k, h * w).softmax(-1).reshape(b, k, h, w)


def heatmap_loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """Training loss against :func:`render_heatmaps` targets: MSE (gaussian) or spatial cross-entropy (softmax).

    The cross-entropy's target is each Gaussian normalised to sum 1; keypoints without a target (all-zero
    maps) add nothing.
    """
    logits, target = logits.float(), target.float()
    if kind == "gaussian":
        return F.mse_loss(logits, target)
    mass = target.flatten(2).sum(-1)
    q = target.flatten(2) / mass.clamp_min(1e-12)[..., None]
    ce = -(q * logits.flatten(2).log_softmax(-1)).sum(-1)
    valid = (mass > 0).float()
    return (ce * valid).sum() / valid.sum().clamp_min(1.0)


def _parabola_offset(left: Tensor, mid: Tensor, right: Tensor) -> Tensor:
    """Sub-pixel peak offset of a parabola through three log-heatmap samples (exact for a Gaussian)."""
    denom = left - 2 * mid + right
    offset = 0.5 * (left - right) / torch.where(denom < 0, denom, torch.full_like(denom, -1.0))
    return torch.where(denom < 0, offset, torch.zeros_like(offset)).clamp(-0.5, 0.5)


@torch.no_grad()
def decode_heatmaps(
    heatmaps: Tensor, *, stride: float = 1.0, eps: float = 1e-10, window: int = 0
) -> tuple[Tensor, Tensor]:
    """Keypoints from heatmaps ``(B, K, H, W)``: coords ``(B, K, 2)`` as ``(x, y)`` and confidence ``(B, K)``.

    The argmax is refined to sub-pixel precision by fitting a parabola to the log-heatmap along each
    axis (exact for Gaussian peaks). Confidence is the peak value, or with ``window`` > 0 the heatmap's
    sum over the ``(2 window + 1)^2`` pixels around the peak (for probability maps: the chance that the
    keypoint lies within ``window`` heatmap pixels). Coords are scaled by ``stride``.
    """
    h = heatmaps.detach().float()
    b, k, height, width = h.shape
    flat = h.reshape(b, k, -1)
    conf, idx = flat.max(dim=-1)
    row = torch.div(idx, width, rounding_mode="floor")
    col = idx % width
    logh = torch.log(h.clamp_min(eps))

    def sample(r: Tensor, c: Tensor) -> Tensor:
        r = r.clamp(0, height - 1)
        c = c.clamp(0, width - 1)
        return logh.reshape(b, k, -1).gather(-1, (r * width + c)[..., None]).squeeze(-1)

    if window > 0:
        size = 2 * window + 1
        mass = F.avg_pool2d(h.reshape(b * k, 1, height, width), size, stride=1, padding=window,
                            count_include_pad=True).reshape(b, k, -1) * size * size
        conf = mass.gather(-1, idx[..., None]).squeeze(-1)
    mid = sample(row, col)
    dx = _parabola_offset(sample(row, col - 1), mid, sample(row, col + 1))
    dy = _parabola_offset(sample(row - 1, col), mid, sample(row + 1, col))
    dx = torch.where((col > 0) & (col < width - 1), dx, torch.zeros_like(dx))
    dy = torch.where((row > 0) & (row < height - 1), dy, torch.zeros_like(dy))
    coords = torch.stack([col.float() + dx, row.float() + dy], dim=-1) * stride
    return coords, conf


def object_keypoint_similarity(
    pred: np.ndarray,
    gt: np.ndarray,
    areas: np.ndarray,
    sigmas: Sequence[float] | np.ndarray,
    visible: np.ndarray | None = None,
) -> np.ndarray:
    """COCO OKS per instance, ``mean_k exp(-d_k^2 / (2 * area * (2 sigma_k)^2))`` over visible keypoints."""
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)[..., :2]
    areas = np.asarray(areas, dtype=np.float64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must both be (N, K, 2), got {pred.shape} and {gt.shape}")
    if sigmas.shape != (gt.shape[1],) or areas.shape != (gt.shape[0],):
        raise ValueError(f"need sigmas (K,) and areas (N,), got {sigmas.shape} and {areas.shape}")
    vis = np.ones(gt.shape[:2], bool) if visible is None else np.asarray(visible) > 0
    d2 = ((pred - gt) ** 2).sum(-1)
    e = d2 / ((2 * sigmas) ** 2 * (areas[:, None] + np.finfo(float).eps) * 2)
    n_vis = vis.sum(1)
    return np.where(n_vis > 0, (np.exp(-e) * vis).sum(1) / np.maximum(n_vis, 1), 0.0)


def _average_precision(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """COCO 101-point interpolated AP; tied scores are counted as one operating point."""
    order = np.argsort(-scores, kind="mergesort")
    scores, tp = scores[order], tp[order]
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    last_of_group = np.r_[scores[1:] != scores[:-1], True]
    recall = ctp[last_of_group] / max(n_gt, 1)
    precision = ctp[last_of_group] / (ctp[last_of_group] + cfp[last_of_group])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    rec_thrs = np.linspace(0.0, 1.0, 101)
    pos = np.searchsorted(recall, rec_thrs, side="left")
    q = np.where(pos < len(recall), precision[np.minimum(pos, len(recall) - 1)], 0.0)
    return float(q.mean())


def oks_ap(
    pred: np.ndarray,
    gt: np.ndarray,
    areas: np.ndarray,
    sigmas: Sequence[float] | np.ndarray,
    *,
    scores: np.ndarray | None = None,
    visible: np.ndarray | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> float:
    """OKS-based AP averaged over thresholds .50:.05:.95 (COCO keypoints), one instance per image.

    ``pred``/``gt`` are ``(N, K, 2)``; ``scores`` (N,) rank the detections (default: all equal);
    a detection is a true positive at threshold t when its OKS with its image's ground truth >= t.
    """
    oks = object_keypoint_similarity(pred, gt, areas, sigmas, visible)
    scores = np.ones(len(oks)) if scores is None else np.asarray(scores, dtype=np.float64)
    thr = np.arange(0.5, 0.951, 0.05) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return float(np.mean([_average_precision(scores, oks >= t, len(oks)) for t in thr]))
