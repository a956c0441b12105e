"""Ray job entrypoint: k-fold cross-validation of the X-ray DeepSurv (one Tune trial per fold).

    ray job submit --working-dir . -- python jobs/cv_xray.py \
        --config jobs/configs/xray_deepsurv_tiny.yaml --data runs/shards_xray --out runs/cv_xray --folds 5

Patient-level folds (`raypipe.tune.cv`); each trial builds and fits its own TorchTrainer; the out-of-fold
predictions (split `val`, fold k) go to OUT/predictions.parquet. Rerunning with the same --out resumes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("raypipe.jobs.cv_xray")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start or join Ray, run the CV."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="DeepSurv YAML config (an optional `cv:` section sets CV options)")
    p.add_argument("--data", required=True, help="X-ray shards folder (or s3/gs URI)")
    p.add_argument("--out", required=True, help="CV output folder")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--model", default="deepsurv")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raypipe.cluster import resolve_input, resolve_output
    a.data, a.out = resolve_input(a.data), resolve_output(a.out)
    from raypipe.ray_utils import init_ray
    from raypipe.tune.search import cv_cli

    init_ray()
    return cv_cli(a.model, a.config, a.folds, a.data, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
