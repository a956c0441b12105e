"""Which memory format trains each image model faster on CPU: contiguous vs channels_last, side by side.

    python bench/bench_memory_format.py [--tasks ct,deepsurv,pvf] [--steps 20] [--warmup 3] [--threads 2]

Backs `WorkerTask.cpu_channels_last` (`raypipe.train.loop`): the worker loop puts a model in channels_last on
CPU only when its task asks for it. For each task the model, input size and batch size come from the tiny
config as committed (`jobs/configs/ct_tiny.yaml`, `xray_deepsurv_tiny.yaml`, `pvf_tiny.yaml`); one step is
forward + the mean of the squared outputs + backward + Adam, fp32, in one process with `--threads` intra-op
threads (the configs' `torch_threads`). The two formats alternate step by step (A-B-A-B...), so drift in the
machine's speed falls on both; the figure is the median step. One JSON figure per line, then whether each task's
flag picks the faster format.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _report import figure, ratio
from torch import nn

from raypipe.config import load_config
from raypipe.train.common import seed_everything

log = logging.getLogger("bench_memory_format")
CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
N_CLINICAL = 4  # a handful of clinical inputs where the model takes them; negligible compute next to the image


@dataclass(frozen=True)
class Case:
    """One task's model and its batch of random inputs, as its tiny config trains it."""

    model: nn.Module
    inputs: tuple[torch.Tensor | None, ...]
    batch: int
    channels_last_flag: bool
    shape: str


def ct_case() -> Case:
    """The CT CNN-RNN (bone + muscle, 14 slices of 96 x 144) at `ct_tiny.yaml`'s batch size."""
    from raypipe.train.config import CTTrainConfig
    from raypipe.train.ct import CTWorkerTask, build

    cfg = load_config(CTTrainConfig, CONFIGS / "ct_tiny.yaml")
    x = torch.randn(cfg.batch_size, cfg.n_slices, 1, 96, 144)
    return Case(build(cfg, 0), (x, None), cfg.batch_size, CTWorkerTask.cpu_channels_last,
                f"{cfg.n_slices}x1x96x144")


def deepsurv_case() -> Case:
    """DeepSurv (five L1-L5 patches + clinical variables) at `xray_deepsurv_tiny.yaml`'s size and batch."""
    from raypipe.train.deepsurv import DeepSurvWorkerTask, build
    from raypipe.train.xray_config import DeepSurvConfig

    cfg = load_config(DeepSurvConfig, CONFIGS / "xray_deepsurv_tiny.yaml")
    x = torch.randn(cfg.batch_size, 5, cfg.image_size, cfg.image_size)
    clinical = torch.randn(cfg.batch_size, N_CLINICAL)
    return Case(build(cfg, N_CLINICAL, 5), (x, clinical), cfg.batch_size, DeepSurvWorkerTask.cpu_channels_last,
                f"5x{cfg.image_size}x{cfg.image_size}")


def pvf_case() -> Case:
    """The pVF classifier (EfficientNet-style) on `pvf_tiny.yaml`'s input size and batch."""
    from raypipe.train.pvf import PVFTrainConfig, PVFWorkerTask, build

    cfg = load_config(PVFTrainConfig, CONFIGS / "pvf_tiny.yaml")
    h, w = cfg.input_size
    x = torch.randn(cfg.batch_size, 1, h, w)
    return Case(build(cfg), (x,), cfg.batch_size, PVFWorkerTask.cpu_channels_last, f"1x{h}x{w}")


CASES: dict[str, Callable[[], Case]] = {"ct": ct_case, "deepsurv": deepsurv_case, "pvf": pvf_case}


def to_format(t: torch.Tensor | None, channels_last: bool) -> torch.Tensor | None:
    """The input in the model's format (4-D batches converted, as the pVF worker does; 5-D CT stacks unchanged)."""
    if t is None or not channels_last or t.dim() != 4:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def make_step(name: str, channels_last: bool) -> tuple[Case, Callable[[], None]]:
    """A freshly built, seeded copy of the task's model and one optimiser step of it in the given memory format."""
    seed_everything(0)
    case = CASES[name]()
    model = (case.model.to(memory_format=torch.channels_last) if channels_last else case.model).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs = tuple(to_format(t, channels_last) for t in case.inputs)

    def step() -> None:
        out = model(*inputs)
        if isinstance(out, dict):
            out = torch.cat([v.reshape(len(v), -1) for v in out.values()], dim=1)
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return case, step


def bench_task(name: str, steps: int, warmup: int) -> dict[str, float | int | bool | str]:
    """Median step time (ms) in each format, the formats alternating step by step."""
    case, contiguous = make_step(name, False)
    _, channels_last = make_step(name, True)
    runs = {"contiguous": contiguous, "channels_last": channels_last}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(warmup + steps):
        for fmt, step in runs.items():
            t = time.perf_counter()
            step()
            if i >= warmup:
                times[fmt].append(time.perf_counter() - t)
    return {"contiguous_ms": 1e3 * statistics.median(times["contiguous"]),
            "channels_last_ms": 1e3 * statistics.median(times["channels_last"]),
            "batch": case.batch, "flag": case.channels_last_flag, "shape": case.shape}


def main() -> None:
    """Time each requested task in both formats and say whether its flag picks the faster one."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(a.threads)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in CASES]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; choose from {list(CASES)}")
    log.info("CPU, fp32, %d threads, %d timed steps per format after %d warm-up", a.threads, a.steps, a.warmup)
    verdicts = []
    for name in tasks:
        r = bench_task(name, a.steps, a.warmup)
        tag = f"memory_format/{name}/cpu/batch{r['batch']}"
        figure(f"{tag}/contiguous_ms_per_step", r["contiguous_ms"], "ms", input=r["shape"])
        figure(f"{tag}/channels_last_ms_per_step", r["channels_last_ms"], "ms", input=r["shape"])
        ratio(f"{tag}/channels_last_speedup", r["contiguous_ms"], r["channels_last_ms"])
        faster = r["channels_last_ms"] < r["contiguous_ms"]
        agrees = faster == r["flag"]
        verdicts.append(f"{name}: channels_last {'faster' if faster else 'slower'} "
                        f"({r['contiguous_ms']:.0f} -> {r['channels_last_ms']:.0f} ms); cpu_channels_last={r['flag']}"
                        f" {'agrees' if agrees else 'DISAGREES'}")
    for v in verdicts:
        log.info(v)


if __name__ == "__main__":
    main()
