"""Ray job entrypoint for `raypipe cv`: the same command line, run where the job runs.

    ray job submit --working-dir . -- python jobs/cv.py cnn-rnn --config jobs/configs/ct_bone_muscle.yaml --folds 10 --data shards/ct --out runs/cv_ct --baselines

Every option is `raypipe cv`'s (`raypipe cv --help`). Relative --data/--manifest/--out resolve under
RAYPIPE_STORAGE when it is set, so outputs never land in the job's temporary working dir; rerunning with
the same --out resumes.
"""
import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["cv", *sys.argv[1:]]))
