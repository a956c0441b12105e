"""Shared body of `bench_preprocess_ct.py` and `bench_preprocess_xray.py`: one process vs Ray Data, side by side.

All runs go through the real `raypipe preprocess` entry points (`preprocess_ct` / `preprocess_xray`, which
the CLI calls) on the same synthetic cohort. Every process is pinned to one thread per CPU share, as Ray's
workers are: the single-process baseline uses one core, Ray Data one writer actor per core. The single process
runs before and after Ray Data (A-B-A, see `run`). Ray's own start-up (`ray.init`, the worker processes it boots
and Ray Data's detached helper actors, paid once per cluster) is timed and reported apart; the writer actors'
start-up (process, imports, warm-up) is inside the Ray time.
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
    """Wait until Ray has booted what it boots once per cluster (start-up, not preprocessing).

    That is a worker process per core (one trivial task each) and the detached actors that Ray Data starts on its
    first actor-pool map (`_StatsActor`, `_AutoscalingCoordinatorActor`, `ActorLocationTracker`: ~1 s of CPU
    each to boot, ~10 % of both cores in a 30 s run). The writer actors are per run and stay inside the timing.
    """
    import ray

    @ray.remote(num_cpus=1)
    def ready() -> int:
        return os.getpid()

    class Noop:  # defined here so Ray pickles it by value (workers need not import this module)
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            return batch

    ray.get([ready.remote() for _ in range(physical_cores())])
    ray.data.range(1).map_batches(Noop, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1).materialize()


def run(name: str, unit: str, preprocess: Callable[..., dict[str, Any]], config: Any, manifest: Path,
        work: Path) -> dict[str, float]:
    """Time one process, then Ray Data, then one process again, on the same manifest; print and return the figures.

    The ratio divides the mean of the two single-process runs by the Ray Data run between them (A-B-A), so a
    machine whose speed drifts during the benchmark (this one's single process varied by up to 25 % between
    runs minutes apart) biases it less; the two single-process rates are printed, and a drift of more than 10 %
    between them is logged as a warning.
    """
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

    t = time.perf_counter()
    again = preprocess(manifest, work / "out_local_again", config=config, use_ray=False)
    t_again = time.perf_counter() - t
    if not local["ok"] == distributed["ok"] == again["ok"]:
        raise RuntimeError(f"{name}: the runs disagree ({local['ok']}, {distributed['ok']}, {again['ok']} studies ok)")

    n = local["ok"]
    drift = abs(t_again - t_local) / min(t_local, t_again)
    if drift > 0.10:
        log.warning("the single process ran %.0f %% %s the second time: the machine's speed drifted, so the ratio "
                    "is less certain", 100 * drift, "slower" if t_again > t_local else "faster")
    figure(f"{name}/studies_ok", n, "studies")
    figure(f"{name}/cores", physical_cores(), "cores")
    figure(f"{name}/load_avg_1min_at_start", load, "load")
    figure(f"{name}/single_process_1_thread", n / t_local, unit)
    figure(f"{name}/ray_data", n / t_ray, unit)
    figure(f"{name}/single_process_1_thread_again", n / t_again, unit)
    figure(f"{name}/single_process_drift", 100 * drift, "%")
    figure(f"{name}/ray_init", t_init, "s")
    r = ratio(f"{name}/ray_data_over_single_process", (t_local + t_again) / 2, t_ray)
    return {"local_s": t_local, "ray_s": t_ray, "local_again_s": t_again, "ratio": r["value"]}


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
