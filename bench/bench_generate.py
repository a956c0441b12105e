"""Seconds per patient for Diff-X generation: 4 time points x 10 seeds at the default DDIM step count.

The thesis reports "about a minute per patient" (GPU, full-size SD UNets at 512 x 512). Here a small
config (default: diffx_tiny, random weights: speed does not depend on training) is timed on CPU, or
with --gpu on CUDA with bf16 autocast (attention runs through PyTorch SDPA, diffusers' default
processor). Prints seconds per patient, the split into inversion / injected denoising / decode, and
the ratio to 60 s.

    python bench/bench_generate.py [--model diffx_tiny] [--steps 50] [--seeds 10] [--patients 2] [--gpu]
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

log = logging.getLogger("bench_generate")
THESIS_SECONDS_PER_PATIENT = 60.0


def main(argv: list[str] | None = None) -> int:
    """Build the model, warm up once, time `patients` patients; log the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffx_tiny", help="registry builder (diffx = SD v1 sizes)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (the sampler default)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--years", default="1,5,10,3", help="four time points: 1, 5, 10 years + a last follow-up")
    p.add_argument("--patients", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="CUDA + bf16 autocast")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)

    from raypipe.generate import DiffXPipeline, SamplerSettings, future_prompts
    from raypipe.models.registry import build_model

    device = torch.device("cuda" if a.gpu else "cpu")
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but CUDA is not available")
    torch.manual_seed(0)
    model = build_model(a.model).to(device).eval()
    pipe = DiffXPipeline(model, SamplerSettings(steps=a.steps), amp_dtype=torch.bfloat16 if a.gpu else None)
    years = [float(y) for y in a.years.split(",")]
    base, prompts = future_prompts(70, "F", years)
    image = torch.rand(1, 1, model.image_size, model.image_size) * 2 - 1
    seeds = list(range(a.seeds))

    def one() -> tuple[float, float]:
        if a.gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe.invert(image, base)
        if a.gpu:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        pipe(image, base, [prompts[y] for y in years], seeds)
        if a.gpu:
            torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1

    one()  # warm-up (allocations, kernels)
    total, inv = 0.0, 0.0
    for _ in range(a.patients):
        i, full = one()
        inv += i
        total += full
    per = total / a.patients
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log.info("model %s (%.1f M parameters), %s%s, %d threads", a.model, n_params, device.type,
             " bf16" if a.gpu else "", torch.get_num_threads())
    log.info("%d time points x %d seeds, %d DDIM steps (+%d inversion steps)", len(years), a.seeds, a.steps, a.steps)
    log.info("seconds per patient: %.2f (inversion alone %.2f; the full call repeats it)", per, inv / a.patients)
    log.info("thesis: about %.0f s per patient -> ratio %.3f (ours / thesis)", THESIS_SECONDS_PER_PATIENT,
             per / THESIS_SECONDS_PER_PATIENT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
