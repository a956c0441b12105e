"""k-fold cross-validation on Ray Tune: patient-level stratified folds, one Tune trial per fold.

papers/000 reports its image and clinical models over 10-fold cross-validation of the development set
and scores an external validation set. `run_cv` does that for any task of `raypipe.tasks` with a
fold-fit function:

1. `split_development_external` + `assign_folds`: external patients are those with a study in
   `split == "test"` or from another site than the development site; development patients are dealt
   into k folds stratified on the label (positive / negative / unknown), seeded, by patient.
2. One Tune trial per fold (`tune.grid_search` over fold ids). A trial is a function (Ray Train V2:
   never `Tuner(trainer)`) that calls the task's fold-fit (`raypipe.train.fold.FoldTask`), which builds
   and fits its own `TorchTrainer` and writes `OUT/folds/fold_KK/`. Nested selection: the fold-fit
   splits the fold's training patients again (train / `tune`, by patient, stratified); early stopping
   and the checkpoint are chosen on `tune`, and the held-out fold is scored once, at the end.
3. Out-of-fold predictions (split `val`, `fold` = k) and the external set scored by every fold model
   (mean of the fold scores; split `external`, `fold` = -1, model name + `@external`) go to
   `OUT/predictions.parquet`, with a `threshold` column: each fold's Youden cut-off chosen on its own
   `tune` rows (training patients), and for the external set the Youden cut-off of the out-of-fold
   development predictions. Before pooling, each fold model's probabilities are recalibrated (Platt) on the
   fold's `tune` rows, so every fold's scores are on one scale (`recalibrate_fold`).
   `OUT/metrics.json` (DESIGN.md schema) holds both sets.

A fold-fit must write `predictions.parquet` (prediction schema; split `val` for the fold's held-out
patients, `tune` for its inner validation patients, `external` for the external ones) and
`model_meta.json` into `task.out_dir`, and return a few scalar metrics for Tune.

Resuming: the Tune experiment lives in `OUT/ray_results/cv` (`experiment_path(OUT)`). Rerunning the
same command with the same OUT calls `Tuner.restore(OUT/ray_results/cv, trainable, resume_errored=True)`:
finished folds are not run again, errored or interrupted ones continue (and their Ray Train run resumes
from its latest checkpoint in `OUT/folds/fold_KK/ray_results`). By hand:
``Tuner.restore(experiment_path(OUT), fold_trainable(spec), resume_errored=True).fit()`` with the
spec of `build_trial_spec`. A fold that finished (a `fold.json` with the same config hash) is also never
trained twice, even when the Tune state was deleted. Every trial start is appended to
`OUT/folds/fold_KK/attempts.log`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import Field

from raypipe.config import StrictModel
from raypipe.train.fold import FoldTask

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotations only: tracking imports Ray Train
    from raypipe.metrics import LogisticRecalibration
    from raypipe.tracking import Tracking

EXTERNAL_SUFFIX = "@external"
DEV_SPLIT = "val"
TUNE_SPLIT = "tune"  # a fold's inner validation rows (raypipe.data.splits.TUNE_ROLE)
EXTERNAL_SPLIT = "external"
EXPERIMENT_NAME = "cv"
FOLD_FILE = "fold.json"
ATTEMPTS_FILE = "attempts.log"


# ---------------------------------------------------------------------------------------------- settings
class CVConfig(StrictModel):
    """Cross-validation settings (the `cv:` section of a config, or `raypipe cv` flags)."""

    folds: int = Field(10, ge=2, description="k of k-fold (papers/000: 10)")
    seed: int | None = Field(None, description="fold assignment seed; default: the model config's seed")
    label: str | None = Field(None, description="stratification label; default: the config's label, else event")
    development_site: str | None = Field(None, description="site of the development set; default: the commonest")
    external: bool = Field(True, description="score the external set (other site or split test) with every fold")
    max_concurrent_trials: int = Field(
        1, ge=1, description="folds trained at once (each asks for its workers' CPUs/GPUs; an autoscaler adds nodes)")
    max_failures: int = Field(1, ge=0, description="Tune retries per fold trial (FailureConfig)")
    trial_cpus: float = Field(0.5, gt=0, description="CPUs of a trial's driver function (Train workers ask for theirs)")
    gradcam_studies: int = Field(4, ge=0, description="validation studies with a Grad-CAM grid in OUT/gradcam")
    n_boot: int | None = Field(None, ge=0, description="bootstrap resamples for metrics.json; default: the config's")


# ---------------------------------------------------------------------------------------------- folds
@dataclass(frozen=True)
class FoldPlan:
    """Which development patient is in which fold, and which patients form the external set."""

    n_folds: int
    seed: int
    label: str | None
    fold_of: dict[str, int]
    external: tuple[str, ...] = ()

    def patients(self, fold: int) -> dict[str, list[str]]:
        """Role -> patient ids for one fold: `train`, `val` and (when any) `external`."""
        roles = {"train": sorted(p for p, f in self.fold_of.items() if f != fold),
                 "val": sorted(p for p, f in self.fold_of.items() if f == fold)}
        if self.external:
            roles["external"] = sorted(self.external)
        return roles

    def frame(self) -> pd.DataFrame:
        """One row per patient: patient_id, fold (-1 external), set (development|external)."""
        rows = [(p, f, "development") for p, f in sorted(self.fold_of.items())]
        rows += [(p, -1, "external") for p in sorted(self.external)]
        return pd.DataFrame(rows, columns=["patient_id", "fold", "set"])

    def digest(self) -> str:
        """Short hash of the assignment (a rerun on the same OUT must use the same folds)."""
        from raypipe.config import config_hash

        return config_hash({"k": self.n_folds, "folds": self.fold_of, "external": list(self.external)})


def split_development_external(meta: pd.DataFrame, development_site: str | None = None,
                               use_external: bool = True) -> tuple[list[str], list[str]]:
    """Development and external patients: external = a study in split `test` or from another site."""
    pid = meta["patient_id"].astype(str)
    external = pd.Series(False, index=meta.index)
    if use_external and "split" in meta.columns:
        external |= meta["split"].astype("string").str.lower().eq("test").fillna(False).to_numpy()
    if use_external and "site" in meta.columns and meta["site"].notna().any():
        site = meta["site"].astype("string")
        dev_site = development_site
        if dev_site is None:
            dev_site = str(site[~external].mode().iloc[0]) if (~external).any() else str(site.mode().iloc[0])
        external |= (site.notna() & (site != dev_site)).to_numpy()
    ext_patients = set(pid[external.to_numpy()])
    dev = sorted(set(pid) - ext_patients)
    return dev, sorted(ext_patients)


def assign_folds(meta: pd.DataFrame, n_folds: int, seed: int = 0, label: str | None = "fracture_5y",
                 development_site: str | None = None, use_external: bool = True) -> FoldPlan:
    """Patient-level folds stratified on the label (positive / negative / unknown), deterministic by seed."""
    dev, ext = split_development_external(meta, development_site, use_external)
    if len(dev) < n_folds:
        raise ValueError(f"{len(dev)} development patients cannot fill {n_folds} folds")
    sub = meta[meta["patient_id"].astype(str).isin(dev)]
    if label and label in sub.columns:
        y = pd.to_numeric(sub[label], errors="coerce")
        per_patient = y.groupby(sub["patient_id"].astype(str)).max()
    else:
        per_patient = pd.Series(np.nan, index=sorted(dev))
    stratum = per_patient.reindex(dev).map(lambda v: "unknown" if pd.isna(v) else ("positive" if v > 0 else "negative"))
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for name in ("positive", "negative", "unknown"):
        ids = np.array(sorted(stratum.index[stratum == name]), dtype=object)
        rng.shuffle(ids)
        for i, p in enumerate(ids):
            fold_of[str(p)] = (offset + i) % n_folds
        offset += len(ids)
    n_pos = int((stratum == "positive").sum())
    if label and n_pos < n_folds:
        log.warning("only %d positive development patients for %d folds: some folds have no positives", n_pos, n_folds)
    return FoldPlan(n_folds=n_folds, seed=seed, label=label, fold_of=fold_of, external=tuple(ext))


FoldFit = Callable[[FoldTask], Mapping[str, float]]


# ---------------------------------------------------------------------------------------------- Tune trials
@dataclass(frozen=True)
class TrialSpec:
    """Everything a fold trial needs, shipped once through the object store (`tune.with_parameters`)."""

    fit: FoldFit
    config: Any
    data_dir: str
    out_dir: str
    plan: FoldPlan
    config_digest: str
    worker_resources: dict[str, float] | None = None  # each fold's Train worker share (`run_trials` sets it)


def fold_dir(out_dir: str, fold: int) -> str:
    """`OUT/folds/fold_KK`: the fold's run folder (model, predictions, Ray Train checkpoints)."""
    from raypipe import storage

    return storage.join(out_dir, "folds", f"fold_{fold:02d}")


