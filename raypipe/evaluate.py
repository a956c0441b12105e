"""`raypipe evaluate`: prediction files in, metrics.json (DESIGN.md schema) and a self-contained report.html out.

Every held-out set is evaluated side by side (`evaluation_splits`): the development set's out-of-fold rows
of a cross-validation (split ``val`` with a fold number), and each test/external split. The first set keeps
the model names; the others are named ``NAME@split`` (CV already names its external models so).
Per model and set: binary metrics when a label column exists (AUROC with CI; accuracy, sensitivity,
specificity, PPV, NPV at a cut-off from the development/training side: the rows' own `threshold` column
(CV: each fold's cut-off chosen on its training patients), else the Youden index of the validation split,
else a given threshold or 0.5),
survival metrics when ``time_days``/``event`` exist (Harrell and Uno C, td-AUROC, IBS from a Breslow
baseline), and hazard ratios, Kaplan-Meier curves and a log-rank test by risk ``group``. Every model
is compared with the reference model on their common studies: DeLong for AUROC, a paired
patient-level bootstrap for the C-index and the threshold metrics.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from sklearn.metrics import roc_curve

from raypipe import metrics as M
from raypipe import storage
from raypipe.predictions import PathLike, label_columns, read_predictions
from raypipe.report.plots import Curve
from raypipe.report.tables import CharacteristicsTable, characteristics_table

logger = logging.getLogger(__name__)

TRAIN_SPLITS = ("train", "training")
VALIDATION_SPLITS = ("val", "valid", "validation", "tune")
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
CALIBRATION_DAYS = 1825
MAX_GRADCAM = 12


@dataclass(frozen=True)
class HazardRow:
    """Hazard ratio of one risk group against the reference group (Cox model on group indicators)."""

    group: str
    n: int
    events: int
    hr: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    reference: bool = False


@dataclass
class ModelResult:
    """Everything the report shows for one model, besides its metrics.json entries."""

    name: str
    score_kind: str
    n_studies: int
    n_patients: int
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    split: str = ""
    label_column: str | None = None
    n_positive: int | None = None
    n_events: int | None = None
    threshold: float | None = None
    threshold_source: str | None = None
    row_thresholds: bool = False  # the rows carried their own cut-offs (`threshold` column)
    roc: Curve | None = None
    td_curve: Curve | None = None
    km: list[Curve] = field(default_factory=list)
    logrank_p: float | None = None
    hazard_ratios: list[HazardRow] = field(default_factory=list)
    calibration: Curve | None = None
    km_fits: list[tuple[str, Any]] = field(default_factory=list)  # (risk group, metrics.KaplanMeier)
    calibration_at: list[Any] = field(default_factory=list)  # metrics.CalibrationGroups, one per horizon
    decision: Any = None  # metrics.DecisionCurve at the decision horizon
    gradcam: list[tuple[str, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """The result of evaluating prediction files: metrics.json content plus what the report draws."""

    metrics: dict[str, Any]
    models: list[ModelResult]
    reference: str
    split: str
    sources: dict[str, dict[str, Any]]
    characteristics: list[CharacteristicsTable]
    times_days: tuple[int, ...]
    n_boot: int
    notes: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)  # every evaluated set, the first one is `split`
    ct_tables: list[Any] = field(default_factory=list)  # papers/000 Tables 3-4 (raypipe.report.ct_tables)
    xray_tables: list[Any] = field(default_factory=list)  # papers/001 Table 2 + C-index (raypipe.report.xray_tables)


# ---------------------------------------------------------------------------------------------- public API
def evaluate(
    prediction_paths: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    reference_model: str | None = None,
    times_days: Sequence[int] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    horizons_years: Sequence[float] | None = None,
    qc_dirs: Sequence[PathLike] = (),
) -> dict[str, Any]:
    """Evaluate prediction files; write metrics.json, report.html and the report's PNGs to `out_dir`; return the metrics.

    Time points: `horizons_years` (or `times_days`); default 1, 2, 3, 5 years, and 1, 5, 10 years for
    Diff-X predictions (rows with a risk `group`). The report also shows the preprocessing QC of `qc_dirs`
    and of the data folders the prediction files name.
    """
    from raypipe.report import build_report

    df = read_predictions(prediction_paths)
    if times_days is None:
        times_days = default_times_days(df, horizons_years)
    result = evaluate_frame(df, reference_model=reference_model, times_days=times_days, n_boot=n_boot, seed=seed)
    out = os.fspath(out_dir)
    storage.makedirs(out)
    storage.atomic_write_json(storage.join(out, "metrics.json"), result.metrics)
    build_report(result, out, qc_dirs=[os.fspath(d) for d in qc_dirs])
    logger.info("evaluated %d model(s) on %s; wrote %s", len(result.models), ", ".join(result.splits), out)
    return result.metrics


DAYS_PER_YEAR = 365.25
CT_HORIZONS_YEARS = (1.0, 2.0, 3.0, 5.0)
DIFFX_HORIZONS_YEARS = (1.0, 5.0, 10.0)


def default_times_days(df: pd.DataFrame, horizons_years: Sequence[float] | None = None) -> tuple[int, ...]:
    """td-AUROC / calibration times in days: the given years, else 1/5/10 years for Diff-X, else 1/2/3/5."""
    if horizons_years is None:
        diffx = "group" in df.columns and df["group"].notna().any()
        horizons_years = DIFFX_HORIZONS_YEARS if diffx else CT_HORIZONS_YEARS
    bad = [h for h in horizons_years if not (h > 0)]
    if bad:
        raise ValueError(f"horizons must be positive years, got {bad}")
    return tuple(int(round(h * DAYS_PER_YEAR)) for h in horizons_years)


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """One line per model with its headline metrics (95% CI) and p-values against the reference."""
    pvals: dict[tuple[str, str], float] = {}
    reference = None
    for c in metrics.get("comparisons", []):
        reference = c["a"]
        pvals[(c["b"], c["metric"])] = c["p_value"]
    lines = []
    for name, entries in metrics.get("models", {}).items():
        parts = []
        for key in ("auroc", "accuracy", "c_index", "c_index_uno", "td_auroc_mean", "ibs"):
            e = entries.get(key)
            if not e or e.get("value") is None:
                continue
            text = f"{key} {e['value']:.3f}"
            if e.get("ci_low") is not None and e.get("ci_high") is not None:
                text += f" ({e['ci_low']:.3f}-{e['ci_high']:.3f})"
            p = pvals.get((name, key))
            if p is not None:
                text += f" p={p:.3g}"
            parts.append(text)
        tag = " [reference]" if name == reference or (reference is None and not lines) else ""
        lines.append(f"{name}{tag}: " + (", ".join(parts) if parts else "no metrics"))
    return lines


def evaluate_frame(
    df: pd.DataFrame,
    reference_model: str | None = None,
    times_days: Sequence[int] = (365, 730, 1095, 1825),
    n_boot: int = 1000,
    seed: int = 0,
    *,
    extra_tables: bool = True,
) -> Evaluation:
    """Compute all metrics and report content from validated predictions (see `read_predictions`).

    `extra_tables` adds papers/000's CT tables (development vs external, image vs clinical models) when
    the predictions hold those model names (`raypipe.report.ct_tables`).
    """
    models = list(dict.fromkeys(df["model"].tolist()))
    if not models:
        raise ValueError("no predictions to evaluate")
    splits, notes = evaluation_splits(df)
    in_primary = list(dict.fromkeys(df.loc[df["split"] == splits[0], "model"].tolist()))
    reference = reference_model if reference_model is not None else (in_primary or models)[0]
    if reference not in models:
        raise ValueError(f"reference model {reference!r} is not in the predictions (models: {', '.join(models)})")
    split = splits[0]
    times = tuple(int(t) for t in times_days)

    results: list[ModelResult] = []
    comparisons: list[dict[str, Any]] = []
    characteristics: list[CharacteristicsTable] = []
    for i, part in enumerate(splits):
        set_results: list[ModelResult] = []
        for name in models:
            rows = df[df["model"] == name]
            held_out = rows[rows["split"] == part]
            if held_out.empty:
                if i == 0:
                    notes.append(f"model {name!r} has no rows in split {part!r}: not evaluated there")
                continue
            res = _evaluate_model(name, rows, held_out, part, times, n_boot, seed, df.attrs.get("sources", {}))
            res.name = set_model_name(name, part, first=i == 0)
            res.split = part
            set_results.append(res)
        if not set_results:
            continue
        names = [r.name for r in set_results]
        set_ref = set_model_name(reference, part, first=i == 0)
        if set_ref not in names:
            if i == 0:
                raise ValueError(f"reference model {reference!r} has no rows in the evaluated split {part!r}")
            set_ref = names[0]
        set_results.sort(key=lambda r: r.name != set_ref)
        renamed = df[df["split"] == part].assign(
            model=lambda d, part=part, first=(i == 0): d["model"].map(lambda m: set_model_name(m, part, first)))
        comparisons += _comparisons(renamed, set_results, set_ref, n_boot, seed)
        if i == 0:
            characteristics = _characteristics(renamed, set_results, set_ref)
        results += set_results
    reference = results[0].name
    metrics_json = {"models": {r.name: r.metrics for r in results}, "comparisons": comparisons}
    notes.append(f"95% CIs: percentile bootstrap over patients (all studies of a drawn patient together), "
                 f"stratified on the label/event, {n_boot} resamples; out-of-fold predictions are pooled over "
                 "the folds before resampling.")
    tables: list[Any] = []
    if extra_tables:
        try:
            tables = paper_ct_tables(df, n_boot=n_boot, seed=seed)
        except (ValueError, ArithmeticError) as exc:  # the extra tables must not break the report
            logger.warning("CT comparison tables skipped: %s", exc)
            notes.append(f"CT comparison tables skipped: {exc}")
    xray: list[Any] = []
    if extra_tables:
        from raypipe.report.diffx_tables import layout_diffx_tables
        from raypipe.report.xray_tables import layout_xray_tables

        try:
            c_rows, women = xray_c_index_rows(df, split, n_boot=n_boot, seed=seed)
            xray = layout_xray_tables(results, c_rows, split, n_boot, women)
            xray += layout_diffx_tables(diffx_numbers(df))  # the thesis's Diff-X tables
        except (ValueError, ArithmeticError) as exc:  # the extra tables must not break the report
            logger.warning("X-ray comparison tables skipped: %s", exc)
            notes.append(f"X-ray comparison tables skipped: {exc}")
    return Evaluation(
        metrics=_sanitize(metrics_json), models=results, reference=reference, split=split, splits=list(splits),
        sources=dict(df.attrs.get("sources", {})), characteristics=characteristics, times_days=times,
        n_boot=n_boot, notes=notes, ct_tables=tables, xray_tables=xray,
    )


# ---------------------------------------------------------------------------------------------- per model
def evaluation_splits(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The held-out sets to evaluate, primary first: out-of-fold development rows, then test/external splits.

    Validation rows count as a held-out set only when they are out of fold (a fold number >= 0) or when
    nothing else is held out; training rows only as a last resort (with a note: optimistic).
    """
    splits = list(dict.fromkeys(df["split"].tolist()))
    held_out = sorted((s for s in splits if s not in TRAIN_SPLITS and s not in VALIDATION_SPLITS),
                      key=lambda s: (s != "test", splits.index(s)))
    val = [s for s in splits if s in VALIDATION_SPLITS and s != "tune"]
    oof = [s for s in val if (pd.to_numeric(df.loc[df["split"] == s, "fold"], errors="coerce") >= 0).any()]
    chosen = [*oof[:1], *held_out]
    if chosen:
        return chosen, []
    if val:
        return val[:1], []
    return splits[:1], [f"no held-out split: metrics are on the {splits[0]!r} rows and are optimistic"]


