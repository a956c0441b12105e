"""One place that connects to Ray: `RAY_ADDRESS` when set, else a local instance sized to this machine.

On small machines Ray's defaults starve Ray Data when training workers take every CPU (the run sits at
0 rows with no error), so raypipe starts local Ray with more logical CPUs than cores and gives training
workers a fraction of a CPU. `worker_resources()` is the single source of those numbers.

GPUs are requested, never discovered: a config's `use_gpu` (or `--gpus N` / `--cpu`) decides, and the
request goes to Ray as it is, so on an autoscaling cluster whose GPU nodes are not up yet the autoscaler
sees the demand. Only a local Ray started by this process (which no autoscaler can grow) fails fast when
it has fewer GPUs than asked for (`require_gpus`).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Logical CPUs advertised per physical core on a local instance: lets Ray Data and train workers coexist.
LOGICAL_CPUS_PER_CORE = 2
MIN_LOCAL_CPUS = 4
# Keep idle worker processes around instead of killing them after 1 s: every epoch starts new Ray Data
# tasks, and a fresh Python worker costs seconds of CPU on a small machine (a tiny CT fit: 114 s -> 60 s).
LOCAL_SYSTEM_CONFIG = {"num_workers_soft_limit": 32, "idle_worker_killing_time_threshold_ms": 60_000}
# Thread-count variables of the native libraries raypipe's workers use (OpenMP, MKL, OpenBLAS, ITK).
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


@dataclass
class LocalRay:
    """The local Ray this process started: its GCS address and logical CPUs per core (see `cpu_worker_slots`)."""

    address: str | None = None
    overcommit: int = 1


_LOCAL = LocalRay()


@dataclass(frozen=True)
class WorkerResources:
    """Resources for one training worker and how many of them fit next to Ray Data."""

    cpus_per_worker: float
    use_gpu: bool
    data_cpus_reserved: float
    gpus_per_worker: float = 0.0

    def as_ray(self) -> dict[str, float]:
        """The worker's Ray resource request: CPU, plus GPU when use_gpu."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}


def physical_cores() -> int:
    """Cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_num_cpus() -> int:
    """Logical CPUs to give a local Ray: at least 4, twice the cores (see module docstring)."""
    return max(MIN_LOCAL_CPUS, physical_cores() * LOGICAL_CPUS_PER_CORE)


def cpu_worker_slots(cpus_per_worker: float) -> int:
    """How many CPU-bound workers of `cpus_per_worker` CPUs the cluster runs without oversubscribing cores.

    A local Ray started by `init_ray` advertises more logical CPUs than cores (module docstring); that
    overcommit is divided out here, so a 2-core machine gets 2 one-CPU preprocessing workers, not 4.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", physical_cores()))
    factor = _LOCAL.overcommit if _LOCAL.address == ray.get_runtime_context().gcs_address else 1
    return max(1, int(total / factor / float(cpus_per_worker)))