def experiment_path(out_dir: str) -> str:
    """`OUT/ray_results/cv`: the Tune experiment to pass to `Tuner.restore`."""
    from raypipe import storage

    return storage.join(out_dir, "ray_results", EXPERIMENT_NAME)


def _finished(path: str, digest: str) -> dict[str, Any] | None:
    """The fold's `fold.json` when it finished with this config and folds, else None."""
    from raypipe import storage

    marker = storage.join(path, FOLD_FILE)
    if not storage.exists(marker):
        return None
    info = json.loads(storage.read_bytes(marker).decode())
    return info if info.get("digest") == digest else None


def run_fold(config: dict[str, Any], spec: TrialSpec, callbacks: Sequence[Any] = ()) -> dict[str, float]:
    """One fold: fit (unless already finished with the same settings), write fold.json, return its metrics."""
    from raypipe import storage

    fold = int(config["fold"])
    path = fold_dir(spec.out_dir, fold)
    storage.makedirs(path)
    attempts = storage.join(path, ATTEMPTS_FILE)
    previous = storage.read_bytes(attempts).decode() if storage.exists(attempts) else ""
    storage.atomic_write_text(attempts, previous + f"{time.time():.3f}\n")
    done = _finished(path, spec.config_digest)
    if done is not None:
        log.info("fold %d already finished: not trained again", fold)
        return dict(done["metrics"])
    patients = spec.plan.patients(fold)
    cfg = spec.config
    if spec.worker_resources:  # this fold's share of the cluster for its Train workers (not part of the digest)
        cfg = cfg.model_copy(update={"resources_per_worker": {**spec.worker_resources, **cfg.resources_per_worker}})
    task = FoldTask(fold=fold, n_folds=spec.plan.n_folds, config=cfg, data_dir=spec.data_dir,
                    out_dir=path, patients=patients, callbacks=tuple(callbacks))
    started = time.time()
    metrics = {k: float(v) for k, v in dict(spec.fit(task)).items()}
    metrics.update(fold=float(fold), n_train_patients=float(len(patients["train"])),
                   n_val_patients=float(len(patients["val"])), fit_seconds=time.time() - started)
    storage.atomic_write_json(storage.join(path, FOLD_FILE), {"fold": fold, "digest": spec.config_digest,
                                                              "metrics": metrics, "finished": time.time()})
    return metrics


