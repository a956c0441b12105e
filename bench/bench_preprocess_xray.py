"""Images/s of `raypipe preprocess xray`: Ray Data on all cores vs a single-process loop, same radiographs.

    python bench/bench_preprocess_xray.py --patients 24 --shard-size 2 [--variant patches_l1l5]

Both runs preprocess the same synthetic cohort into fresh folders; the ratio is logged at the end.
Ray start-up is excluded from the Ray timing (it is paid once per job, not per image), and a warm-up
study in this process is excluded from the single-process timing for the same reason (imports).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from raypipe.data.synth import synth_cohort
from raypipe.data.xray_pipeline import preprocess_xray
from raypipe.preprocess.config import XRAY_VARIANTS, XrayPreprocessConfig
from raypipe.ray_utils import init_ray

log = logging.getLogger("bench_preprocess_xray")


def main() -> None:
    """Build a cohort, time both execution modes and log images/s and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--shard-size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=XRAY_VARIANTS, default="patches_l1l5")
    ap.add_argument("--work", type=Path, default=None, help="folder for the cohort and outputs (default: temp)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_xray_"))
    manifest = synth_cohort("xray", work / "cohort", a.patients, seed=a.seed, overwrite=True)
    cfg = XrayPreprocessConfig(shard_size=a.shard_size, variant=a.variant)

    warm_manifest = Path(manifest).with_name("_warmup.csv")  # same folder: relative paths still resolve
    pd.read_csv(manifest).head(1).to_csv(warm_manifest, index=False)
    preprocess_xray(warm_manifest, work / "out_warmup", config=cfg, use_ray=False)  # imports, caches

    t = time.perf_counter()
    local = preprocess_xray(manifest, work / "out_local", config=cfg, use_ray=False)
    t_local = time.perf_counter() - t

    init_ray()
    t = time.perf_counter()
    distributed = preprocess_xray(manifest, work / "out_ray", config=cfg, use_ray=True)
    t_ray = time.perf_counter() - t

    result = {
        "images": a.patients,
        "variant": a.variant,
        "ok_local": local["ok"],
        "ok_ray": distributed["ok"],
        "local_s": round(t_local, 2),
        "ray_s": round(t_ray, 2),
        "local_images_per_s": round(local["ok"] / t_local, 3),
        "ray_images_per_s": round(distributed["ok"] / t_ray, 3),
        "speedup_ray_over_local": round(t_local / t_ray, 2),
    }
    log.info("result %s", json.dumps(result))


if __name__ == "__main__":
    main()