def set_model_name(model: str, split: str, first: bool) -> str:
    """A model's name in one evaluated set: as is in the first set (or when it names its set), else NAME@split."""
    model = str(model)
    if first or model.endswith(f"@{split}"):
        return model
    return f"{model}@{split}"


def _evaluate_model(name: str, rows: pd.DataFrame, held_out: pd.DataFrame, split: str, times: tuple[int, ...],
                    n_boot: int, seed: int, sources: Mapping[str, Mapping[str, Any]]) -> ModelResult:
    """Binary, survival and risk-group results of one model on its held-out rows."""
    kind = str(held_out["score_kind"].iloc[0])
    res = ModelResult(name=name, score_kind=kind, n_studies=len(held_out),
                      n_patients=int(held_out["patient_id"].nunique()))
    train = rows[rows["split"].isin(TRAIN_SPLITS)]
    val = rows[rows["split"].isin(VALIDATION_SPLITS) & (rows["split"] != split)]
    _binary_part(res, held_out, val, n_boot, seed, _given_threshold(held_out, sources))
    if "time_days" in held_out.columns and "event" in held_out.columns:
        _survival_part(res, held_out, train, times, n_boot, seed)
    res.gradcam = _gradcam_images(held_out)
    return res


def _label_of(df: pd.DataFrame) -> str | None:
    """First label column with both classes among the rows."""
    for col in label_columns(list(df.columns)):
        y = df[col].dropna()
        if y.nunique() == 2:
            return col
    return None