def limit_threads(n: int) -> None:
    """Pin this process's native thread pools (OpenMP/BLAS, ITK, torch) to `n` threads, as Ray gives a worker.

    Sets the environment variables for libraries not loaded yet and resizes the pools already loaded.
    """
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n)
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def init_ray(num_cpus: int | None = None, quiet: bool = False, **kwargs) -> None:
    """Connect to RAY_ADDRESS if set (a cluster), else start a local Ray sized to the machine; idempotent.

    Worker logs (per-epoch lines, Tune's trial table) reach this driver's output unless `quiet`, so
    `ray job logs --follow` shows them.
    """
    import ray

    if ray.is_initialized():
        configure_data()  # e.g. inside a Tune trial, whose datasets are built in that worker process
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    address = os.environ.get("RAY_ADDRESS")
    common = dict(ignore_reinit_error=True, log_to_driver=not quiet, include_dashboard=False, **kwargs)
    if address:
        log.info("connecting to Ray at %s", address)
        common.pop("include_dashboard")
        ray.init(address=address, **common)
        configure_data()
        return
    n = num_cpus or local_num_cpus()
    log.info("starting local Ray with %d logical CPUs", n)
    # address="local": never attach to some other `ray start` cluster on this host by accident.
    ray.init(address="local", num_cpus=n, _system_config=LOCAL_SYSTEM_CONFIG, **common)
    _LOCAL.address, _LOCAL.overcommit = ray.get_runtime_context().gcs_address, max(1, n // physical_cores())
    configure_data()


def started_local_ray() -> bool:
    """True when this process started its own local Ray (`init_ray` without RAY_ADDRESS): no autoscaler."""
    import ray

    return ray.is_initialized() and _LOCAL.address == ray.get_runtime_context().gcs_address


def configure_data() -> None:
    """Ray Data settings for this driver: progress bars without per-operator logging, the classic Parquet reader.

    The datasource-v2 Parquet reader starts a pool of FooterReader actors (new worker processes) for every
    execution, i.e. every epoch of every split; the classic reader lists footers in ordinary tasks.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    for name, value in (("enable_progress_bars", True), ("print_on_execution_start", False),
                        ("use_datasource_v2", False)):
        if not hasattr(ctx, name):
            log.warning("Ray Data has no setting %r in this Ray version: raypipe's default (%r) is not applied "
                        "(see raypipe.ray_utils.configure_data)", name, value)
            continue
        setattr(ctx, name, value)


def worker_resources(num_workers: int, use_gpu: bool = False, gpus_per_worker: float = 1.0) -> WorkerResources:
    """CPUs per training worker leaving at least one logical CPU (a quarter of the total) for Ray Data; GPUs as asked."""
    import ray

    if use_gpu is None:
        raise TypeError("use_gpu must be true or false: GPUs are requested, not discovered from the cluster")
    if use_gpu and gpus_per_worker <= 0:
        raise ValueError(f"gpus_per_worker must be positive when use_gpu is true, got {gpus_per_worker}")
    total = float(ray.cluster_resources().get("CPU", local_num_cpus()))
    reserve = max(1.0, total / 4)
    per = max(0.25, min(2.0, (total - reserve - 1.0) / max(1, num_workers)))
    # Round down to a quarter CPU so placement is predictable.
    per = max(0.25, int(per * 4) / 4)
    return WorkerResources(cpus_per_worker=per, use_gpu=bool(use_gpu), data_cpus_reserved=reserve,
                           gpus_per_worker=float(gpus_per_worker) if use_gpu else 0.0)


def describe_devices(num_workers: int, use_gpu: bool, gpus_per_worker: float = 1.0, what: str = "training",
                     unit: str = "worker") -> str:
    """The start-of-run device line, e.g. "training on 2 workers x 1 GPU" or "training on 2 workers, CPU only"."""
    units = f"{num_workers} {unit}{'s' if num_workers != 1 else ''}"
    if not use_gpu:
        return f"{what} on {units}, CPU only (use_gpu: false; --gpus N requests GPUs)"
    g = f"{gpus_per_worker:g}"
    return f"{what} on {units} x {g} GPU{'' if g == '1' else 's'}"


def require_gpus(needed: float, what: str = "this run") -> None:
    """Fail fast when a GPU request can never be met (a local Ray without them); on a cluster, log the wait.

    A local Ray started by `init_ray` has fixed resources and no autoscaler: a request it cannot hold would
    wait forever. A cluster (RAY_ADDRESS) may add GPU nodes on demand, so there the request stands.
    """
    import ray

    if needed <= 0:
        return
    have = float(ray.cluster_resources().get("GPU", 0))
    if have >= needed:
        return
    if started_local_ray():
        raise ValueError(f"{what} asks for {needed:g} GPU(s) but the local Ray started by this command has "
                           f"{have:g} and no autoscaler can add any: pass --cpu to run on CPU, or set RAY_ADDRESS "
                           "to a cluster whose (autoscaling) nodes have GPUs")
    log.warning("%s asks for %g GPU(s); the cluster has %g now: waiting for them (an autoscaling cluster adds GPU "
                "nodes for this demand)", what, needed, have)


def shutdown_ray() -> None:
    """Shut down Ray if this process started or connected to it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _LOCAL.address, _LOCAL.overcommit = None, 1
