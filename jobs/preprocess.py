"""Ray job entrypoint: preprocess a cohort into Parquet shards with Ray Data (`raypipe preprocess`).

    ray job submit --working-dir . -- python jobs/preprocess.py ct \
        --manifest /data/cohort/manifest.csv --out runs/shards_ct [--config preprocess.yaml]

Shards are written temp-then-rename and named by their studies and config, so a killed job rerun with the
same --out skips every shard already written (`raypipe.data.shards`). Relative --manifest/--out resolve
under RAYPIPE_STORAGE when set.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's raypipe when not installed

log = logging.getLogger("raypipe.jobs.preprocess")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start or join Ray, preprocess, log the run summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["ct", "xray"])
    p.add_argument("--manifest", required=True, help="cohort manifest (CSV or Parquet)")
    p.add_argument("--out", required=True, help="shards folder (local path or s3/gs URI)")
    p.add_argument("--config", default=None, help="preprocessing config YAML")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raypipe.cluster import resolve_input, resolve_output
    from raypipe.ray_utils import init_ray

    manifest, out = resolve_input(a.manifest), resolve_output(a.out)
    init_ray()
    if a.kind == "ct":
        from raypipe.data.ct_pipeline import preprocess_ct

        summary = preprocess_ct(manifest, out, config_path=a.config)
    else:
        from raypipe.data.xray_pipeline import preprocess_xray

        summary = preprocess_xray(manifest, out, config_path=a.config)
    log.info("summary: %s", json.dumps({k: v for k, v in summary.items() if k != "parquet_files"}, default=str))
    return 0 if summary["error"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