def _binary_part(res: ModelResult, held_out: pd.DataFrame, val: pd.DataFrame, n_boot: int, seed: int,
                 given: float | None) -> None:
    """AUROC with CI, ROC curve and threshold metrics with CIs."""
    col = _label_of(held_out)
    if col is None:
        return
    rows = held_out[held_out[col].notna()]
    if len(rows) < len(held_out):
        res.notes.append(f"{len(held_out) - len(rows)} studies without {col!r} left out of the binary metrics")
    y = rows[col].to_numpy(dtype=int)
    s = rows["score"].to_numpy(dtype=float)
    groups = rows["patient_id"].to_numpy(dtype=str)
    res.label_column, res.n_positive = col, int(y.sum())
    res.metrics["auroc"] = M.auroc_ci(y, s, n_boot=n_boot, seed=seed, groups=groups).to_dict()
    fpr, tpr, _ = roc_curve(y, s)
    res.roc = Curve(res.name, fpr, tpr, res.metrics["auroc"]["value"])

    row_thr = pd.to_numeric(rows["threshold"], errors="coerce").to_numpy(float) if "threshold" in rows.columns else None
    val_rows = val[val[col].notna()] if col in val.columns else val.iloc[0:0]
    if row_thr is not None and np.isfinite(row_thr).all():
        # cut-offs chosen on the development/training side (CV: each fold's own training patients); the
        # metrics compare score - cut-off with 0, row by row
        res.threshold = float(np.median(row_thr)) if len(np.unique(row_thr)) > 1 else float(row_thr[0])
        res.threshold_source = ("per-fold Youden cut-off chosen on each fold's training patients"
                                if len(np.unique(row_thr)) > 1 else "cut-off chosen on the development set")
        res.row_thresholds = True
        ci = M.binary_metrics_ci(y, s - row_thr, 0.0, n_boot=n_boot, seed=seed, groups=groups)
        for key in THRESHOLD_METRICS:
            res.metrics[key] = getattr(ci, key).to_dict()
        return
    if len(val_rows) and val_rows[col].nunique() == 2:
        thr = M.youden_threshold(val_rows[col].to_numpy(dtype=int), val_rows["score"].to_numpy(dtype=float))
        source = "Youden index on the validation split"
    elif given is not None:
        thr, source = given, "given in the run metadata"
    elif res.score_kind == "probability":
        thr, source = 0.5, "0.5 (no validation split)"
    else:
        thr = M.youden_threshold(y, s)
        source = "Youden index on the evaluated rows (no validation split: optimistic)"
        res.notes.append("threshold chosen on the evaluated rows themselves: threshold metrics are optimistic")
    res.threshold, res.threshold_source = float(thr), source
    ci = M.binary_metrics_ci(y, s, thr, n_boot=n_boot, seed=seed, groups=groups)
    for key in THRESHOLD_METRICS:
        res.metrics[key] = getattr(ci, key).to_dict()


