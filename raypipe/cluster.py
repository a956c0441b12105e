"""Running on a Ray cluster: where job outputs go, which node ran what, and how many trials fit at once.

`ray job submit --working-dir .` runs a job in a temporary copy of the working directory on the head
node, so a relative output path would vanish with it. Every `jobs/*.py` entrypoint therefore resolves its
paths with `resolve_output` / `resolve_input`: URIs and absolute paths are kept; a relative path lands
under `RAYPIPE_STORAGE` (the one shared storage root of a cluster, e.g. `s3://bucket/raypipe`) when it is
set, else under the directory the command was started from (as `raypipe` does on a laptop).

`trial_resources` sizes the Ray Train workers of Tune sweeps and CV folds: how many trials run at once
comes from the config (`max_concurrent_trials`), GPUs from the model config (`use_gpu`, `gpus_per_worker`),
never from what the cluster holds at submit time (an autoscaling cluster starts without GPU nodes). Only the
CPU share of each worker is fitted to the CPUs there are, always leaving whole CPUs for Ray Data (a run
whose data tasks cannot be scheduled sits at 0 rows without an error).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from raypipe import storage

log = logging.getLogger(__name__)

STORAGE_ENV = "RAYPIPE_STORAGE"
JOB_ENV_MARKER = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a submitted job's driver


def storage_root() -> str | None:
    """The cluster's shared storage root (`RAYPIPE_STORAGE`), or None on a laptop."""
    root = os.environ.get(STORAGE_ENV, "").strip()
    return root or None


def in_ray_job() -> bool:
    """True inside the driver of a `ray job submit` job (its cwd is a temporary copy of the working dir)."""
    return bool(os.environ.get(JOB_ENV_MARKER))


def resolve_output(path: str | os.PathLike) -> str:
    """Where a job writes `path`: URIs/absolute as given, relative under RAYPIPE_STORAGE (else the cwd)."""
    p = str(path)
    if storage.is_uri(p) or os.path.isabs(storage.local_path(p)):
        return p if storage.is_uri(p) else os.path.abspath(storage.local_path(p))
    root = storage_root()
    if root:
        return storage.join(root, p) if storage.is_uri(root) else os.path.abspath(os.path.join(root, p))
    if in_ray_job():
        log.warning("relative output %r inside a Ray job lands in the job's temporary working dir; "
                    "pass an absolute path or URI, or set %s", p, STORAGE_ENV)
    return os.path.abspath(p)


def resolve_input(path: str | os.PathLike) -> str:
    """Where a job reads `path`: as given when it exists here (or is a URI/absolute), else under RAYPIPE_STORAGE."""
    p = str(path)
    if storage.is_uri(p) or os.path.isabs(storage.local_path(p)):
        return p if storage.is_uri(p) else os.path.abspath(storage.local_path(p))
    if os.path.exists(p) or not storage_root():
        return os.path.abspath(p)
    return resolve_output(p)


def node_id() -> str:
    """The Ray node id of the calling process (for placement records)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def alive_nodes() -> int:
    """Alive Ray nodes (1 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 1
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


@dataclass(frozen=True)
class TrialResources:
    """How a sweep uses the cluster: trials at once, CPUs of a trial's driver function, per-worker resources."""

    max_concurrent: int
    trial_cpus: float
    worker_resources: dict[str, float]
    use_gpu: bool


def trial_resources(cluster: Mapping[str, float], workers_per_trial: int, trials: int, max_concurrent: int,
                    use_gpu: bool = False, gpus_per_worker: float = 1.0, trial_cpus: float = 0.25,
                    data_cpus: float | None = None, nodes: int | None = None) -> TrialResources:
    """Per-worker resources of `min(trials, max_concurrent)` concurrent trials on `cluster` (`ray.cluster_resources()`).

    Concurrency and GPUs are what the config asks for (`gpus_per_worker` GPUs per worker when `use_gpu`,
    requested even when the cluster has none yet). CPUs: whole CPUs are kept for Ray Data (a quarter of the
    cluster, at least one per node, since fractions left on several nodes cannot run a 1-CPU data task), the
    rest is shared by the concurrent trials' drivers and workers in quarter-CPU steps (at least a quarter CPU,
    at most 2 per worker). `nodes` defaults to the alive Ray nodes.
    """
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent_trials must be at least 1, got {max_concurrent}")
    if use_gpu and gpus_per_worker <= 0:
        raise ValueError(f"gpus_per_worker must be positive when use_gpu is true, got {gpus_per_worker}")
    cpus = float(cluster.get("CPU", 1.0))
    workers = max(1, int(workers_per_trial))
    if nodes is None:
        nodes = alive_nodes()
    reserve = float(data_cpus) if data_cpus is not None else max(1.0, math.floor(cpus / 4), float(nodes))
    usable = max(0.0, cpus - reserve)
    n = max(1, min(int(trials), int(max_concurrent)))
    per_cpu = max(0.25, math.floor(4 * (usable / n - trial_cpus) / workers) / 4)
    per_cpu = min(per_cpu, 2.0)
    resources = {"CPU": per_cpu, **({"GPU": float(gpus_per_worker)} if use_gpu else {})}
    return TrialResources(n, trial_cpus, resources, bool(use_gpu))
