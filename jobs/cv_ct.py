"""Ray job entrypoint: k-fold cross-validation of a CT model (one Ray Tune trial per fold) + clinical baselines.

    ray job submit --working-dir . -- python jobs/cv_ct.py \
        --config jobs/configs/ct_bone_muscle.yaml --data runs/shards_ct --out runs/cv_ct_bone_muscle --folds 10

    # smoke run on 2 CPU cores
    python jobs/cv_ct.py --config jobs/configs/ct_tiny.yaml --data runs/shards_ct --out runs/cv_tiny --folds 3

CV settings come from the config's optional `cv:` section (`raypipe.tune.cv.CVConfig`: folds, seed,
development_site, max_concurrent_trials, max_failures, trial_cpus, gradcam_studies, n_boot); --folds
overrides `cv.folds`. The shared jobs/configs/ct_*.yaml have no `cv:` section (`raypipe train` would reject
it), so the defaults apply: 10 folds as in papers/000, seeded by the config's seed. `--baselines` also
cross-validates clinical models A-D and FRAX with the same folds into OUT/clinical.

Relative --data/--out resolve under RAYPIPE_STORAGE when set (`raypipe.cluster`). Rerunning with the same --out resumes the Tune experiment OUT/ray_results/cv (`Tuner.restore`):
finished folds are not run again. The model kind comes from --model, else the config's `model` name.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir's raypipe when not installed

log = logging.getLogger("raypipe.jobs.cv_ct")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, start or join Ray, run the folds, write OUT (and OUT/clinical with --baselines)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (jobs/configs/ct_*.yaml, optional cv: section)")
    p.add_argument("--data", required=True, help="folder (or s3/gs URI) of CT shards from `raypipe preprocess ct`")
    p.add_argument("--out", required=True, help="CV folder: folds/, predictions.parquet, metrics.json, gradcam/")
    p.add_argument("--folds", type=int, default=None, help="k (default: cv.folds of the config, else 10)")
    p.add_argument("--model", choices=["cnn-rnn", "multitask"], default=None, help="default: from the config")
    p.add_argument("--baselines", action="store_true", help="also clinical models A-D + FRAX into OUT/clinical")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from raypipe.cluster import resolve_input, resolve_output
    a.data, a.out = resolve_input(a.data), resolve_output(a.out)
    from raypipe import storage
    from raypipe.config import read_yaml
    from raypipe.ray_utils import init_ray
    from raypipe.tune.cv import load_cv_configs, run_cv, summary_table

    kind = a.model or ("multitask" if str(read_yaml(a.config).get("model", "cnn_rnn")).startswith("multitask")
                       else "cnn-rnn")
    cfg, cv = load_cv_configs(kind, a.config, a.folds)
    init_ray()
    result = run_cv(kind, cfg, a.data, a.out, cv)
    for line in summary_table(result.metrics):
        log.info("%s", line)
    if a.baselines:
        from raypipe.tune.baselines import run_clinical_cv

        run_clinical_cv(a.data, storage.join(a.out, "clinical"), label=getattr(cfg, "label", "fracture_5y"),
                        seed=result.plan.seed, folds_csv=storage.join(result.out_dir, "folds.csv"),
                        n_boot=cv.n_boot if cv.n_boot is not None else cfg.n_boot)
    log.info("done: %s", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
