"""Ray job entrypoint: train a CT model (CNN-RNN or multitask) on preprocessed shards.

    ray job submit --working-dir . -- python jobs/train_ct.py \
        --config jobs/configs/ct_tiny.yaml --data runs/shards_ct --out runs/ct_tiny

Connects to the cluster the job runs on (RAY_ADDRESS) or starts a local Ray; rerunning with the same
--out resumes from the latest checkpoint. Relative --data/--out resolve under RAYPIPE_STORAGE when set
(`raypipe.cluster.resolve_output`), never inside the job's temporary working dir. The model kind comes from --model, else from the config's
`model` name (multitask* -> multitask).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's raypipe when not installed

log = logging.getLogger("raypipe.jobs.train_ct")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start or join Ray, train, write the run folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (jobs/configs/ct_*.yaml)")
    p.add_argument("--data", required=True, help="folder (or s3/gs URI) of CT shards from `raypipe preprocess ct`")
    p.add_argument("--out", required=True, help="run folder: checkpoints, predictions, metrics, model")
    p.add_argument("--model", choices=["cnn-rnn", "multitask"], default=None, help="default: from the config")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raypipe.cluster import resolve_input, resolve_output
    a.data, a.out = resolve_input(a.data), resolve_output(a.out)
    from raypipe.config import load_config, read_yaml
    from raypipe.ray_utils import init_ray
    from raypipe.train.ct import config_class_for, fit_ct

    kind = a.model or str(read_yaml(a.config).get("model", "cnn_rnn"))
    cfg = load_config(config_class_for(kind), a.config)
    init_ray()
    fit_ct(cfg, a.data, a.out)
    log.info("done: %s", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