def _given_threshold(rows: pd.DataFrame, sources: Mapping[str, Mapping[str, Any]]) -> float | None:
    """A `threshold` from the run metadata of the rows' prediction file, when one was recorded."""
    for path in rows.get("source_file", pd.Series(dtype=object)).unique():
        value = (sources.get(path) or {}).get("threshold")
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _survival_part(res: ModelResult, held_out: pd.DataFrame, train: pd.DataFrame, times: tuple[int, ...],
                   n_boot: int, seed: int) -> None:
    """C-indices, td-AUROC, IBS (with bootstrap CIs), calibration and risk groups on the held-out rows."""
    t = held_out["time_days"].to_numpy(dtype=float)
    e = held_out["event"].to_numpy(dtype=int)
    s = held_out["score"].to_numpy(dtype=float)
    groups = held_out["patient_id"].to_numpy(dtype=str)
    res.n_events = int(e.sum())
    if res.n_events == 0:
        res.notes.append("no events among the evaluated rows: survival metrics skipped")
        return
    if len(train) and train["event"].sum() > 0:
        t_tr, e_tr, s_tr = (train["time_days"].to_numpy(dtype=float), train["event"].to_numpy(dtype=int),
                            train["score"].to_numpy(dtype=float))
        fit_on = "training rows"
    else:
        t_tr, e_tr, s_tr = t, e, s
        fit_on = "evaluated rows"
        res.notes.append("no training rows: censoring distribution (Uno C, td-AUROC, IBS) and Breslow baseline "
                         "estimated on the evaluated rows themselves")

    usable = [x for x in times if _evaluable_time(x, t, e, t_tr)]
    dropped = [x for x in times if x not in usable]
    if dropped:
        res.notes.append(f"td-AUROC/IBS at {dropped} days skipped: outside the follow-up of the data")
    baseline = M.breslow_baseline(t_tr, e_tr, s_tr) if res.score_kind == "log_risk" else None
    surv = None
    if baseline is None:
        res.notes.append("IBS needs survival curves: not computed for probability scores")
    elif len(usable) >= 2:
        surv = baseline.survival(s, usable)
        res.notes.append(f"IBS over {usable[0]}-{usable[-1]} days from a Breslow baseline fitted on the {fit_on}")
    try:
        summary = M.survival_summary(t, e, s, time_train=t_tr, event_train=e_tr, times=usable or None, surv=surv,
                                     n_boot=n_boot, seed=seed, groups=groups)
    except ValueError as exc:  # e.g. evaluated follow-up beyond the training rows' censoring distribution
        logger.warning("%s: IPCW survival metrics failed (%s); Harrell's C only", res.name, exc)
        res.notes.append(f"Uno C, td-AUROC and IBS not computed: {exc}")
        summary = {"c_index": M.concordance_ci(t, e, s, n_boot=n_boot, seed=seed, groups=groups)}
    res.metrics.update(M.metric_summary(summary))

    grid = _time_grid(t, e, t_tr)
    if len(grid) >= 2:
        try:
            td_grid = M.td_auroc(t_tr, e_tr, t, e, s, grid)
            res.td_curve = Curve(res.name, np.asarray(grid, float), np.asarray(td_grid.values, float),
                                 float(td_grid.mean))
        except ValueError as exc:
            logger.warning("%s: td-AUROC curve skipped: %s", res.name, exc)
    res.calibration = _calibration(res, held_out, baseline)
    _clinical_curves(res, held_out, baseline, usable)
    try:
        _risk_groups(res, held_out)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:  # e.g. a group without events
        logger.warning("%s: risk-group analysis failed: %s", res.name, exc)
        res.notes.append(f"risk-group analysis failed: {exc}")
        res.km, res.km_fits, res.hazard_ratios, res.logrank_p = [], [], [], None
        for key in [k for k in res.metrics if k.startswith("hr@")]:
            del res.metrics[key]


