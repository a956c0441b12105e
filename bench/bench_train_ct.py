"""Training throughput of the CT CNN-RNN: samples/s of forward + backward + Adam step, per precision mode.

    python bench/bench_train_ct.py [--models cnn_rnn] [--batch 128] [--steps 5] [--modes fp32,bf16,bf16_cl,bf16_cl_compile]

One process, no Ray: the pieces the Ray Train worker uses (`autocast`, BCE on one logit, Adam) on random
14 x 1 x H x W inputs (default the bone+muscle crop, 96 x 144). Modes, side by side in one run: ``fp32``;
``bf16`` autocast; ``bf16_cl`` + channels_last; ``bf16_cl_compile`` + `torch.compile` (CUDA only; the
compile time is inside the warm-up, not the timing). Achieved FLOP/s counts 3 x the forward FLOPs (forward +
backward) from the registry's FLOP counter; on a GPU it is also given as % of the card's dense bf16 peak
(`_gpu.bf16_peak_tflops`). One JSON figure per line.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from _gpu import bf16_peak_tflops
from _report import figure

from raypipe.losses import masked_bce
from raypipe.models.registry import build_model, flops_per_sample
from raypipe.train.common import DeviceSetup, autocast, seed_everything

log = logging.getLogger("bench_train_ct")
MODES = {"fp32": (None, False, False), "bf16": (torch.bfloat16, False, False),
         "bf16_cl": (torch.bfloat16, True, False), "bf16_cl_compile": (torch.bfloat16, True, True)}


def bench_model(name: str, mode: str, batch: int, steps: int, warmup: int, hw: tuple[int, int], n_slices: int,
                device: torch.device) -> dict[str, float]:
    """Time `steps` optimiser steps after `warmup` ones in `mode`; return samples/s and achieved TFLOP/s."""
    amp, channels_last, compiled = MODES[mode]
    seed_everything(0)
    setup = DeviceSetup(device=device, amp_dtype=amp, channels_last=channels_last)
    model = build_model(name).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    x = torch.randn(batch, n_slices, 1, *hw, device=device)
    y = (torch.rand(batch, device=device) < 0.5).float()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with autocast(setup):
            logits = net(x)
        loss = masked_bce(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    fwd = flops_per_sample(name, shapes={"x": (n_slices, 1, *hw)})
    return {"samples_per_s": batch / dt, "ms_per_step": dt * 1e3, "train_tflop_per_s": 3 * fwd * batch / dt / 1e12,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "fwd_gflop_per_sample": fwd / 1e9}


def main() -> None:
    """Benchmark each requested model in each mode and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn_rnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--input", default="96x144", help="H x W of each slice (96x96 bone-only, 96x144 bone+muscle)")
    ap.add_argument("--slices", type=int, default=14)
    ap.add_argument("--modes", default=None, help=f"comma-separated of {list(MODES)} (default: all on CUDA, fp32 on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modes = a.modes.split(",") if a.modes else (list(MODES) if device.type == "cuda" else ["fp32"])
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = bf16_peak_tflops(card)
    hw = (int(a.input.lower().split("x")[0]), int(a.input.lower().split("x")[1]))
    log.info("device %s (dense bf16 peak %s TFLOP/s), batch %d, input %d x 1 x %d x %d, %d threads", card, peak,
             a.batch, a.slices, *hw, torch.get_num_threads())
    for name in a.models.split(","):
        for mode in modes:
            r = bench_model(name.strip(), mode, a.batch, a.steps, a.warmup, hw, a.slices, device)
            tag = f"train_ct/{name.strip()}/{device.type}/{mode}/batch{a.batch}"
            figure(f"{tag}/samples_per_s", r["samples_per_s"], "samples/s", card=card)
            figure(f"{tag}/ms_per_step", r["ms_per_step"], "ms")
            figure(f"{tag}/train_tflop_per_s", r["train_tflop_per_s"], "TFLOP/s",
                   fwd_gflop_per_sample=round(r["fwd_gflop_per_sample"], 3), params_m=round(r["params_m"], 2))
            if peak is not None:
                figure(f"{tag}/pct_of_bf16_peak", 100 * r["train_tflop_per_s"] / peak, "%", peak_tflops=peak)


if __name__ == "__main__":
    main()
