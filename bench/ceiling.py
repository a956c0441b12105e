"""Learning to the ceiling, end to end: each image model through the real pipeline on the synthetic cohort.

    python bench/ceiling.py [--patients 300] [--seed 0] [--folds 3] [--out DIR] [--models cnn-rnn,deepsurv,pvf]
                            [--ct-config jobs/configs/ct_tiny.yaml] [--deepsurv-config ...] [--pvf-config ...]
                            [--reuse] [--n-boot 500]

Steps, each a `raypipe` CLI call in a subprocess (the same commands a user types):
`synth both` (DICOM + masks + radiographs) -> `preprocess ct` / `preprocess xray` (Ray Data) ->
`cv cnn-rnn` and `cv deepsurv` (patient-level k-fold on the development site, external = site B + the
manifest's `test` split) -> `train pvf` (pVF has no CV entry: its held-out `test` split is reported).
The figures are then computed from each run's predictions.parquet joined to the manifest's ground truth:

- the model's figure (AUROC of `fracture_5y` for the CNN-RNN, Harrell's C of (time_days, event) for
  DeepSurv, AUROC of `prevalent_fracture` for pVF) out of fold and on the external/test rows, with a
  patient-level stratified bootstrap 95 % CI (`raypipe.metrics`);
- the cohort's ceiling on exactly the same rows: the same metric of `true_lp` (all planted terms) and of
  `true_image_lp` (the terms rendered in that study's image; the ceiling of an image-only model);
  for pVF also of `deformity` (the label is `deformity >= 0.20`, so its AUROC is 1);
- chance (0.5).

Output: one JSON line per figure {"name", "value", "unit"} on stdout, then a readable table. `--reuse`
skips steps whose output folder already exists in `--out` (resume an interrupted bench).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from _report import figure

from raypipe.metrics.binary import auroc_ci
from raypipe.metrics.survival import concordance_ci

log = logging.getLogger("bench.ceiling")
ROOT = Path(__file__).resolve().parents[1]
CHANCE = 0.5
# The ceiling each model is held to: image-only CNN-RNN -> the image part of the linear predictor; DeepSurv
# image + clinical -> the full linear predictor; pVF -> the planted deformity (its label is deformity >= 0.20).
CEILING_OF = {"CT CNN-RNN": "true_image_lp", "DeepSurv": "true_lp", "pVF": "deformity"}


@dataclass(frozen=True)
class Figure:
    """One reported number with its CI (NaN when not computed)."""

    model: str
    rows: str  # "out-of-fold", "external", "test"
    score: str  # "model", "true_lp", "true_image_lp", "deformity", "chance"
    metric: str  # "AUROC" or "Harrell C"
    value: float
    ci_low: float
    ci_high: float
    n: int
    n_pos: int


def raypipe(*args: str) -> None:
    """Run one `raypipe` CLI command (this worktree's package), failing loudly with its output."""
    cmd = [sys.executable, "-m", "raypipe.cli", *args]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    log.info("$ raypipe %s", " ".join(args))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"raypipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    log.info("  done in %.0f s", time.time() - started)


def step(out: Path, reuse: bool, *args: str, done: str | None = None) -> Path:
    """Run a CLI step writing `out` unless `reuse` and it is complete (`done` file, else any content).

    A CV or training folder without its `done` file is rerun into the same folder, which resumes it (finished
    folds are kept, Ray Train restarts from the latest checkpoint)."""
    finished = out.exists() and (out / done).exists() if done else out.exists() and any(out.iterdir())
    if reuse and finished:
        log.info("reusing %s", out)
        return out
    raypipe(*args)
    return out


def _truth(manifest: Path) -> pd.DataFrame:
    """Per-study ground truth from the manifest, keyed by study_id."""
    m = pd.read_csv(manifest, dtype={"patient_id": str, "study_id": str})
    cols = ["study_id", "patient_id", "modality", "true_lp", "true_image_lp", "deformity", "time_days", "event",
            "fracture_5y", "prevalent_fracture"]
    return m[cols]


def _rows(pred_path: Path, truth: pd.DataFrame) -> pd.DataFrame:
    """The model's predictions joined to the ground truth of the same studies: per split, the run's main model
    (the shortest name: a CV writes `name` for out-of-fold and `name` + suffix for external rows; multitask
    heads and horizons carry longer names)."""
    p = pd.read_parquet(pred_path)
    keep = []
    for _, part in p.groupby("split", sort=False):
        main = min(part["model"].astype(str).unique(), key=len)
        keep.append(part[part["model"].astype(str) == main])
    p = pd.concat(keep, ignore_index=True)
    p = p[["study_id", "split", "score"] + [c for c in ("fold",) if c in p.columns]].copy()
    p["study_id"] = p["study_id"].astype(str)
    return p.merge(truth, on="study_id", how="inner", validate="many_to_one")


def binary_figures(model: str, rows_name: str, df: pd.DataFrame, label: str, scores: Sequence[str],
                   n_boot: int, seed: int) -> list[Figure]:
    """AUROC of each score column for `label` on the rows where the label is known (patient bootstrap)."""
    known = df[pd.to_numeric(df[label], errors="coerce").notna()]
    y = known[label].to_numpy(dtype=float).astype(int)
    out = []
    for s in scores:
        ci = auroc_ci(y, known[s].to_numpy(dtype=float), n_boot, seed, groups=known["patient_id"].to_numpy())
        out.append(Figure(model, rows_name, "model" if s == "score" else s, "AUROC", ci.value, ci.ci_low, ci.ci_high,
                          len(known), int(y.sum())))
    return out


def survival_figures(model: str, rows_name: str, df: pd.DataFrame, scores: Sequence[str], n_boot: int,
                     seed: int) -> list[Figure]:
    """Harrell's C of each score column on (time_days, event) (patient bootstrap)."""
    t, e = df["time_days"].to_numpy(dtype=float), df["event"].to_numpy(dtype=float).astype(bool)
    out = []
    for s in scores:
        ci = concordance_ci(t, e, df[s].to_numpy(dtype=float), n_boot, seed, groups=df["patient_id"].to_numpy())
        out.append(Figure(model, rows_name, "model" if s == "score" else s, "Harrell C", ci.value, ci.ci_low,
                          ci.ci_high, len(df), int(e.sum())))
    return out


def _split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one prediction split; the external rows are averaged over the fold models per study."""
    sub = df[df["split"] == split]
    if split != "val" and "fold" in sub.columns and sub["study_id"].duplicated().any():
        agg = sub.groupby("study_id", as_index=False)["score"].mean()
        sub = agg.merge(sub.drop(columns=["score", "fold"]).drop_duplicates("study_id"), on="study_id")
    return sub


def run(args: argparse.Namespace) -> list[Figure]:
    """The whole bench: cohort, preprocessing, the requested models, figures."""
    out = Path(args.out or tempfile.mkdtemp(prefix="raypipe-ceiling-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cohort = step(out / "cohort", args.reuse, "synth", "both", "--out", str(out / "cohort"), "--patients",
                  str(args.patients), "--seed", str(args.seed), "--workers", str(args.workers))
    manifest = cohort / "manifest.csv"
    truth = _truth(manifest)
    figs: list[Figure] = []
    if "cnn-rnn" in models:
        ct = step(out / "ct", args.reuse, "preprocess", "ct", "--manifest", str(manifest), "--out", str(out / "ct"))
        cv = step(out / "cv_cnn_rnn", args.reuse, "cv", "cnn-rnn", "--config", args.ct_config, "--folds",
                  str(args.folds), "--data", str(ct), "--out", str(out / "cv_cnn_rnn"), done="predictions.parquet")
        df = _rows(cv / "predictions.parquet", truth[truth["modality"] == "CT"])
        for split, name in (("val", "out-of-fold"), ("external", "external")):
            rows = _split_rows(df, split)
            if len(rows):
                figs += binary_figures("CT CNN-RNN", name, rows, "fracture_5y",
                                       ["score", "true_lp", "true_image_lp"], args.n_boot, args.seed)
    if "deepsurv" in models or "pvf" in models:
        xr = step(out / "xray", args.reuse, "preprocess", "xray", "--manifest", str(manifest), "--out",
                  str(out / "xray"))
    if "deepsurv" in models:
        cv = step(out / "cv_deepsurv", args.reuse, "cv", "deepsurv", "--config", args.deepsurv_config, "--folds",
                  str(args.folds), "--data", str(xr), "--out", str(out / "cv_deepsurv"), done="predictions.parquet")
        df = _rows(cv / "predictions.parquet", truth[truth["modality"] == "XR"])
        for split, name in (("val", "out-of-fold"), ("external", "external")):
            rows = _split_rows(df, split)
            if len(rows):
                figs += survival_figures("DeepSurv", name, rows, ["score", "true_lp", "true_image_lp"], args.n_boot,
                                         args.seed)
    if "pvf" in models:
        run_dir = step(out / "pvf", args.reuse, "train", "pvf", "--config", args.pvf_config, "--data",
                       str(manifest), "--out", str(out / "pvf"), done="predictions.parquet")
        df = _rows(run_dir / "predictions.parquet", truth[truth["modality"] == "XR"])
        for split in ("test",):
            rows = _split_rows(df, split)
            if len(rows):
                figs += binary_figures("pVF", split, rows, "prevalent_fracture",
                                       ["score", "true_lp", "true_image_lp", "deformity"], args.n_boot, args.seed)
    return figs


def report(figs: Sequence[Figure], args: argparse.Namespace) -> None:
    """JSON lines {"name","value","unit"} on stdout and a readable table on stderr (model, ceilings, chance)."""
    for f in figs:
        base = f"ceiling/{f.model}/{f.rows}/{f.score}"
        unit = "auroc" if f.metric == "AUROC" else "c_index"
        figure(base, f.value, unit)
        figure(f"{base}/ci_low", f.ci_low, unit)
        figure(f"{base}/ci_high", f.ci_high, unit)
    groups: dict[tuple[str, str], dict[str, Figure]] = {}
    for f in figs:
        groups.setdefault((f.model, f.rows), {})[f.score] = f
    print(f"\ncohort: {args.patients} patients, seed {args.seed}, {args.folds}-fold CV; 95 % CI: patient-level bootstrap",
          file=sys.stderr)
    print(f"{'model':<11} {'rows':<12} {'metric':<9} {'n (pos/events)':>15} {'model [95% CI]':>22} "
          f"{'true_lp':>8} {'true_img':>8} {'gap':>6} {'chance':>6}", file=sys.stderr)
    for (model, rows), d in groups.items():
        m = d["model"]
        ceiling = d.get(CEILING_OF[model], m)
        print(f"{model:<11} {rows:<12} {m.metric:<9} {f'{m.n} ({m.n_pos})':>15} "
              f"{f'{m.value:.3f} [{m.ci_low:.3f}, {m.ci_high:.3f}]':>22} {d['true_lp'].value:>8.3f} "
              f"{d['true_image_lp'].value:>8.3f} {ceiling.value - m.value:>6.3f} {CHANCE:>6.2f}", file=sys.stderr)
        figure(f"ceiling/{model}/{rows}/gap_to_ceiling", ceiling.value - m.value,
               "auroc" if m.metric == "AUROC" else "c_index")
    print("gap: ceiling - model; ceiling = true_image_lp for the image-only CNN-RNN, true_lp for DeepSurv image + "
          "clinical, deformity for pVF (its label is deformity >= 0.20, AUROC 1); chance = 0.5", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="synth processes")
    p.add_argument("--out", default=None, help="work folder (default: a new temp dir)")
    p.add_argument("--models", default="cnn-rnn,deepsurv,pvf")
    p.add_argument("--ct-config", default=str(ROOT / "jobs/configs/ct_tiny.yaml"))
    p.add_argument("--deepsurv-config", default=str(ROOT / "jobs/configs/xray_deepsurv_tiny.yaml"))
    p.add_argument("--pvf-config", default=str(ROOT / "jobs/configs/pvf_tiny.yaml"))
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--reuse", action="store_true", help="skip steps whose output folder exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    figs = run(args)
    report(figs, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