def fold_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune trainable (a function, as Ray Train V2 requires): run one fold and report its metrics.

    The fold's Ray Train run reports every epoch to this trial (Tune's report callback), so the trial
    table shows progress while a fold trains.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    tune.report(run_fold(config, spec, callbacks=(TuneReportCallback(),)))


def fold_trainable(spec: TrialSpec, trial_cpus: float = 0.5) -> Any:
    """`fold_trial` bound to `spec` with its resources: what `Tuner(...)` and `Tuner.restore` take."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(fold_trial, spec=spec), {"CPU": trial_cpus})


def fold_plan(cfg: Any, cv: CVConfig) -> Any:
    """Folds at once (`cv.max_concurrent_trials`) and each fold's worker resources (`raypipe.cluster.trial_resources`)."""
    import ray

    from raypipe.cluster import trial_resources

    return trial_resources(ray.cluster_resources(), int(getattr(cfg, "num_workers", 1) or 1), cv.folds,
                           cv.max_concurrent_trials, use_gpu=bool(getattr(cfg, "use_gpu", False)),
                           gpus_per_worker=float(getattr(cfg, "gpus_per_worker", 1.0)), trial_cpus=cv.trial_cpus)


def build_trial_spec(model: str, config: Any, data_dir: str, out_dir: str, plan: FoldPlan,
                     fold_fit: FoldFit | None = None) -> TrialSpec:
    """The trial spec of a CV run (also what a manual `Tuner.restore` needs); `fold_fit` replaces the task's."""
    from raypipe.config import config_hash
    from raypipe.tasks import get_task

    fit = fold_fit or get_task(model).fold_fit_function()
    digest = config_hash({"config": config.model_dump(mode="json"), "folds": plan.digest(), "data": data_dir})
    return TrialSpec(fit=fit, config=config, data_dir=data_dir, out_dir=out_dir, plan=plan, config_digest=digest)