def _evaluable_time(x: float, t: np.ndarray, e: np.ndarray, t_train: np.ndarray) -> bool:
    """A time point with an event before it and follow-up beyond it, in both the test and the training rows."""
    return bool(np.any((t <= x) & (e == 1)) and np.any(t > x) and x < t_train.max())


def _time_grid(t: np.ndarray, e: np.ndarray, t_train: np.ndarray, n: int = 12) -> list[float]:
    """Time points for the td-AUROC curve: from the 10th percentile of event times to the 90th of follow-up."""
    ev = t[e == 1]
    if ev.size < 2:
        return []
    lo, hi = float(np.quantile(ev, 0.1)), float(min(np.quantile(t, 0.9), t_train.max() - 1))
    if hi <= lo:
        return []
    return [float(x) for x in np.linspace(lo, hi, n) if _evaluable_time(x, t, e, t_train)]


def _calibration(res: ModelResult, rows: pd.DataFrame, baseline: Any) -> Curve | None:
    """Predicted against observed 5-year risk by deciles of predicted risk (KM for observed risk)."""
    s = rows["score"].to_numpy(dtype=float)
    if res.score_kind == "probability":
        predicted = s
    elif baseline is not None:
        predicted = baseline.risk(s, float(CALIBRATION_DAYS))
    else:
        return None
    t = rows["time_days"].to_numpy(dtype=float)
    e = rows["event"].to_numpy(dtype=int)
    if len(rows) < 20 or t.max() < CALIBRATION_DAYS * 0.5:
        return None
    bins = pd.qcut(pd.Series(predicted), 10, labels=False, duplicates="drop").to_numpy()
    xs, ys = [], []
    for b in np.unique(bins):
        sel = bins == b
        if sel.sum() < 5 or e[sel].sum() == 0:
            xs.append(float(predicted[sel].mean()))
            ys.append(0.0 if e[sel].sum() == 0 else math.nan)
            continue
        xs.append(float(predicted[sel].mean()))
        ys.append(1.0 - float(M.kaplan_meier(t[sel], e[sel]).at([float(CALIBRATION_DAYS)])[0]))
    return Curve(res.name, np.asarray(xs), np.asarray(ys))


def _clinical_curves(res: ModelResult, rows: pd.DataFrame, baseline: Any, horizons: Sequence[int]) -> None:
    """Calibration by quantile groups at each horizon and the decision curve at the 5-year horizon (metrics/)."""
    t = rows["time_days"].to_numpy(dtype=float)
    e = rows["event"].to_numpy(dtype=int)
    s = rows["score"].to_numpy(dtype=float)
    n_groups = 10 if len(rows) >= 200 else 5 if len(rows) >= 50 else 0
    if res.score_kind == "probability":
        risk_at = {CALIBRATION_DAYS: s} if t.max() >= CALIBRATION_DAYS and s.min() >= 0 and s.max() <= 1 else {}
    elif baseline is not None:
        risk_at = {int(h): baseline.risk(s, float(h)) for h in sorted({*horizons, CALIBRATION_DAYS}) if t.max() >= h}
    else:
        risk_at = {}
    try:
        if n_groups:
            res.calibration_at = [M.survival_calibration(t, e, r, float(h), n_groups) for h, r in risk_at.items()]
        if risk_at:
            h = CALIBRATION_DAYS if CALIBRATION_DAYS in risk_at else max(risk_at)
            res.decision = M.net_benefit_survival(t, e, risk_at[h], float(h))
    except ValueError as exc:
        logger.warning("%s: calibration/decision curves skipped: %s", res.name, exc)
        res.notes.append(f"calibration/decision curves skipped: {exc}")


def _risk_groups(res: ModelResult, rows: pd.DataFrame) -> None:
    """Hazard ratios against the reference group (LL, else the lowest mean score), KM curves and the log-rank p."""
    if "group" not in rows.columns:
        return
    sub = rows[rows["group"].notna()]
    names = [str(n) for n in sub.groupby("group", observed=True)["score"].mean().sort_values(kind="mergesort").index]
    if len(names) < 2:
        return
    if len(sub) < len(rows):
        res.notes.append(f"{len(rows) - len(sub)} studies without a risk group left out of the group analysis")
    t = sub["time_days"].to_numpy(dtype=float)
    e = sub["event"].to_numpy(dtype=int)
    g = sub["group"].astype(str).to_numpy()
    for name in names:
        km = M.kaplan_meier(t[g == name], e[g == name])
        res.km.append(Curve(name, km.time, km.survival, float((g == name).sum())))
        res.km_fits.append((name, km))
    res.logrank_p = float(M.logrank_test(t, e, g).p_value)
    ref = "LL" if "LL" in names else names[0]
    hrs = M.group_hazard_ratios(g, t, e, reference=ref)
    for name in names:
        n, events = int((g == name).sum()), int(e[g == name].sum())
        if name == ref:
            row = HazardRow(name, n, events, 1.0, 1.0, 1.0, None, reference=True)
        else:
            hr = hrs[name]
            row = HazardRow(name, n, events, _num(hr.value), _num(hr.ci_low), _num(hr.ci_high), _num(hr.p_value))
        res.hazard_ratios.append(row)
        res.metrics[f"hr@{name}"] = {"value": row.hr, "ci_low": row.ci_low, "ci_high": row.ci_high}


