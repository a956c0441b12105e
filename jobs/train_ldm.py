"""`ray job submit -- python jobs/train_ldm.py --config jobs/configs/ldm.yaml --data MANIFEST --out DIR`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's raypipe when not installed


def main(argv: list[str] | None = None) -> int:
    """Parse --config/--data/--out and run `raypipe.train.ldm.train_cli`."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=None, help="YAML config (jobs/configs/ldm.yaml or ldm_tiny.yaml)")
    p.add_argument("--data", required=True, help="manifest (or folder holding manifest.csv)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from raypipe.cluster import resolve_input, resolve_output
    a.data = resolve_input(a.data)
    a.out = resolve_output(a.out) if a.out else None
    from raypipe.train.ldm import train_cli

    return train_cli(a.config, a.data, a.out)


if __name__ == "__main__":
    sys.exit(main())
