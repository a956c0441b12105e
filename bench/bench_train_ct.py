"""Training throughput of the CT CNN-RNN: samples/s of forward + backward + Adam step, as the train loop runs it.

    python bench/bench_train_ct.py [--models cnn_rnn,cnn_rnn_tiny] [--batch 2] [--steps 3] [--input 96x144]

One process, no Ray: the same pieces the Ray Train worker uses (`select_device`, `autocast`, BCE on one
logit, Adam). Input is 14 x 1 x H x W slices per sample (default the bone+muscle crop, 96 x 144).
Achieved FLOP/s counts 3 x the forward FLOPs (forward + backward) from the registry's FLOP counter.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from raypipe.models.registry import build_model, flops_per_sample
from raypipe.train.common import autocast, seed_everything, select_device
from raypipe.losses import masked_bce

log = logging.getLogger("bench_train_ct")


def bench_model(name: str, batch: int, steps: int, warmup: int, hw: tuple[int, int], n_slices: int) -> dict:
    """Time `steps` optimiser steps after `warmup` ones; return samples/s, ms/step and achieved GFLOP/s."""
    seed_everything(0)
    setup = select_device(amp=True)
    model = build_model(name).to(setup.device).train()
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    x = torch.randn(batch, n_slices, 1, *hw, device=setup.device)
    y = (torch.rand(batch, device=setup.device) < 0.5).float()

    def step() -> None:
        with autocast(setup):
            logits = model(x)
        loss = masked_bce(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    fwd = flops_per_sample(name, shapes={"x": (n_slices, 1, *hw)})
    return {
        "model": name, "device": str(setup.device), "precision": str(setup.amp_dtype or torch.float32),
        "threads": torch.get_num_threads(), "batch": batch, "input": [n_slices, 1, *hw], "steps": steps,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "ms_per_step": round(dt * 1e3, 1), "samples_per_s": round(batch / dt, 3),
        "fwd_gflop_per_sample": round(fwd / 1e9, 3), "train_gflop_per_s": round(3 * fwd * batch / dt / 1e9, 2),
    }


def main() -> None:
    """Benchmark each requested model and print one JSON line per model."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn_rnn,cnn_rnn_tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--input", default="96x144", help="H x W of each slice (96x96 bone-only, 96x144 bone+muscle)")
    ap.add_argument("--slices", type=int, default=14)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hw = tuple(int(v) for v in a.input.lower().split("x"))
    for name in a.models.split(","):
        res = bench_model(name.strip(), a.batch, a.steps, a.warmup, hw, a.slices)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
