"""Bootstrap AUROC CI: raypipe's vectorised bootstrap vs a naive loop of sklearn `roc_auc_score`.

    python bench/bench_metrics.py [--patients 100000] [--boot 1000] [--naive 20] [--studies-per-patient 2]

The naive loop (stratified resample + `roc_auc_score`, as most evaluation scripts do it) runs on
`--naive` resamples only and its per-resample time is extrapolated to `--boot`. Both sides see the
same synthetic cohort (10% positives, AUROC about 0.64). Also times the patient-level (grouped)
variant and DeLong's test, and checks the vectorised replicates against sklearn on shared resamples.
One JSON figure per line on stdout; the full result dictionary is logged on stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
from _report import figure, ratio
from sklearn.metrics import roc_auc_score

from raypipe.metrics import auroc_bootstrap, auroc_ci, bootstrap_weights, delong_test

log = logging.getLogger("bench_metrics")


def naive_bootstrap(y: np.ndarray, score: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Stratified bootstrap written the usual way: one sklearn call per resample."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    out = np.empty(n_boot)
    for k in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        out[k] = roc_auc_score(y[idx], score[idx])
    return out


def main() -> None:
    """Time both implementations on one cohort and print seconds, per-resample cost and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--naive", type=int, default=20, help="resamples actually run by the naive loop")
    ap.add_argument("--studies-per-patient", type=float, default=2.0, help="mean, for the grouped run")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    rng = np.random.default_rng(a.seed)
    y = rng.random(a.patients) < 0.1
    score = 0.5 * y + rng.normal(size=a.patients)
    other = score + rng.normal(scale=0.5, size=a.patients)

    # correctness on shared resamples before timing
    check = auroc_bootstrap(y, score, n_boot=3, seed=a.seed)
    ref = [roc_auc_score(np.repeat(y, w), np.repeat(score, w)) for w in next(bootstrap_weights(y, 3, a.seed))]
    max_abs_diff = float(np.max(np.abs(check - ref)))

    t, c = time.perf_counter(), time.process_time()
    ci = auroc_ci(y, score, n_boot=a.boot, seed=a.seed)
    t_vec, c_vec = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    naive = naive_bootstrap(y, score, a.naive, a.seed)
    t_naive, c_naive = time.perf_counter() - t, time.process_time() - c
    per_naive = t_naive / a.naive

    n_studies = int(a.patients * a.studies_per_patient)
    patient = np.sort(rng.integers(0, a.patients, n_studies))
    y_g = rng.random(n_studies) < 0.1
    s_g = 0.5 * y_g + rng.normal(size=n_studies)
    t = time.perf_counter()
    ci_g = auroc_ci(y_g, s_g, n_boot=a.boot, seed=a.seed, groups=patient)
    t_grouped = time.perf_counter() - t

    t = time.perf_counter()
    dl = delong_test(y, score, other)
    t_delong = time.perf_counter() - t

    result = {
        "patients": a.patients,
        "resamples": a.boot,
        "cpu_count": os.cpu_count(),
        "vectorised_s": round(t_vec, 2),
        "vectorised_ms_per_resample": round(1000 * t_vec / a.boot, 3),
        "naive_resamples_run": a.naive,
        "naive_ms_per_resample": round(1000 * per_naive, 1),
        "naive_extrapolated_s": round(per_naive * a.boot, 1),
        "speedup_vectorised_over_naive": round(per_naive * a.boot / t_vec, 1),
        "vectorised_cpu_s": round(c_vec, 2),
        "naive_cpu_ms_per_resample": round(1000 * c_naive / a.naive, 1),
        "speedup_cpu_time": round(c_naive / a.naive * a.boot / c_vec, 1),
        "grouped_studies": n_studies,
        "grouped_patients": int(np.unique(patient).size),
        "grouped_vectorised_s": round(t_grouped, 2),
        "delong_s": round(t_delong, 3),
        "auroc": round(ci.value, 4),
        "auroc_ci": [round(ci.ci_low, 4), round(ci.ci_high, 4)],
        "naive_ci_from_run": [round(float(np.quantile(naive, 0.025)), 4), round(float(np.quantile(naive, 0.975)), 4)],
        "grouped_auroc_ci": [round(ci_g.ci_low, 4), round(ci_g.ci_high, 4)],
        "delong_p": dl.p_value,
        "check_max_abs_diff_vs_sklearn": max_abs_diff,
    }
    log.info("details %s", json.dumps(result))
    figure("metrics/auroc_bootstrap_vectorised", t_vec, "s", patients=a.patients, resamples=a.boot)
    figure("metrics/auroc_bootstrap_naive_extrapolated", per_naive * a.boot, "s", naive_resamples_run=a.naive)
    ratio("metrics/auroc_bootstrap_vectorised_over_naive_wall", per_naive * a.boot, t_vec)
    ratio("metrics/auroc_bootstrap_vectorised_over_naive_cpu", c_naive / a.naive * a.boot, c_vec)
    figure("metrics/auroc_bootstrap_patient_level", t_grouped, "s", studies=n_studies)
    figure("metrics/delong", t_delong, "s")
    figure("metrics/check_max_abs_diff_vs_sklearn", max_abs_diff, "auroc")
    figure("metrics/load_avg_1min_at_end", os.getloadavg()[0], "load")


if __name__ == "__main__":
    main()
