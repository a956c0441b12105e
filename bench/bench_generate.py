"""Seconds per patient for Diff-X generation (4 time points x 10 seeds), and the 20- vs 50-step quality check.

The thesis reports "about a minute per patient" (GPU, full-size SD UNets at 512 x 512). Here a model of the
registry (default: diffx_tiny; random weights, since speed does not depend on training) is timed on CPU in
fp32, or with --gpu on CUDA in the pipeline's default precision (bf16 autocast; attention through PyTorch
SDPA). A patient = one inversion + the injected denoising of years x seeds; each timed patient starts from
scratch (the kept inversion is dropped). `--compare-steps 20,50` adds `steps_agreement`: MS-SSIM of the same
seeds' images at 20 vs 50 DDIM steps (with random weights this checks the solver's convergence on this
model, not image realism). One JSON figure per line.

    python bench/bench_generate.py [--model diffx_tiny] [--steps 50] [--seeds 10] [--patients 2] [--gpu]
                                   [--compare-steps 20,50]
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
from _report import figure, ratio

log = logging.getLogger("bench_generate")
THESIS_SECONDS_PER_PATIENT = 60.0


def main(argv: list[str] | None = None) -> int:
    """Build the model, warm up once, time `patients` patients; print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="diffx_tiny", help="registry builder (diffx = SD v1 sizes)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (the sampler default)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--years", default="1,5,10,3", help="four time points: 1, 5, 10 years + a last follow-up")
    p.add_argument("--patients", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="CUDA, default precision (bf16 autocast)")
    p.add_argument("--fp32", action="store_true", help="fp32 even on a GPU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare-steps", default=None, help="e.g. 20,50: MS-SSIM of the images at these step counts")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)

    from raypipe.generate import DiffXPipeline, SamplerSettings, autocast_dtype, future_prompts, steps_agreement
    from raypipe.models.registry import build_model

    device = torch.device("cuda" if a.gpu else "cpu")
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but CUDA is not available")
    torch.manual_seed(0)
    model = build_model(a.model).to(device).eval()
    amp = autocast_dtype(device, False if a.fp32 else None)
    pipe = DiffXPipeline(model, SamplerSettings(steps=a.steps), amp_dtype=amp)
    years = [float(y) for y in a.years.split(",")]
    base, prompts = future_prompts(70, "F", years)
    image = torch.rand(1, 1, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seeds = list(range(a.seeds))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one() -> tuple[float, float]:
        """(inversion seconds, whole-patient seconds) from scratch."""
        pipe.forget_inversion()
        sync()
        t0 = time.perf_counter()
        pipe.invert(image, base)
        sync()
        t1 = time.perf_counter()
        pipe(image, base, [prompts[y] for y in years], seeds)  # reuses the inversion just made
        sync()
        return t1 - t0, time.perf_counter() - t0

    one()  # warm-up (allocations, kernels)
    total, inv = 0.0, 0.0
    for _ in range(a.patients):
        i, full = one()
        inv += i
        total += full
    per = total / a.patients
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    precision = "bf16" if amp == torch.bfloat16 else "fp32"
    tag = f"generate/{a.model}/{device.type}_{precision}"
    log.info("model %s (%.1f M parameters), %s %s, %d threads; %d time points x %d seeds, %d DDIM steps "
             "(+%d inversion steps)", a.model, n_params, device.type, precision, torch.get_num_threads(), len(years),
             a.seeds, a.steps, a.steps)
    figure(f"{tag}/seconds_per_patient", per, "s", steps=a.steps, images=len(years) * a.seeds)
    figure(f"{tag}/inversion_seconds_per_patient", inv / a.patients, "s")
    ratio(f"{tag}/ours_over_thesis_60s", per, THESIS_SECONDS_PER_PATIENT)
    if a.compare_steps:
        counts = [int(x) for x in a.compare_steps.split(",")]
        q = steps_agreement(pipe, image, base, [prompts[y] for y in years], seeds, counts)
        for n in counts:
            figure(f"{tag}/seconds_per_patient_{n}_steps", q[f"seconds_{n}"], "s")
        for n in counts[:-1]:
            figure(f"{tag}/ms_ssim_{n}_vs_{counts[-1]}_steps", q[f"ms_ssim_{n}_vs_{counts[-1]}"], "ms-ssim",
                   weights="random init")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