def run_trials(spec: TrialSpec, cv: CVConfig, tracking: Tracking | None = None) -> Any:
    """Fit one Tune trial per fold, or restore the experiment in OUT (finished folds are not rerun).

    `tracking`: one MLflow run per fold trial with its per-epoch metrics.
    """
    import dataclasses

    from ray import tune

    from raypipe import storage
    from raypipe.tracking import tracking_callbacks

    plan = fold_plan(spec.config, cv)
    log.info("CV: %d fold(s) at once (cv.max_concurrent_trials), Train workers with %s each", plan.max_concurrent,
             plan.worker_resources)
    spec = dataclasses.replace(spec, worker_resources=plan.worker_resources)
    path = experiment_path(spec.out_dir)
    trainable = fold_trainable(spec, cv.trial_cpus)
    if tune.Tuner.can_restore(path):
        log.info("resuming the CV experiment in %s (finished folds are kept)", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"fold": tune.grid_search(list(range(spec.plan.n_folds)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, reuse_actors=False),
            run_config=tune.RunConfig(name=EXPERIMENT_NAME, storage_path=storage.join(spec.out_dir, "ray_results"),
                                      failure_config=tune.FailureConfig(max_failures=cv.max_failures), verbose=1,
                                      callbacks=tracking_callbacks(tracking) or None),
        )
    grid = tuner.fit()
    failed = sorted(int(r.config["fold"]) for r in grid if r.error is not None)
    if failed:
        raise RuntimeError(f"CV fold(s) {failed} failed (see {path}); rerun the same command with the same --out "
                           "to resume: finished folds are not run again")
    return grid


# ---------------------------------------------------------------------------------------------- collect
def collect_predictions(out_dir: str, plan: FoldPlan) -> pd.DataFrame:
    """Out-of-fold rows (fold = k) of every fold plus the external rows averaged over the fold models.

    Probability scores are first recalibrated per fold on the fold's `tune` rows (`recalibrate_fold`), so the
    pooled out-of-fold rows and the averaged external scores put every fold model on one scale.
    """
    from raypipe.predictions import read_predictions

    oof, ext = [], []
    for k in range(plan.n_folds):
        df = read_predictions(fold_dir(out_dir, k)).drop(columns=["source_file"], errors="ignore")
        df.attrs = {}
        df = recalibrate_fold(df, k)
        val = df[df["split"] == DEV_SPLIT].assign(fold=k)
        wrong = set(val["patient_id"].astype(str)) - set(plan.patients(k)["val"])
        if wrong:
            raise RuntimeError(f"fold {k} scored {len(wrong)} patient(s) outside its validation fold")
        tune_rows = df[df["split"] == TUNE_SPLIT]
        val["threshold"] = val["model"].map({m: youden_cutoff(tune_rows[tune_rows["model"] == m])
                                             for m in val["model"].unique()}).astype(float)
        oof.append(val)
        ext.append(df[df["split"] == EXTERNAL_SPLIT])
    dev = pd.concat(oof, ignore_index=True)
    dup = dev.duplicated(["model", "study_id"])
    if dup.any():
        raise RuntimeError(f"{int(dup.sum())} studies scored in more than one validation fold")
    parts = []
    ext_all = pd.concat(ext, ignore_index=True) if ext else pd.DataFrame()
    if len(ext_all):
        mean = ext_all.groupby(["model", "study_id"], sort=False)["score"].agg(["mean", "size"]).reset_index()
        short = mean[mean["size"] != plan.n_folds]
        if len(short):
            log.warning("%d external studies were scored by fewer than %d folds", len(short), plan.n_folds)
        first = ext_all.drop_duplicates(["model", "study_id"]).drop(columns="score")
        merged = first.merge(mean[["model", "study_id", "mean"]], on=["model", "study_id"], validate="one_to_one")
        merged = merged.rename(columns={"mean": "score"}).assign(fold=-1, split=EXTERNAL_SPLIT)
        merged["threshold"] = merged["model"].map({m: youden_cutoff(dev[dev["model"] == m])
                                                   for m in merged["model"].unique()}).astype(float)
        merged["model"] = merged["model"].astype(str) + EXTERNAL_SUFFIX
        parts.append(merged)
    return pd.concat([dev, *parts], ignore_index=True)


def labelled_probabilities(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """(label, score) of one model's rows with a known label; None unless the scores are probabilities and a
    label column (`predictions.label_columns`, first one) is present."""
    from raypipe.predictions import label_columns

    if rows.empty or (rows["score_kind"] != "probability").any():
        return None
    labels = label_columns(list(rows.columns))
    if not labels:
        return None
    known = rows[rows[labels[0]].notna()]
    return known[labels[0]].to_numpy(dtype=int), known["score"].to_numpy(dtype=float)


def fold_recalibration(tune_rows: pd.DataFrame) -> LogisticRecalibration:
    """Platt recalibration of one model's probabilities fitted on a fold's `tune` rows (training patients).

    Identity (`LogisticRecalibration()`) for log-risk scores (a Cox score has no scale to fix: concordance is
    unchanged by a shift) and when the rows lack a label or one of its classes.
    """
    from raypipe import metrics as M

    labelled = labelled_probabilities(tune_rows)
    return M.LogisticRecalibration() if labelled is None else M.fit_logistic_recalibration(*labelled)


def recalibrate_fold(df: pd.DataFrame, fold: int) -> pd.DataFrame:
    """One fold's predictions with each model's probabilities recalibrated on that fold's `tune` rows.

    Fold models trained on different patients stop at different epochs and land on different probability scales
    (on a 900-patient synthetic CT cohort the mean out-of-fold logit ranged from -2.3 to -1.1 over three folds), so
    pooling their raw scores ranks patients across folds by the fold they fell in: the pooled AUROC sat 0.05 below
    the folds' own. The map is monotone (each fold's ranking is kept) and uses training patients only.
    """
    out = df.copy()
    for model in out["model"].unique():
        rows = out["model"] == model
        cal = fold_recalibration(out[rows & (out["split"] == TUNE_SPLIT)])
        if cal.n:
            out.loc[rows, "score"] = cal(out.loc[rows, "score"].to_numpy(dtype=float))
            log.info("fold %d, %s: scores recalibrated on %d tune rows (intercept %.3f, slope %.3f)", fold, model,
                     cal.n, cal.intercept, cal.slope)
    return out


def youden_cutoff(rows: pd.DataFrame) -> float:
    """Youden cut-off of one model's probability scores on `rows` (NaN without both classes or probabilities).

    Called on a fold's `tune` rows (its training patients) for the out-of-fold set, and on the pooled
    out-of-fold rows for the external set: a cut-off never comes from the rows it is applied to.
    """
    from raypipe import metrics as M

    labelled = labelled_probabilities(rows)
    if labelled is None or np.unique(labelled[0]).size != 2:
        return float("nan")
    return float(M.youden_threshold(*labelled))


def summarise(predictions: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    """metrics.json of a CV: every model on its out-of-fold rows and (as NAME@external) on the external set."""
    from raypipe.evaluate import evaluate_frame

    return evaluate_frame(predictions, n_boot=n_boot, seed=seed, extra_tables=False).metrics


TABLE_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "c_index")


def summary_table(metrics: Mapping[str, Any]) -> list[str]:
    """The CV summary as text lines: model, then each headline metric with its 95% CI."""
    present = [m for m in TABLE_METRICS if any(m in e for e in metrics["models"].values())]
    name_w = max([len("model"), *(len(n) for n in metrics["models"])])
    lines = ["  ".join(["model".ljust(name_w), *(m.ljust(21) for m in present)])]
    for name, entries in metrics["models"].items():
        cells = []
        for m in present:
            e = entries.get(m) or {}
            v, lo, hi = e.get("value"), e.get("ci_low"), e.get("ci_high")
            text = "-" if v is None else (f"{v:.3f}" + (f" ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""))
            cells.append(text.ljust(21))
        lines.append("  ".join([name.ljust(name_w), *cells]))
    return lines


def _fold_table(out_dir: str, n_folds: int) -> str:
    """metrics.csv of a CV: one row per fold with what its trial reported."""
    from raypipe import storage

    rows = []
    for k in range(n_folds):
        marker = storage.join(fold_dir(out_dir, k), FOLD_FILE)
        if storage.exists(marker):
            rows.append(json.loads(storage.read_bytes(marker).decode())["metrics"])
    return pd.DataFrame(rows).to_csv(index=False)


def _gradcam(model: str, data_dir: str, out_dir: str, predictions: pd.DataFrame, n: int) -> list[str]:
    """Grad-CAM grids for the `n` top-scored out-of-fold studies (positives first), each by its fold's model."""
    from raypipe import storage
    from raypipe.predictions import label_columns
    from raypipe.tasks import get_task, resolve

    entry = get_task(model)
    if entry.gradcam is None or n <= 0:
        return []
    from raypipe.explain.ct_gallery import default_gradcam_dir

    writer = resolve(entry.gradcam)
    dev = predictions[(predictions["split"] == DEV_SPLIT)]
    if dev.empty:
        return []
    main = dev[dev["model"] == dev["model"].iloc[0]].copy()
    labels = label_columns(list(main.columns))
    main["_pos"] = pd.to_numeric(main[labels[0]], errors="coerce").fillna(0) if labels else 0
    main["_rank"] = main["score"] if (main["score_kind"] == "probability").all() else main["score"].rank()
    pick = main.sort_values(["_pos", "_rank", "study_id"], ascending=[False, False, True]).head(n)
    out = default_gradcam_dir(out_dir)
    if storage.exists(storage.join(out, "index.json")):
        storage.atomic_write_json(storage.join(out, "index.json"), {})
    written: list[str] = []
    for fold, rows in pick.groupby("fold", sort=True):
        facts = {str(r.study_id): {"fold": int(fold), "score": float(r.score),
                                   **({"label": float(getattr(r, labels[0]))} if labels else {})}
                 for r in rows.itertuples()}
        written += writer(fold_dir(out_dir, int(fold)), data_dir, list(facts), out, labels=facts, start=len(written))
    return written


@dataclass
class CVResult:
    """What `run_cv` wrote: the predictions, metrics.json content, fold plan and Grad-CAM PNGs."""

    out_dir: str
    predictions: pd.DataFrame
    metrics: dict[str, Any]
    plan: FoldPlan
    config: Any = None  # the model config the folds trained with
    gradcam: list[str] = field(default_factory=list)


def run_cv(model: str, config: Any, data_dir: str, out_dir: str, cv: CVConfig | None = None,
           fold_fit: FoldFit | None = None, tracking: Tracking | None = None) -> CVResult:
    """k-fold CV of task `model` (`raypipe.tasks`) on the shards in `data_dir`; writes OUT (see module doc).

    `fold_fit` replaces the task's fold-fit function (e.g. a wrapper that records or fails on purpose);
    `tracking` logs every fold trial and the CV's summary to MLflow.
    """
    from raypipe import storage
    from raypipe.config import config_hash, dump_config
    from raypipe.predictions import write_predictions
    from raypipe.ray_utils import describe_devices, init_ray, require_gpus
    from raypipe.tasks import get_task, resolve
    from raypipe.tracking import log_run_outputs

    cv = cv or CVConfig()
    entry = get_task(model)
    out = str(out_dir) if storage.is_uri(out_dir) else os.path.abspath(out_dir)
    data = str(data_dir) if storage.is_uri(data_dir) else os.path.abspath(data_dir)
    meta = resolve(entry.study_meta)(data)  # fails with "no preprocessed shards" before anything starts
    storage.makedirs(out)
    workers, use_gpu = int(getattr(config, "num_workers", 1)), bool(getattr(config, "use_gpu", False))
    gpus = float(getattr(config, "gpus_per_worker", 1.0))
    log.info("%s, %d fold(s) at once", describe_devices(workers, use_gpu, gpus, what="CV folds train"),
             min(cv.max_concurrent_trials, cv.folds))
    init_ray()
    require_gpus(workers * gpus if use_gpu else 0, f"raypipe cv {model}")
    seed = cv.seed if cv.seed is not None else int(getattr(config, "seed", 0))
    label = cv.label or getattr(config, "label", None) or entry.stratify or "event"
    plan = assign_folds(meta, cv.folds, seed, label, cv.development_site, cv.external)
    plan_file = storage.join(out, "folds.csv")
    if storage.exists(plan_file):
        old = pd.read_csv(io_bytes(storage.read_bytes(plan_file)), dtype={"patient_id": str})
        if not old.equals(plan.frame()):
            raise ValueError(f"{out} holds a CV with other folds (data, seed or k changed): use a new --out")
    spec = build_trial_spec(model, config, data, out, plan, fold_fit)
    state_file = storage.join(out, "cv.json")
    if storage.exists(state_file):
        before = json.loads(storage.read_bytes(state_file).decode()).get("digest")
        if before != spec.config_digest:
            raise ValueError(f"{out} holds a CV of another model config: use a new --out")
    storage.atomic_write_text(plan_file, plan.frame().to_csv(index=False))
    dump_config(config, storage.join(out, "config.yaml"))
    storage.atomic_write_json(state_file, {"model": model, **cv.model_dump(mode="json"), "seed": seed,
                                           "label": label, "data": data, "digest": spec.config_digest})
    log.info("CV %s: %d folds over %d development patients, %d external", model, cv.folds, len(plan.fold_of),
             len(plan.external))

    run_trials(spec, cv, tracking)

    predictions = collect_predictions(out, plan)
    n_boot = cv.n_boot if cv.n_boot is not None else int(getattr(config, "n_boot", 1000))
    metrics = summarise(predictions, n_boot=n_boot, seed=seed)
    meta_out: dict[str, Any] = {"model": config.name, "config_hash": config_hash(config), "cv_folds": cv.folds,
                                "cv_seed": seed, "threshold_source": "per-fold Youden cut-off on the fold's "
                                "inner validation (training) patients; external: Youden on the out-of-fold rows",
                                "score_recalibration": "per-fold Platt scaling of probabilities on the fold's inner "
                                "validation (training) patients"}
    write_predictions(predictions, storage.join(out, "predictions.parquet"), meta_out)
    storage.atomic_write_json(storage.join(out, "metrics.json"), metrics)
    storage.atomic_write_text(storage.join(out, "metrics.csv"), _fold_table(out, cv.folds))
    gradcam = []
    try:
        gradcam = _gradcam(model, data, out, predictions, cv.gradcam_studies)
    except Exception as exc:  # a figure must not fail a finished CV
        log.warning("Grad-CAM gallery skipped: %s", exc)
    for line in summary_table(metrics):
        log.info("%s", line)
    log_run_outputs(tracking, out, n_boot=min(n_boot, 200), seed=seed,
                    artifacts=[storage.join(out, "metrics.csv"), storage.join(out, "folds.csv"),
                               storage.join(out, "config.yaml")])
    return CVResult(out_dir=out, predictions=predictions, metrics=metrics, plan=plan, config=config, gradcam=gradcam)


def io_bytes(data: bytes) -> Any:
    """A binary buffer for pandas readers."""
    import io

    return io.BytesIO(data)


# ---------------------------------------------------------------------------------------------- CLI
def load_cv_configs(model: str, config_path: str | None, folds: int | None = None,
                    overrides: Mapping[str, Any] | None = None) -> tuple[Any, CVConfig]:
    """Model config and CVConfig from one YAML: its `cv:` section is the CV settings, the rest the model's.

    `overrides` are dotted keys (`lr`, `cv.folds`) applied before validation (`raypipe cv --set`).
    """
    from raypipe.config import parse_config, read_yaml, set_dotted

    from raypipe.tasks import get_task

    entry = get_task(model)
    if not entry.cv:
        raise KeyError(f"task {model!r} has no cross-validation")
    data = read_yaml(config_path) if config_path else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    cv_data = dict(data.pop("cv", None) or {})
    if folds is not None:
        cv_data["folds"] = folds
    source = str(config_path) if config_path else "<defaults>"
    return parse_config(entry.config_class(), data, source), parse_config(CVConfig, cv_data, f"{source} (cv)")


def cv_cli(model: str, config: str | None, folds: int | None, data: str, out: str | None,
           overrides: Mapping[str, Any] | None = None, mlflow: bool = False) -> CVResult:
    """`raypipe cv MODEL --config C --folds K --data DIR --out DIR [--mlflow]`: run the CV, print its summary table."""
    from raypipe import storage
    from raypipe.tracking import resolve_tracking, run_name_for

    model_cfg, cv = load_cv_configs(model, config, folds, overrides)
    out = out or os.path.join("runs", f"cv_{model.replace('-', '_')}")
    tracking = resolve_tracking(out, run_name_for("cv", model_cfg.name, out),
                                {**model_cfg.model_dump(mode="json"), "cv": cv.model_dump(mode="json")}, enabled=mlflow)
    result = run_cv(model, model_cfg, data, out, cv, tracking=tracking)
    print("\n".join(summary_table(result.metrics)))  # the command's output, not a log line
    print(f"predictions: {storage.join(result.out_dir, 'predictions.parquet')}")
    return result