def _gradcam_images(rows: pd.DataFrame) -> list[tuple[str, bytes]]:
    """Up to MAX_GRADCAM PNGs from `gradcam/` folders next to the model's prediction files."""
    images: list[tuple[str, bytes]] = []
    if "source_file" not in rows.columns:
        return images
    for path in dict.fromkeys(rows["source_file"].tolist()):
        folder = storage.join(os.path.dirname(str(path)) if not storage.is_uri(path) else str(path).rsplit("/", 1)[0],
                              "gradcam")
        fs, inner = storage.filesystem(folder)
        if fs.get_file_info(inner).type != pafs.FileType.Directory:
            continue
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        pngs = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(".png"))
        for p in pngs[: MAX_GRADCAM - len(images)]:
            with fs.open_input_stream(p) as f:
                images.append((p.rsplit("/", 1)[-1], f.read()))
    return images


# ---------------------------------------------------------------------------------------------- comparisons
def _comparisons(rows: pd.DataFrame, results: list[ModelResult], reference: str, n_boot: int, seed: int
                 ) -> list[dict[str, Any]]:
    """p-values of every model against the reference on their common studies."""
    ref = next(r for r in results if r.name == reference)
    key = ["patient_id", "study_id"]
    ref_rows = rows[rows["model"] == reference]
    out: list[dict[str, Any]] = []
    for res in results:
        if res.name == reference:
            continue
        cols = [*key, "score", *(["threshold"] if "threshold" in rows.columns else [])]
        other = rows[rows["model"] == res.name][cols]
        both = ref_rows.merge(other, on=key, suffixes=("", "_b"))
        if len(both) < 10:
            logger.warning("models %r and %r share %d studies: not compared", reference, res.name, len(both))
            res.notes.append(f"only {len(both)} studies in common with the reference: no p-values")
            continue
        if len(both) < min(len(ref_rows), res.n_studies):
            res.notes.append(f"compared with the reference on the {len(both)} studies both scored")
        a, b = both["score"].to_numpy(float), both["score_b"].to_numpy(float)
        groups = both["patient_id"].to_numpy(dtype=str)
        col = ref.label_column if ref.label_column and res.label_column == ref.label_column else None
        if col is not None:
            lab = both[both[col].notna()]
            sel = both[col].notna().to_numpy()
            y = lab[col].to_numpy(dtype=int)
            if len(np.unique(y)) == 2:
                p = M.delong_test(y, a[sel], b[sel]).p_value
                out.append(_comparison(reference, res.name, "auroc", p))
                if ref.row_thresholds and res.row_thresholds:  # per-row cut-offs: compare score - cut-off with 0
                    ta, tb = both["threshold"].to_numpy(float), both["threshold_b"].to_numpy(float)
                    pvals = _paired_threshold_p(y, a[sel] - ta[sel], b[sel] - tb[sel], 0.0, 0.0, groups[sel],
                                                n_boot, seed)
                    out.extend(_comparison(reference, res.name, k, pvals[k]) for k in THRESHOLD_METRICS)
                elif ref.threshold is not None and res.threshold is not None:
                    pvals = _paired_threshold_p(y, a[sel], b[sel], ref.threshold, res.threshold, groups[sel],
                                                n_boot, seed)
                    out.extend(_comparison(reference, res.name, k, pvals[k]) for k in THRESHOLD_METRICS)
        if "c_index" in ref.metrics and "c_index" in res.metrics:
            t = both["time_days"].to_numpy(float)
            e = both["event"].to_numpy(int)
            if e.sum() > 0:
                p = M.paired_bootstrap_p(lambda i: M.c_index(t[i], e[i], a[i]).value - M.c_index(t[i], e[i], b[i]).value,
                                        e, groups, n_boot, seed)
                out.append(_comparison(reference, res.name, "c_index", p))
    return out


def _comparison(a: str, b: str, metric: str, p: float | None) -> dict[str, Any]:
    """One metrics.json comparison entry."""
    return {"a": a, "b": b, "metric": metric, "p_value": _num(p)}


