"""Ray job entrypoint for `raypipe train`: the same command line, run where the job runs.

    ray job submit --working-dir . -- python jobs/train.py cnn-rnn --config jobs/configs/ct_bone_muscle.yaml --data shards/ct --out runs/ct

Every option is `raypipe train`'s (`raypipe train --help`). Relative --data/--manifest/--out resolve under
RAYPIPE_STORAGE when it is set, so outputs never land in the job's temporary working dir; rerunning with
the same --out resumes.
"""
import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
