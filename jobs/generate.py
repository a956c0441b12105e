"""Ray job entrypoint for `raypipe generate-batch`: the same command line, run where the job runs.

    ray job submit --working-dir . -- python jobs/generate.py --data cohort/manifest.csv --model registry/ldm/v1 --pvf registry/pvf/v1 --out runs/diffx

Every option is `raypipe generate-batch`'s (`raypipe generate-batch --help`). Relative --data/--manifest/--out resolve under
RAYPIPE_STORAGE when it is set, so outputs never land in the job's temporary working dir; rerunning with
the same --out resumes.
"""
import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate-batch", *sys.argv[1:]]))
