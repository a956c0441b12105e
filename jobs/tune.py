"""Ray job entrypoint for `raypipe tune`: the same command line, run where the job runs.

    ray job submit --working-dir . -- python jobs/tune.py deepsurv --config jobs/configs/xray_deepsurv_search.yaml --trials 20 --data shards/xray --out runs/tune

Every option is `raypipe tune`'s (`raypipe tune --help`). Relative --data/--manifest/--out resolve under
RAYPIPE_STORAGE when it is set, so outputs never land in the job's temporary working dir; rerunning with
the same --out resumes.
"""
import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
