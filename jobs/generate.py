"""`ray job submit -- python jobs/generate.py --config jobs/configs/generate.yaml --data MANIFEST --model DIR --pvf DIR --out DIR`.

Batch Diff-X generation over a cohort (`raypipe.data.generate_pipeline`): generation.json per study,
predictions.parquet for `raypipe evaluate`, diffx_metrics.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's raypipe when not installed


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run `generate_cohort_cli`."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None, help="GenerateJobConfig YAML (years, seeds, steps, thresholds)")
    p.add_argument("--data", required=True, help="cohort manifest")
    p.add_argument("--model", required=True, help="`raypipe train ldm` output or registry version folder")
    p.add_argument("--pvf", default=None, help="`raypipe train pvf` output or registry version folder")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raypipe.cluster import resolve_input, resolve_output

    a.data, a.out, a.model = resolve_input(a.data), resolve_output(a.out), resolve_input(a.model)
    a.pvf = resolve_input(a.pvf) if a.pvf else None
    from raypipe.data.generate_pipeline import generate_cohort_cli

    return generate_cohort_cli(a.data, a.model, a.out, a.pvf, a.config)


if __name__ == "__main__":
    sys.exit(main())
