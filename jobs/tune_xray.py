"""Ray job entrypoint: Optuna TPE + ASHA search over the X-ray DeepSurv's hyperparameters.

    ray job submit --working-dir . -- python jobs/tune_xray.py \
        --config jobs/configs/xray_deepsurv_search.yaml --data runs/shards_xray --out runs/tune_xray --trials 20

Writes OUT/results.csv (one row per trial) and OUT/best_config.yaml; rerunning with the same --out restores.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("raypipe.jobs.tune_xray")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start or join Ray, run the search."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="search spec YAML (jobs/configs/xray_deepsurv_search.yaml)")
    p.add_argument("--data", required=True, help="X-ray shards folder (or s3/gs URI)")
    p.add_argument("--out", required=True, help="search output folder")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--model", default="deepsurv")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raypipe.cluster import resolve_input, resolve_output
    a.data, a.out = resolve_input(a.data), resolve_output(a.out)
    from raypipe.tune.search import tune_cli

    return tune_cli(a.model, a.config, a.trials, a.data, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