def _paired_threshold_p(y: np.ndarray, a: np.ndarray, b: np.ndarray, thr_a: float, thr_b: float, groups: np.ndarray,
                        n_boot: int, seed: int) -> dict[str, float | None]:
    """Paired bootstrap p-values for accuracy/sensitivity/specificity/PPV/NPV at each model's own threshold."""
    def diffs(idx: np.ndarray) -> np.ndarray:
        ma, mb = M.binary_metrics(y[idx], a[idx], thr_a), M.binary_metrics(y[idx], b[idx], thr_b)
        return np.array([getattr(ma, k) - getattr(mb, k) for k in THRESHOLD_METRICS])

    index = np.arange(len(y))
    observed = diffs(index)
    mat = M.bootstrap_replicates(diffs, (index,), y, n_boot, seed, groups)
    return {k: M.normal_p_value(float(observed[i]), mat[:, i]) for i, k in enumerate(THRESHOLD_METRICS)}


# ---------------------------------------------------------------------------------------------- characteristics
def _characteristics(rows: pd.DataFrame, results: list[ModelResult], reference: str) -> list[CharacteristicsTable]:
    """Clinical characteristics of the evaluated studies by outcome and, when present, by risk group."""
    tables: list[CharacteristicsTable] = []
    base = rows[rows["model"] == reference].drop_duplicates(["patient_id", "study_id"])
    ref = next(r for r in results if r.name == reference)
    if ref.label_column:
        d = base.assign(_outcome=base[ref.label_column].map({0.0: "No fracture", 1.0: "Fracture"}))
        tables.append(characteristics_table(d, "_outcome", f"Clinical characteristics by outcome ({ref.label_column})",
                                            order=["No fracture", "Fracture"], outcome_rows=False))
    elif "event" in base.columns:
        d = base.assign(_outcome=base["event"].map({0: "No incident fracture", 1: "Incident fracture"}))
        tables.append(characteristics_table(d, "_outcome", "Clinical characteristics by incident fracture",
                                            order=["No incident fracture", "Incident fracture"], outcome_rows=False))
    for res in results:
        if res.km:
            sub = rows[rows["model"] == res.name].drop_duplicates(["patient_id", "study_id"])
            order = [c.label for c in res.km]
            tables.append(characteristics_table(sub, "group", f"Clinical characteristics by risk group ({res.name})",
                                                order=order))
            break
    return [t for t in tables if t.rows]


# ---------------------------------------------------------------------------------------------- small helpers
def _num(x: Any) -> float | None:
    """Finite float or None."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _sanitize(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


# ---------------------------------------------------------------------------------------------- paper tables
def evaluate_sets(df: pd.DataFrame, models: Sequence[str] | None = None, reference: str | None = None,
                  n_boot: int = 1000, seed: int = 0, survival: bool = True) -> dict[str, Evaluation]:
    """`evaluate_frame` of the development (out-of-fold) and external sets, separately (papers/000 tables)."""
    from raypipe.report.ct_tables import development_rows, external_rows

    frame = df.drop(columns=[c for c in ("source_file",) if c in df.columns])
    if not survival:
        frame = frame.drop(columns=[c for c in ("time_days", "event", "group") if c in frame.columns])
    frame.attrs = {}
    dev = development_rows(frame)
    ext = external_rows(frame)
    if models is not None:
        dev, ext = dev[dev["model"].isin(models)], ext[ext["model"].isin(models)]
    names = list(dict.fromkeys(dev["model"].tolist()))
    if reference is not None and reference in names:
        names.remove(reference)
        names.insert(0, reference)
    # thresholds travel with the rows (`threshold`: chosen on each fold's training side by raypipe cv)
    out: dict[str, Evaluation] = {}
    if len(dev):
        ordered = pd.concat([dev[dev["model"] == n] for n in names], ignore_index=True).assign(split="oof")
        out["development"] = evaluate_frame(ordered, reference_model=names[0], n_boot=n_boot, seed=seed,
                                            extra_tables=False)
    if len(ext):
        ext_names = [n for n in names if n in set(ext["model"])] + [n for n in dict.fromkeys(ext["model"]) if n not in names]
        ordered = pd.concat([ext[ext["model"] == n] for n in ext_names], ignore_index=True).assign(split="external")
        out["external"] = evaluate_frame(ordered, reference_model=ext_names[0], n_boot=n_boot, seed=seed,
                                         extra_tables=False)
    return out


def paper_ct_tables(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> list[Any]:
    """papers/000 Tables 3-4 (image vs clinical models, development and external) when those models are present."""
    from raypipe.report.ct_tables import layout_ct_tables, table_models

    models, reference = table_models(df)
    if reference is None:
        return []
    sets = evaluate_sets(df, models=models, reference=reference, n_boot=n_boot, seed=seed, survival=False)
    return layout_ct_tables(sets, models, reference, n_boot)


XRAY_CLINICAL_MODELS = (1, 2, 3)
XRAY_FAMILIES = (("coxph_m{k}", "CoxPH"), ("deepsurv_noimg_m{k}", "DeepSurv without images"),
                 ("deepsurv_img_m{k}", "DeepSurv with images"))
XRAY_EXTRA_MODELS = (("deepsurv_imgonly", "DeepSurv image only"), ("frax_mof", "FRAX (MOF)"))


def xray_c_index_rows(df: pd.DataFrame, split: str, n_boot: int = 1000, seed: int = 0
                      ) -> tuple[list[dict[str, Any]], bool]:
    """papers/001's C-index comparison: per CoxPH/DeepSurv model, Harrell C with CI and the paired bootstrap
    p against CoxPH of the same clinical model, for all patients and (when sex is known) women; and whether
    the women column exists. Empty when those model names are absent."""
    if not {"time_days", "event"} <= set(df.columns):
        return [], False
    rows_df = df[df["split"] == split]
    present = set(rows_df["model"])
    lines: list[tuple[str, str, str]] = []  # (clinical model, method, model name)
    for k in XRAY_CLINICAL_MODELS:
        lines += [(f"Model {k}", label, pattern.format(k=k)) for pattern, label in XRAY_FAMILIES
                  if pattern.format(k=k) in present]
    lines += [("\u2013", label, name) for name, label in XRAY_EXTRA_MODELS if name in present]
    if not lines or not any(name.startswith(("coxph_m", "deepsurv_")) for _, _, name in lines):
        return [], False
    women = rows_df["sex"].astype(str).str.upper().str.startswith("F") if "sex" in rows_df.columns else None
    out = []
    for clin, method, name in lines:
        m = rows_df[rows_df["model"] == name]
        ref_name = f"coxph_m{name[-1]}" if name[-1].isdigit() else None
        ref = rows_df[rows_df["model"] == ref_name] if ref_name in present and ref_name != name else None
        subsets = []
        for subset in ([None] if women is None else [None, women]):
            sel = m if subset is None else m[subset.loc[m.index].to_numpy()]
            if ref is None:
                p: Any = "reference" if ref_name == name else None
            else:
                r = ref if subset is None else ref[subset.loc[ref.index].to_numpy()]
                p = _paired_c_index_p(sel, r, n_boot, seed)
            subsets.append({"c_index": _c_index_entry(sel, n_boot, seed), "p_vs_coxph": p})
        out.append({"clinical": clin, "method": method, "model": name, "subsets": subsets})
    return out, women is not None


def _c_index_entry(rows: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any] | None:
    """Harrell's C with a patient-level bootstrap CI (None without events)."""
    if rows.empty or rows["event"].sum() == 0:
        return None
    return M.concordance_ci(rows["time_days"].to_numpy(float), rows["event"].to_numpy(int),
                            rows["score"].to_numpy(float), n_boot=n_boot, seed=seed,
                            groups=rows["patient_id"].astype(str).to_numpy()).to_dict()


