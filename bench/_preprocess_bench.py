"""Shared body of `bench_preprocess_ct.py` and `bench_preprocess_xray.py`: one process vs Ray Data, side by side.

Both runs go through the real `raypipe preprocess` entry points (`preprocess_ct` / `preprocess_xray`, which
the CLI calls) on the same synthetic cohort. Every process is pinned to one thread per CPU share, as Ray's
workers are: the single-process baseline uses one core, Ray Data one writer actor per core. Ray's own start-up
(`ray.init` and the worker processes it boots, paid once per job or cluster) is timed and reported apart; the
writer actors' start-up (process, imports, warm-up) is inside the Ray time.
"""
from __future__ import annotations

import os

from raypipe.ray_utils import THREAD_ENV_VARS

for _var in THREAD_ENV_VARS:  # before NumPy/SimpleITK load their thread pools
    os.environ[_var] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

from _report import figure, ratio  # noqa: E402

from raypipe.data.synth import synth_cohort  # noqa: E402
from raypipe.ray_utils import init_ray, limit_threads, physical_cores  # noqa: E402

log = logging.getLogger("bench_preprocess")


def arguments(doc: str, default_patients: int) -> argparse.ArgumentParser:
    """The options both preprocessing benchmarks take."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=default_patients)
    ap.add_argument("--shard-size", type=int, default=None, help="studies per shard (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the cohort and outputs (default: temp); an existing cohort there is reused")
    return ap


def cohort(kind: str, work: Path, patients: int, seed: int) -> Path:
    """The synthetic cohort's manifest under WORK/<kind>-<patients>-<seed>, built once and reused."""
    folder = work / f"{kind}-{patients}-{seed}"
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        log.info("reusing the cohort in %s", folder)
        return manifest
    return synth_cohort(kind, folder, patients, seed=seed, overwrite=True)


def settle_ray() -> None:
    """Wait until Ray's worker processes have booted: one trivial task per core (start-up, not preprocessing)."""
    import ray

    @ray.remote(num_cpus=1)
    def ready() -> int:
        return os.getpid()

    ray.get([ready.remote() for _ in range(physical_cores())])


def run(name: str, unit: str, preprocess: Callable[..., dict[str, Any]], config: Any, manifest: Path,
        work: Path) -> dict[str, float]:
    """Time the single-process run, then Ray Data, on the same manifest; print and return the figures."""
    limit_threads(1)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    local = preprocess(manifest, work / "out_local", config=config, use_ray=False)
    t_local = time.perf_counter() - t

    t = time.perf_counter()
    init_ray()
    settle_ray()
    t_init = time.perf_counter() - t
    t = time.perf_counter()
    distributed = preprocess(manifest, work / "out_ray", config=config, use_ray=True)
    t_ray = time.perf_counter() - t
    if local["ok"] != distributed["ok"]:
        raise RuntimeError(f"{name}: the runs disagree ({local['ok']} vs {distributed['ok']} studies ok)")

    n = local["ok"]
    figure(f"{name}/studies_ok", n, "studies")
    figure(f"{name}/cores", physical_cores(), "cores")
    figure(f"{name}/load_avg_1min_at_start", load, "load")
    figure(f"{name}/single_process_1_thread", n / t_local, unit)
    figure(f"{name}/ray_data", n / t_ray, unit)
    figure(f"{name}/ray_init", t_init, "s")
    r = ratio(f"{name}/ray_data_over_single_process", t_local, t_ray)
    return {"local_s": t_local, "ray_s": t_ray, "ratio": r["value"]}


def main(name: str, unit: str, kind: str, doc: str, default_patients: int,
         make: Callable[[argparse.Namespace], tuple[Callable[..., dict[str, Any]], Any]],
         add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse options, build or reuse the cohort, run both modes side by side."""
    ap = arguments(doc, default_patients)
    if add_options is not None:
        add_options(ap)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = a.work or Path(tempfile.mkdtemp(prefix=f"bench_{kind}_"))
    manifest = cohort(kind, work, a.patients, a.seed)
    preprocess, config = make(a)
    runs = Path(tempfile.mkdtemp(prefix="runs_", dir=work))
    run(name, unit, preprocess, config, manifest, runs)
