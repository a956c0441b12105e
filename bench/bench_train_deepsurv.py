"""Training throughput of the X-ray DeepSurv: samples/s of forward + backward + Adam step with the Cox loss.

    python bench/bench_train_deepsurv.py [--backbones resnet50,resnet18] [--batch 8] [--steps 3] [--size 384]

One process, no Ray: the pieces the Ray Train worker uses (`select_device`, `autocast`, `cox_ph_loss` with
Efron ties over the batch, Adam). Input per sample: the paper's L1-L5 patches (5 x size x size) and the 5
variables of clinical model 3 (image + clinical variant). Achieved FLOP/s counts 3 x the forward FLOPs
from the registry's FLOP counter. Prints one JSON line per backbone.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from _report import figure, ratio

from raypipe.losses import cox_ph_loss
from raypipe.models.registry import build_model, flops_per_sample
from raypipe.train.common import autocast, seed_everything, select_device

log = logging.getLogger("bench_train_deepsurv")


def bench_backbone(backbone: str, batch: int, steps: int, warmup: int, size: int, channels: int = 5,
                   n_clinical: int = 5) -> dict:
    """Time `steps` optimiser steps after `warmup` ones; return samples/s, ms/step and achieved GFLOP/s."""
    seed_everything(0)
    setup = select_device(amp=True)
    kw = {"backbone": backbone, "in_chans": channels, "n_clinical": n_clinical}
    model = build_model("deepsurv", **kw).to(setup.device).train()
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, channels, size, size, device=setup.device)
    clinical = torch.randn(batch, n_clinical, device=setup.device)
    time_days = torch.randint(30, 3650, (batch,), device=setup.device).float()
    event = (torch.rand(batch, device=setup.device) < 0.5).float()
    event[0] = 1.0

    def step() -> None:
        with autocast(setup):
            log_risk = model(x, clinical)
        loss = cox_ph_loss(log_risk.float(), time_days, event, ties="efron")
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
    fwd = flops_per_sample("deepsurv", shapes={"x": (channels, size, size)}, **kw)
    return {
        "model": f"deepsurv[{backbone}] image+clinical", "device": str(setup.device),
        "precision": str(setup.amp_dtype or torch.float32), "threads": torch.get_num_threads(), "batch": batch,
        "input": [channels, size, size], "steps": steps,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "ms_per_step": round(dt * 1e3, 1), "samples_per_s": round(batch / dt, 3),
        "fwd_gflop_per_sample": round(fwd / 1e9, 3), "train_gflop_per_s": round(3 * fwd * batch / dt / 1e9, 2),
    }


def main() -> None:
    """Benchmark each requested backbone and print its figures (one JSON line each), then the ratios to the first."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=384, help="side of each L1-L5 patch (paper: 384)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rates = {}
    for name in a.backbones.split(","):
        r = bench_backbone(name.strip(), a.batch, a.steps, a.warmup, a.size)
        tag = f"train_deepsurv/{name.strip()}/{r['device']}/batch{a.batch}"
        rates[name.strip()] = r["samples_per_s"]
        figure(f"{tag}/samples_per_s", r["samples_per_s"], "samples/s", precision=r["precision"],
               threads=r["threads"], params_m=r["params_m"])
        figure(f"{tag}/ms_per_step", r["ms_per_step"], "ms")
        figure(f"{tag}/train_gflop_per_s", r["train_gflop_per_s"], "GFLOP/s", fwd_gflop_per_sample=r["fwd_gflop_per_sample"])
    names = list(rates)
    for other in names[1:]:
        ratio(f"train_deepsurv/{names[0]}_over_{other}_samples_per_s", rates[names[0]], rates[other])


if __name__ == "__main__":
    main()