def _paired_c_index_p(a: pd.DataFrame, b: pd.DataFrame, n_boot: int, seed: int) -> float | None:
    """Paired bootstrap p of the difference in Harrell's C on the studies both models scored."""
    both = a.merge(b[["study_id", "score"]], on="study_id", suffixes=("", "_b"))
    if len(both) < 10 or both["event"].sum() == 0:
        return None
    t, e = both["time_days"].to_numpy(float), both["event"].to_numpy(int)
    sa, sb = both["score"].to_numpy(float), both["score_b"].to_numpy(float)
    return M.paired_bootstrap_p(lambda i: M.c_index(t[i], e[i], sa[i]).value - M.c_index(t[i], e[i], sb[i]).value,
                                e, both["patient_id"].astype(str).to_numpy(), n_boot, seed)


DIFFX_MODEL = "diffx"


def diffx_numbers(df: pd.DataFrame) -> dict[str, Any]:
    """The thesis's Diff-X analyses of the ``diffx`` rows (one per participant) from `raypipe.metrics.diffx`:
    Table 4, Table 5, pairwise log-rank, CoxPH and DeepSurv fracture-score models (fitted in the rows' CV
    folds when they carry a ``fold`` column); a block that cannot be computed holds its error."""
    from raypipe.metrics.diffx import fracture_score_models, pairwise_logrank, table4, table5

    if "model" not in df.columns or "bpvf" not in df.columns:
        return {}
    rows = df[df["model"] == DIFFX_MODEL].dropna(subset=["time_days", "event", "bpvf", "score"])
    if rows.empty:
        return {}
    if rows["patient_id"].duplicated().any():
        raise ValueError("diffx predictions hold several rows for one participant; the tables need one each")
    rows = rows.assign(gpvf=rows["gpvf"] if "gpvf" in rows.columns else rows["score"])
    t, e = rows["time_days"].to_numpy(float), rows["event"].to_numpy(int)
    blocks = {"table4": lambda: table4(rows), "table5": lambda: table5(rows),
              "logrank": lambda: pairwise_logrank(t, e, rows["group"].astype(str)),
              "score_models": lambda: fracture_score_models(rows, method="coxph"),
              "score_models_deepsurv": lambda: fracture_score_models(rows, method="deepsurv")}
    out: dict[str, Any] = {}
    for key, compute in blocks.items():
        try:
            out[key] = compute()
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:  # a small cohort must not break the report
            out[key] = exc
    return out
