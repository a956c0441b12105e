"""Ray job entrypoint for `raypipe preprocess`: the same command line, run where the job runs.

    ray job submit --working-dir . -- python jobs/preprocess.py ct --manifest s3://bucket/cohort/manifest.csv --out s3://bucket/shards/ct

Every option is `raypipe preprocess`'s (`raypipe preprocess --help`). Relative --data/--manifest/--out resolve under
RAYPIPE_STORAGE when it is set, so outputs never land in the job's temporary working dir; rerunning with
the same --out resumes.
"""
import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
