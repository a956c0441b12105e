"""Time `synth_cohort("ct", ...)` for N patients: one process vs a process pool, side by side.

    python bench/bench_synth.py [--patients 200] [--workers 0 (= one per core)] [--keep DIR]

Prints one JSON figure per line: studies/s (with wall seconds and CPU seconds per study, this process + pool
workers) for each run, and the pool/single speed ratio. The two outputs are checked to be byte-identical
(determinism across workers).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from _report import figure, ratio

from raypipe.data.synth import synth_cohort


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes under `root`."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _run(base: Path, name: str, patients: int, workers: int) -> tuple[float, float, str]:
    """Build the cohort with `workers` processes; print its figure; return (wall, CPU seconds, digest)."""
    out = base / name
    c0, t0 = _cpu(), time.perf_counter()
    synth_cohort("ct", out, patients=patients, seed=0, workers=workers)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    digest = _digest(out)
    figure(f"synth_ct/{name}_{workers}_workers", patients / wall, "studies/s", wall_s=round(wall, 2),
           cpu_s_per_study=round(cpu / patients, 3),
           mib=round(sum(p.stat().st_size for p in out.rglob("*")) / 2**20, 1))
    shutil.rmtree(out)
    return wall, cpu, digest


def main() -> None:
    """Time one process, then the pool, on the same cohort."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0, help="pool size (0: one per core)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    a = ap.parse_args()
    workers = a.workers or len(os.sched_getaffinity(0))
    base = Path(tempfile.mkdtemp(prefix="bench_synth_", dir=a.dir))
    figure("synth_ct/cores", len(os.sched_getaffinity(0)), "cores")
    figure("synth_ct/load_avg_1min_at_start", os.getloadavg()[0], "load")
    try:
        w1, _, d1 = _run(base, "single", a.patients, 1)
        wn, _, dn = _run(base, "pool", a.patients, workers)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio("synth_ct/pool_over_single", w1, wn, patients=a.patients)
    figure("synth_ct/identical_output", int(d1 == dn), "bool")


if __name__ == "__main__":
    main()
