"""Ray job entrypoint: Optuna TPE + ASHA search over a CT model's hyperparameters (`raypipe tune cnn-rnn`).

    ray job submit --working-dir . -- python jobs/tune_ct.py \
        --config jobs/configs/ct_search.yaml --data runs/shards_ct --out runs/tune_ct --trials 20

Trials at once and each trial's Ray Train worker resources come from `ray.cluster_resources()`
(`raypipe.cluster.trial_resources`). Writes OUT/results.csv, OUT/report.md and OUT/best_config.yaml;
rerunning with the same --out restores the experiment (`Tuner.restore`) without rerunning finished trials.
Relative --data/--out resolve under RAYPIPE_STORAGE when set.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's raypipe when not installed

log = logging.getLogger("raypipe.jobs.tune_ct")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start or join Ray, run the search, write the table and the best config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="search spec YAML (jobs/configs/ct_search.yaml)")
    p.add_argument("--data", required=True, help="CT shards folder (or s3/gs URI)")
    p.add_argument("--out", required=True, help="search output folder (local path or URI)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--model", choices=["cnn-rnn", "multitask"], default="cnn-rnn")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raypipe.cluster import resolve_input, resolve_output
    from raypipe.tune.search import tune_cli

    return tune_cli(a.model, a.config, a.trials, resolve_input(a.data), resolve_output(a.out))


if __name__ == "__main__":
    raise SystemExit(main())
