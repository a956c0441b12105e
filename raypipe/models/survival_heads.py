"""Survival heads on the DeepSurv encoder, and survival curves from each head's output (no Ray).

DeepSurv (papers/001) gives one log-risk; to compare it with pycox's models on the same image encoder:
- `DiscreteTimeSurv`: the DeepSurv trunk with `num_durations` outputs, trained as pycox's LogisticHazard
  (hazard logits per interval, `nll_logistic_hazard`) or DeepHit (pmf logits, `nll_pmf` + rank loss);
- `CoxTimeNet`: pycox's Cox-Time, a relative risk g(x, t) that may change with time: the (standardised
  log) time enters the DeepSurv MLP as one more clinical input, trained with the case-control loss.
`survival_curves` turns outputs into S(t) at given days, from the Breslow baseline (Cox), the interval
grid (discrete heads) or the Cox-Time baseline hazards, so one scorer serves every head.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raypipe.models.deepsurv import DeepSurv, deepsurv, deepsurv_tiny

HEADS = ("cox", "logistic_hazard", "deephit", "coxtime")
_BASES = {"deepsurv": deepsurv, "deepsurv_tiny": deepsurv_tiny}


def _base(base: str, **kwargs: Any) -> DeepSurv:
    """A registry DeepSurv preset (full or tiny) with the caller's kwargs."""
    if base not in _BASES:
        raise ValueError(f"base must be one of {sorted(_BASES)}, got {base!r}")
    return _BASES[base](**kwargs)


class DiscreteTimeSurv(nn.Module):
    """DeepSurv trunk with `num_durations` logits per sample (LogisticHazard hazards or DeepHit pmf)."""

    def __init__(self, *, num_durations: int, base: str = "deepsurv", **kwargs: Any) -> None:
        super().__init__()
        self.net = _base(base, **kwargs)
        self.net.out = nn.Linear(self.net.out.in_features, num_durations)
        self.num_durations = num_durations

    def forward(self, x: Tensor | None = None, clinical: Tensor | None = None) -> Tensor:
        """Logits (B, num_durations)."""
        return self.net(x, clinical)


