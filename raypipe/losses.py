"""Survival losses as plain typed tensor functions (DeepSurv / pycox conventions), with thin modules.

`cox_ph_loss` is the negative Cox partial log-likelihood of a batch divided by its number of
events. Unlike pycox's version it handles tied event times (Breslow or Efron) exactly, and it
works in log space throughout (log-cumsum-exp over risk sets), so large log-risks do not overflow.
`cox_ph_loss_distributed` gives every DDP worker the loss of the global batch. `masked_bce` and
`horizon_labels` serve the classification heads, where a label may be unknown (censored before the horizon).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Ties = Literal["efron", "breslow"]


def _flat(log_risk: Tensor, time: Tensor, event: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten (n,) or (n, 1) inputs; check lengths, finiteness and 0/1 events once."""
    r = log_risk.reshape(-1)
    t = torch.as_tensor(time, device=r.device).reshape(-1)
    e = torch.as_tensor(event, device=r.device).reshape(-1)
    if not (r.numel() == t.numel() == e.numel()):
        raise ValueError(f"log_risk, time and event must have equal lengths, got {r.numel()}, {t.numel()}, {e.numel()}")
    if not torch.is_floating_point(r):
        raise ValueError(f"log_risk must be a floating tensor, got {r.dtype}")
    if not bool(((e == 0) | (e == 1)).all()):
        raise ValueError("event must contain only 0/1")
    if not bool(torch.isfinite(t.to(torch.float64)).all()):
        raise ValueError("time contains NaN or infinite values")
    return r, t, e.to(r.dtype)


def cox_ph_loss(log_risk: Tensor, time: Tensor, event: Tensor, ties: Ties = "efron") -> Tensor:
    """Negative Cox partial log-likelihood / number of events; Breslow or Efron handling of tied times.

    Risk sets R(t) = {j: time_j >= t}. Breslow: each event at t contributes r_i - log sum_R exp(r).
    Efron: the d events tied at t subtract l/d (l = 0..d-1) of their own summed risk from the
    risk-set sum in turn. Zero events give a zero loss that still has a (zero) gradient.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', got {ties!r}")
    r, t, e = _flat(log_risk, time, event)
    n_events = e.sum()
    if r.numel() == 0 or n_events.item() == 0:
        return r.sum() * 0.0

    # Descending time: the risk set of a time is everything up to the end of its tie block.
    order = torch.argsort(t, descending=True, stable=True)
    r, t, e = r[order], t[order], e[order]
    _, block, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    block_end = torch.cumsum(counts, 0) - 1
    log_risk_set = torch.logcumsumexp(r, 0)[block_end][block]  # log sum_{R(t_i)} exp(r), per row

    if ties == "breslow":
        log_denominator = log_risk_set
    else:
        n_blocks = counts.numel()
        d = torch.zeros(n_blocks, dtype=r.dtype, device=r.device).index_add_(0, block, e)
        # log of the tied events' summed risk per block, shifted by the block maximum for stability
        masked = torch.where(e > 0, r, torch.full_like(r, float("-inf")))
        shift = torch.full((n_blocks,), float("-inf"), dtype=r.dtype, device=r.device)
        shift = shift.scatter_reduce(0, block, masked.detach(), reduce="amax", include_self=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        tied_terms = torch.exp(torch.where(e > 0, r - shift[block], torch.full_like(r, float("-inf"))))
        tied_sum = torch.zeros(n_blocks, dtype=r.dtype, device=r.device).index_add_(0, block, tied_terms)
        log_tied = torch.log(tied_sum.clamp_min(torch.finfo(r.dtype).tiny)) + shift
        # l = 0..d-1: position of each event among the events of its block
        before_block = (torch.cumsum(d, 0) - d)[block]
        rank = (torch.cumsum(e, 0) - before_block - 1).clamp_min(0)
        frac = rank / d[block].clamp_min(1.0)
        ratio = torch.exp(log_tied[block] - log_risk_set).clamp(max=1.0)
        log_denominator = log_risk_set + torch.log1p(-frac * ratio)

    log_lik = ((r - log_denominator) * e).sum()
    return -log_lik / n_events


class CoxPHLoss(nn.Module):
    """`cox_ph_loss` as a module, for training loops that expect a criterion object."""

    def __init__(self, ties: Ties = "efron") -> None:
        super().__init__()
        self.ties = ties

    def forward(self, log_risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
        return cox_ph_loss(log_risk, time, event, self.ties)


def cox_ph_loss_distributed(log_risk: Tensor, time: Tensor, event: Tensor, ties: Ties = "efron") -> Tensor:
    """Cox loss of the global batch across DDP workers; equals `cox_ph_loss` without torch.distributed.

    A Cox likelihood does not decompose over workers (risk sets span the whole batch), so every
    worker all-gathers log-risks, times and events (batches may differ in size) and computes the
    global loss. The log-risk gather is autograd-aware (`torch.distributed.nn.all_gather`, whose
    backward sums the gradients from all workers): each worker's local gradient is world_size
    times its share of the global gradient, so DDP's gradient averaging yields exactly the
    gradient of single-process training on the global batch. Every worker must call backward.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cox_ph_loss(log_risk, time, event, ties)
    from torch.distributed.nn.functional import all_gather as all_gather_autograd

    r, t, e = _flat(log_risk, time, event)
    world = dist.get_world_size()
    size = torch.tensor([r.numel()], device=r.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    pad = max(counts) - r.numel()

    def padded(x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(pad)]) if pad else x

    t_parts = [torch.empty(max(counts), dtype=t.dtype, device=r.device) for _ in range(world)]
    e_parts = [torch.empty(max(counts), dtype=e.dtype, device=r.device) for _ in range(world)]
    dist.all_gather(t_parts, padded(t.detach()))
    dist.all_gather(e_parts, padded(e.detach()))
    r_parts = all_gather_autograd(padded(r))
    r_all = torch.cat([p[:c] for p, c in zip(r_parts, counts, strict=True)])
    t_all = torch.cat([p[:c] for p, c in zip(t_parts, counts, strict=True)])
    e_all = torch.cat([p[:c] for p, c in zip(e_parts, counts, strict=True)])
    return cox_ph_loss(r_all, t_all, e_all, ties)


def horizon_labels(time: Tensor, event: Tensor, horizons_days: Sequence[float]) -> Tensor:
    """(B, H) labels: 1 event by h, 0 followed past h, NaN when censored before h (unknown)."""
    t, e = time[:, None], event[:, None]
    h = torch.as_tensor(list(horizons_days), dtype=time.dtype, device=time.device)[None]
    y = torch.full(t.shape[:1] + h.shape[1:], float("nan"), dtype=time.dtype, device=time.device)
    y = torch.where((e > 0.5) & (t <= h), torch.ones_like(y), y)
    return torch.where(t > h, torch.zeros_like(y), y)


def masked_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean BCE-with-logits over known (finite) targets; zero with a graph when none (DDP sees every parameter)."""
    known = torch.isfinite(target)
    per = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(target, nan=0.0), reduction="none")
    return (per * known).sum() / known.sum().clamp(min=1)
