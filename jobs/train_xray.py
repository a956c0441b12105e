"""Ray job entrypoint: train an X-ray model (DeepSurv on X-ray shards, or the L1-L5 keypoint model).

    ray job submit --working-dir . -- python jobs/train_xray.py \
        --config jobs/configs/xray_deepsurv_tiny.yaml --data runs/shards_xray --out runs/xray_deepsurv_tiny
    ray job submit --working-dir . -- python jobs/train_xray.py \
        --config jobs/configs/keypoints_tiny.yaml --data cohort/manifest.csv --out runs/keypoints_tiny

The kind comes from --model, else from the config's `model` name (keypoints* -> keypoints). --data is a
shards folder for DeepSurv and a manifest (with keypoints_path) for the keypoint model. Connects to
RAY_ADDRESS or starts a local Ray; rerunning with the same --out resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's raypipe when not installed

log = logging.getLogger("raypipe.jobs.train_xray")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start or join Ray, train, write the run folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (jobs/configs/xray_deepsurv*.yaml, keypoints*.yaml)")
    p.add_argument("--data", required=True, help="X-ray shards folder (DeepSurv) or manifest (keypoints)")
    p.add_argument("--out", required=True, help="run folder (local path or s3/gs URI)")
    p.add_argument("--model", choices=["deepsurv", "keypoints"], default=None, help="default: from the config")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raypipe.cluster import resolve_input, resolve_output
    a.data, a.out = resolve_input(a.data), resolve_output(a.out)
    from raypipe.config import read_yaml

    kind = a.model or ("keypoints" if str(read_yaml(a.config).get("model", "")).startswith("keypoints") else "deepsurv")
    if kind == "keypoints":
        from raypipe.train.keypoints import train_cli
    else:
        from raypipe.train.deepsurv import train_cli
    code = train_cli(kind, a.config, a.data, a.out)
    log.info("done: %s", a.out)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
