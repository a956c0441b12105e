"""Time `synth_cohort("ct", ...)` for N patients: one process vs a process pool, side by side.

    python bench/bench_synth.py [--patients 200] [--workers 0 (= one per core)] [--keep DIR]

Prints wall seconds, studies/s and CPU seconds per study (this process + pool workers) for each run, and the
pool/single speed ratio. The two outputs are checked to be byte-identical (determinism across workers).
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

from raypipe.data.synth import synth_cohort


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _run(base: Path, name: str, patients: int, workers: int) -> tuple[float, float, str]:
    out = base / name
    c0, t0 = _cpu(), time.perf_counter()
    synth_cohort("ct", out, patients=patients, seed=0, workers=workers)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    digest = _digest(out)
    print(f"{name:>8}: workers={workers} wall={wall:7.1f} s  {patients / wall:6.2f} studies/s  "
          f"cpu/study={cpu / patients:5.2f} s  size={sum(p.stat().st_size for p in out.rglob('*')) / 2**20:7.1f} MiB")
    shutil.rmtree(out)
    return wall, cpu, digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0, help="pool size (0: one per core)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    a = ap.parse_args()
    workers = a.workers or len(os.sched_getaffinity(0))
    base = Path(tempfile.mkdtemp(prefix="bench_synth_", dir=a.dir))
    print(f"synth ct: {a.patients} patients, {len(os.sched_getaffinity(0))} cores, load avg {os.getloadavg()[0]:.1f}")
    try:
        w1, _, d1 = _run(base, "single", a.patients, 1)
        wn, _, dn = _run(base, "pool", a.patients, workers)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"pool/single speed-up: {w1 / wn:.2f}x  identical output: {d1 == dn}")


if __name__ == "__main__":
    main()
