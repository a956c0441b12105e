"""Studies/s of `raypipe preprocess ct`: Ray Data on all cores vs a single-process loop, same studies.

    python bench/bench_preprocess_ct.py --patients 16 --shard-size 2

Both runs preprocess the same synthetic cohort into fresh folders; the ratio is printed at the end.
Ray start-up is excluded from the Ray timing (it is paid once per job, not per study).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from raypipe.data.ct_pipeline import preprocess_ct
from raypipe.data.synth import synth_cohort
from raypipe.preprocess.config import CTPreprocessConfig
from raypipe.ray_utils import init_ray

log = logging.getLogger("bench_preprocess_ct")


def main() -> None:
    """Build a cohort, time both execution modes and log studies/s and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the cohort and outputs (default: temp)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_ct_"))
    manifest = synth_cohort("ct", work / "cohort", a.patients, seed=a.seed, overwrite=True)
    cfg = CTPreprocessConfig(shard_size=a.shard_size)

    t = time.perf_counter()
    local = preprocess_ct(manifest, work / "out_local", config=cfg, use_ray=False)
    t_local = time.perf_counter() - t

    init_ray()
    t = time.perf_counter()
    distributed = preprocess_ct(manifest, work / "out_ray", config=cfg, use_ray=True)
    t_ray = time.perf_counter() - t

    n = local["ok"]
    result = {
        "studies": a.patients,
        "ok_local": local["ok"],
        "ok_ray": distributed["ok"],
        "local_s": round(t_local, 2),
        "ray_s": round(t_ray, 2),
        "local_studies_per_s": round(n / t_local, 3),
        "ray_studies_per_s": round(distributed["ok"] / t_ray, 3),
        "speedup_ray_over_local": round(t_local / t_ray, 2),
    }
    log.info("result %s", json.dumps(result))


if __name__ == "__main__":
    main()
