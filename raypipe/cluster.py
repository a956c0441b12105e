"""Running on a Ray cluster: where job outputs go, which node ran what, and how many trials fit at once.

`ray job submit --working-dir .` runs a job in a temporary copy of the working directory on the head
node, so a relative output path would vanish with it. Every `jobs/*.py` entrypoint therefore resolves its
paths with `resolve_output` / `resolve_input`: URIs and absolute paths are kept; a relative path lands
under `RAYPIPE_STORAGE` (the one shared storage root of a cluster, e.g. `s3://bucket/raypipe`) when it is
set, else under the directory the command was started from (as `raypipe` does on a laptop).

`trial_resources` sizes Tune sweeps from `ray.cluster_resources()`: how many trials run at once and how
many CPUs (or GPUs) each trial's Ray Train workers get, always leaving whole CPUs for Ray Data (a run
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


def trial_resources(cluster: Mapping[str, float], workers_per_trial: int, trials: int,
                    trial_cpus: float = 0.25, max_concurrent: int | None = None,
                    data_cpus: float | None = None, nodes: int | None = None) -> TrialResources:
    """Concurrency and per-worker resources that fit `cluster` (a `ray.cluster_resources()` mapping).

    GPU clusters: one GPU per worker, as many trials as the GPUs hold. CPU clusters: whole CPUs are kept
    for Ray Data (a quarter of the cluster, at least one per node, since fractions left on several nodes
    cannot run a 1-CPU data task), the rest is shared by the concurrent trials' drivers and workers in
    quarter-CPU steps (at least a quarter CPU per worker). `nodes` defaults to the alive Ray nodes.
    """
    cpus = float(cluster.get("CPU", 1.0))
    gpus = int(cluster.get("GPU", 0))
    workers = max(1, int(workers_per_trial))
    if nodes is None:
        nodes = alive_nodes()
    reserve = float(data_cpus) if data_cpus is not None else max(1.0, math.floor(cpus / 4), float(nodes))
    usable = max(0.0, cpus - reserve)
    if gpus >= 1:
        fit = max(1, gpus // workers)
        per_cpu = max(0.25, math.floor(4 * (usable / max(1, fit) - trial_cpus) / workers) / 4)
        n = min(trials, fit, max_concurrent or fit)
        return TrialResources(n, trial_cpus, {"CPU": per_cpu, "GPU": 1.0}, True)
    fit = max(1, int(usable // (trial_cpus + 0.25 * workers)))
    n = max(1, min(trials, fit, max_concurrent or fit))
    per_cpu = max(0.25, math.floor(4 * (usable / n - trial_cpus) / workers) / 4)
    per_cpu = min(per_cpu, 2.0)
    return TrialResources(n, trial_cpus, {"CPU": per_cpu}, False)