class CoxTimeNet(nn.Module):
    """Cox-Time relative risk g(x, t): the time (standardised log-days) is one more MLP input."""

    def __init__(self, *, base: str = "deepsurv", n_clinical: int = 0, **kwargs: Any) -> None:
        super().__init__()
        self.n_clinical = n_clinical
        self.net = _base(base, n_clinical=n_clinical + 1, **kwargs)

    def features(self, x: Tensor | None) -> Tensor | None:
        """Image features, computed once so g can be evaluated at many times cheaply."""
        return None if self.net.encoder is None else self.net.image_features(x)

    def g_from_features(self, feats: Tensor | None, clinical: Tensor | None, t: Tensor) -> Tensor:
        """g(x, t) (B,) from cached image features."""
        parts = [p for p in (feats, clinical) if p is not None and p.shape[-1] > 0]
        parts.append(t.reshape(-1, 1).float())
        return self.net.out(self.net.mlp(torch.cat(parts, dim=1))).squeeze(1)

    def forward(self, x: Tensor | None = None, clinical: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        """g(x, t) (B,); `t` is the standardised log time (zeros when omitted)."""
        n = (x if x is not None else clinical).shape[0]
        if t is None:
            t = torch.zeros(n, device=(x if x is not None else clinical).device)
        return self.g_from_features(self.features(x), clinical, t)


def deepsurv_discrete(**kwargs: Any) -> DiscreteTimeSurv:
    """LogisticHazard / DeepHit network on the DeepSurv encoder (`base` picks the full or tiny preset)."""
    return DiscreteTimeSurv(**kwargs)


def deepsurv_coxtime(**kwargs: Any) -> CoxTimeNet:
    """Cox-Time network on the DeepSurv encoder."""
    return CoxTimeNet(**kwargs)


def build_head_model(head: str, base: str, kwargs: Mapping[str, Any], num_durations: int = 20) -> nn.Module:
    """The network of one head: the registry DeepSurv for `cox`, the wrappers above otherwise."""
    if head == "cox":
        return _base(base, **kwargs)
    if head in ("logistic_hazard", "deephit"):
        return DiscreteTimeSurv(base=base, num_durations=num_durations, **kwargs)
    if head == "coxtime":
        return CoxTimeNet(base=base, **kwargs)
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")


# ---------------------------------------------------------------------------------------------- curves
def discrete_survival(head: str, logits: np.ndarray) -> np.ndarray:
    """S at the end of each interval (n, K) from LogisticHazard hazard logits or DeepHit pmf logits."""
    z = np.asarray(logits, dtype=np.float64)
    if head == "logistic_hazard":
        return np.cumprod(1.0 - 1.0 / (1.0 + np.exp(-z)), axis=1)
    # DeepHit: softmax over K intervals plus one "after the grid" class whose logit is 0 (pycox's pad_col)
    full = np.concatenate([z, np.zeros((z.shape[0], 1))], axis=1)
    full = np.exp(full - full.max(axis=1, keepdims=True))
    pmf = full / full.sum(axis=1, keepdims=True)
    return 1.0 - np.cumsum(pmf[:, :-1], axis=1)


def marginal_logits(head: str, idx: np.ndarray, event: np.ndarray, num_durations: int, eps: float = 1e-4) -> np.ndarray:
    """Output biases that reproduce the population's discrete-time curve (Kaplan-Meier on the grid).

    A discrete head started at these biases predicts the training rows' marginal survival, so its first
    steps learn covariate effects instead of the baseline: LogisticHazard gets logit(d_j / n_j) per interval
    (n_j rows with index >= j, d_j events at j, pycox's likelihood); DeepHit gets log pmf_j - log S_K, the
    pmf relative to pycox's padded "after the grid" class whose logit is 0.
    """
    idx = np.asarray(idx, dtype=np.int64)
    ev = np.asarray(event, dtype=np.float64) > 0
    at_risk = np.array([(idx >= j).sum() for j in range(num_durations)], dtype=np.float64)
    deaths = np.array([(ev & (idx == j)).sum() for j in range(num_durations)], dtype=np.float64)
    hazard = np.clip(deaths / np.maximum(at_risk, 1.0), eps, 1.0 - eps)
    if head == "logistic_hazard":
        return np.log(hazard / (1.0 - hazard))
    if head != "deephit":
        raise ValueError(f"marginal_logits is for the discrete heads, got {head!r}")
    surv = np.cumprod(1.0 - hazard)
    pmf = np.clip(np.concatenate([[1.0], surv[:-1]]) - surv, eps, None)
    return np.log(pmf) - np.log(max(surv[-1], eps))


def step_at(grid: Sequence[float], values: np.ndarray, days: Sequence[float], start: float = 1.0) -> np.ndarray:
    """Right-continuous step function through (grid, values), `start` before the first grid point."""
    g = np.asarray(grid, dtype=np.float64)
    idx = np.searchsorted(g, np.asarray(days, dtype=np.float64), side="right") - 1
    v = np.asarray(values, dtype=np.float64)
    padded = np.concatenate([np.full((v.shape[0], 1), start), v], axis=1)
    return padded[:, idx + 1]


def coxtime_baseline(g_at_times: np.ndarray, time: np.ndarray, event: np.ndarray, event_times: np.ndarray) -> np.ndarray:
    """Cox-Time baseline hazard increments h0(t_j) = d_j / sum_{i at risk} exp(g(x_i, t_j)) (pycox's estimator)."""
    at_risk = time[:, None] >= event_times[None, :]
    d = np.array([np.sum((time == t) & (event > 0)) for t in event_times], dtype=np.float64)
    denom = (np.exp(g_at_times) * at_risk).sum(axis=0)
    return d / np.maximum(denom, 1e-300)


def coxtime_survival(g_at_times: np.ndarray, event_times: np.ndarray, h0: np.ndarray, days: Sequence[float]) -> np.ndarray:
    """S(t | x) = exp(-sum_{t_j <= t} h0(t_j) exp(g(x, t_j))) at each of `days`."""
    inc = np.exp(g_at_times) * h0[None, :]
    cum = np.cumsum(inc, axis=1)
    idx = np.searchsorted(event_times, np.asarray(days, dtype=np.float64), side="right") - 1
    padded = np.concatenate([np.zeros((cum.shape[0], 1)), cum], axis=1)
    return np.exp(-padded[:, idx + 1])
