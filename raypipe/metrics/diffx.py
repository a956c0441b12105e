"""The thesis's survival analyses of Diff-X scores (papers/004, Methods 7-8, Results 4-5, Tables 4-5).

Input: one row per participant (``raypipe.data.generate_pipeline.aggregate_participants``) with
``time_days``, ``event``, ``bpvf``, ``gpvf``, ``group`` and, where present, ``age``, ``sex`` (F/M), ``bmi``,
``frax_mof``. Units as the thesis tabulates them: age per year, sex female vs male, BMI per kg/m2, FRAX
major osteoporotic per 1 SD (the cohort's sample SD, reported), BpVF and GpVF per 0.1 point.

- `table4`: Cox HRs of the LH and HIGH groups (LL reference) alone, with age/sex/BMI (model 1) and with
  FRAX (model 2); each covariate also univariable; Harrell's C and the likelihood-ratio chi-square of the
  clinical, FRAX, risk-group, model-1 and model-2 fits.
- `table5`: BpVF and GpVF per 0.1 point and the two binary risk groups, univariable, then the score-based
  model (BpVF + GpVF + age + sex + BMI) and the clinical model (age + sex + BMI), with C and LR chi-square.
- `pairwise_logrank`: log-rank test for every pair of groups (raw and Bonferroni-adjusted p).
- `fracture_score_models`: CoxPH (Figure 18) or DeepSurv (Figure 17) survival models on BpVF + GpVF
  (+/- age, sex, BMI) and on FRAX, fitted inside cross-validation by participant (the image models' CV
  folds when the rows carry them); out-of-fold IPCW td-AUROC at 1, 5, 10 years and their mean, and Harrell's C.
- `age_regression`: the thesis's check of the prompt LDM (Methods 8, Results 2): an age regressor's
  predicted age of generated images against the age in their prompt (R-square, slope, MAE).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from raypipe.metrics._checks import as_survival
from raypipe.metrics.survival import CoxSummary, cox_hazard_ratios, logrank_test, td_auroc

__all__ = [
    "AgeRegression",
    "DAYS_PER_YEAR",
    "PairwiseLogRank",
    "covariate_frame",
    "age_regression",
    "fracture_score_models",
    "out_of_fold_scores",
    "participant_folds",
    "pairwise_logrank",
    "table4",
    "table5",
]

DAYS_PER_YEAR = 365.25
SCORE_UNIT = 0.1  # thesis Table 5: HR per 0.1-point increase of BpVF / GpVF
CLINICAL = ("age", "sex", "bmi")


@dataclass(frozen=True)
class PairwiseLogRank:
    """Log-rank test of one pair of groups; ``p_bonferroni`` multiplies p by the number of pairs (capped at 1)."""

    a: str
    b: str
    statistic: float
    p_value: float
    p_bonferroni: float


def pairwise_logrank(time: ArrayLike, event: ArrayLike, group: ArrayLike) -> list[PairwiseLogRank]:
    """Two-group log-rank test for every pair of group labels (sorted), as the thesis reports them."""
    t, e = as_survival(time, event)
    g = np.asarray(group).astype(str)
    if g.shape != t.shape:
        raise ValueError(f"group has shape {g.shape}, expected {t.shape}")
    labels = sorted(np.unique(g))
    if len(labels) < 2:
        raise ValueError("group must contain at least two groups")
    pairs = list(combinations(labels, 2))
    out = []
    for a, b in pairs:
        m = (g == a) | (g == b)
        r = logrank_test(t[m], e[m], g[m])
        out.append(PairwiseLogRank(a, b, r.statistic, r.p_value, min(1.0, r.p_value * len(pairs))))
    return out


def covariate_frame(df: pd.DataFrame, sd_units: Mapping[str, float] | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Survival columns + every covariate of the thesis tables in its tabulated unit; returns (frame, unit labels)."""
    for c in ("time_days", "event"):
        if c not in df.columns:
            raise ValueError(f"column {c!r} missing (have {list(df.columns)})")
    out = pd.DataFrame({"time": df["time_days"].astype(float).to_numpy(), "event": df["event"].astype(int).to_numpy()})
    units: dict[str, str] = {}
    if "group" in df.columns:
        g = df["group"].astype(str).to_numpy()
        for name in ("LH", "HIGH"):
            if (g == name).any():
                out[f"group={name}"] = (g == name).astype(float)
                units[f"group={name}"] = "vs LL"
    for name in ("bpvf", "gpvf"):
        if name in df.columns:
            out[name] = df[name].astype(float).to_numpy() / SCORE_UNIT
            units[name] = f"per {SCORE_UNIT:g}-point increase"
    if "bpvf" in df.columns:
        out["bpvf_high"] = (df["bpvf"].astype(float).to_numpy() >= 0.5).astype(float)
        units["bpvf_high"] = "high vs low (0.5)"
    if "gpvf" in df.columns:
        out["gpvf_high"] = (df["gpvf"].astype(float).to_numpy() >= 0.6).astype(float)
        units["gpvf_high"] = "high vs low (0.6)"
    if "age" in df.columns:
        out["age"] = df["age"].astype(float).to_numpy()
        units["age"] = "per 1-year increase"
    if "sex" in df.columns:
        out["sex"] = (df["sex"].astype(str).str.upper().str[0] == "F").astype(float).to_numpy()
        units["sex"] = "female vs male"
    if "bmi" in df.columns:
        out["bmi"] = df["bmi"].astype(float).to_numpy()
        units["bmi"] = "per 1 kg/m2 increase"
    if "frax_mof" in df.columns:
        frax = df["frax_mof"].astype(float)
        sd = float((sd_units or {}).get("frax_mof", frax.std(ddof=1)))
        if not np.isfinite(sd) or sd <= 0:
            raise ValueError("frax_mof has no spread: an HR per SD is undefined")
        out["frax_mof"] = frax.to_numpy() / sd
        units["frax_mof"] = f"per 1 SD increase (SD {sd:.3g})"
    return out, units


def _fit(data: pd.DataFrame, covariates: Sequence[str]) -> CoxSummary | None:
    cols = [c for c in covariates if c in data.columns]
    if len(cols) != len(covariates):
        return None
    sub = data[["time", "event", *cols]].dropna()
    return cox_hazard_ratios(sub, "time", "event")


def _entry(s: CoxSummary, covariate: str) -> dict[str, float]:
    h = s[covariate]
    return {"hr": h.value, "ci_low": h.ci_low, "ci_high": h.ci_high, "p": h.p_value}


def _fit_stats(s: CoxSummary | None) -> dict[str, float] | None:
    return None if s is None else {"c_index": s.concordance, "lr_chi2": s.lr_statistic, "lr_df": s.lr_df,
                                   "lr_p": s.lr_p_value, "n": s.n, "events": s.n_events}


def _table(data: pd.DataFrame, units: Mapping[str, str], rows: Sequence[str], columns: Mapping[str, Sequence[str]],
           univariable: bool, fits: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    present = [r for r in rows if r in data.columns]
    out: dict[str, Any] = {"units": {r: units[r] for r in present}, "columns": [], "rows": {r: {} for r in present},
                           "fit": {}}
    if univariable:
        out["columns"].append("univariable")
        for r in present:
            s = _fit(data, [r])
            if s is not None:
                out["rows"][r]["univariable"] = _entry(s, r)
    for name, covs in columns.items():
        s = _fit(data, covs)
        if s is None:
            continue
        out["columns"].append(name)
        for r in covs:
            out["rows"][r][name] = _entry(s, r)
    for name, covs in fits.items():
        out["fit"][name] = _fit_stats(_fit(data, covs))
    return out


def table4(df: pd.DataFrame) -> dict[str, Any]:
    """Thesis Table 4: risk groups alone, + age/sex/BMI (model 1), + FRAX per SD (model 2); C and LR chi-square."""
    data, units = covariate_frame(df)
    groups = [c for c in ("group=LH", "group=HIGH") if c in data.columns]
    if not groups:
        raise ValueError("no LH or HIGH participants: Table 4 needs at least two risk groups")
    clinical = [c for c in CLINICAL if c in data.columns]
    columns: dict[str, list[str]] = {"risk_group": groups}
    fits: dict[str, list[str]] = {"risk_group": groups}
    if clinical:
        columns["model1"] = groups + clinical
        fits["clinical"] = clinical
        fits["model1"] = groups + clinical
    if "frax_mof" in data.columns:
        columns["model2"] = groups + ["frax_mof"]
        fits["frax"] = ["frax_mof"]
        fits["model2"] = groups + ["frax_mof"]
    out = _table(data, units, [*groups, *clinical, "frax_mof"], columns, univariable=False, fits=fits)
    for r in [*clinical, "frax_mof"]:  # covariates also univariable, as the thesis's first column shows them
        if r in data.columns:
            out["rows"][r]["univariable"] = _entry(_fit(data, [r]), r)
    return out


def table5(df: pd.DataFrame) -> dict[str, Any]:
    """Thesis Table 5: BpVF/GpVF per 0.1 point and binary groups univariable; score-based and clinical models."""
    data, units = covariate_frame(df)
    for c in ("bpvf", "gpvf"):
        if c not in data.columns:
            raise ValueError(f"column {c!r} missing: Table 5 needs BpVF and GpVF")
    clinical = [c for c in CLINICAL if c in data.columns]
    columns = {"score_based": ["bpvf", "gpvf", *clinical]}
    if clinical:
        columns["clinical"] = list(clinical)
    fits = {"bpvf_risk_group": ["bpvf_high"], "score_based": columns["score_based"]}
    if clinical:
        fits["clinical"] = list(clinical)
    return _table(data, units, ["bpvf", "gpvf", "bpvf_high", "gpvf_high", *clinical], columns, univariable=True,
                  fits=fits)


def participant_folds(df: pd.DataFrame, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, str]:
    """Fold of each participant row and where it came from: the image models' CV ``fold`` column, else random.

    A ``fold`` column with at least two non-negative values (the out-of-fold predictions of ``raypipe cv``)
    is used as is, so each fracture-score model is fitted on the participants whose scores came from the
    other folds' image models; otherwise participants are split at random into `folds` folds with `seed`.
    """
    if "fold" in df.columns:
        f = pd.to_numeric(df["fold"], errors="coerce").to_numpy()
        if np.isfinite(f).all() and (f >= 0).all() and len(np.unique(f)) >= 2:
            return f.astype(int), "fold column (image models' CV)"
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(len(df)) % folds), f"random by participant (seed {seed})"


def out_of_fold_scores(data: pd.DataFrame, covariates: Sequence[str], fold: np.ndarray,
                       method: Literal["coxph", "deepsurv"] = "coxph", seed: int = 0) -> pd.DataFrame:
    """Columns time, event, fold, score: each fold scored by a model fitted on the other folds' rows.

    `data` is `covariate_frame`'s output; rows with a missing covariate are dropped. CoxPH: lifelines'
    ``CoxPHFitter`` linear predictor; DeepSurv: `raypipe.baselines.deepsurv_mlp.DeepSurvMLP` log-risk.
    """
    from lifelines import CoxPHFitter

    from raypipe.baselines.deepsurv_mlp import DeepSurvMLP

    if method not in ("coxph", "deepsurv"):
        raise ValueError(f"method must be 'coxph' or 'deepsurv', got {method!r}")
    covs = list(covariates)
    keep = data[covs].notna().all(axis=1).to_numpy()
    sub = data.loc[keep, ["time", "event", *covs]].reset_index(drop=True)
    f = np.asarray(fold)[keep]
    score = np.full(len(sub), np.nan)
    for k in np.unique(f):
        tr, te = f != k, f == k
        if sub.loc[tr, "event"].sum() < 1:
            raise ValueError(f"fold {k}: no events among the other folds' participants")
        if method == "coxph":
            cph = CoxPHFitter().fit(sub.loc[tr], duration_col="time", event_col="event")
            score[te] = cph.predict_log_partial_hazard(sub.loc[te, covs]).to_numpy()
        else:
            net = DeepSurvMLP(seed=seed + int(k)).fit(sub.loc[tr, covs].to_numpy(float), sub.loc[tr, "time"],
                                                      sub.loc[tr, "event"])
            score[te] = net.log_risk(sub.loc[te, covs].to_numpy(float))
    return pd.DataFrame({"time": sub["time"].to_numpy(float), "event": sub["event"].to_numpy(int), "fold": f,
                         "score": score})


def fracture_score_models(df: pd.DataFrame, folds: int = 5, seed: int = 0,
                          years: Sequence[float] = (1.0, 5.0, 10.0),
                          method: Literal["coxph", "deepsurv"] = "coxph") -> dict[str, Any]:
    """CoxPH or DeepSurv on BpVF + GpVF (+/- age, sex, BMI) and on FRAX inside CV; out-of-fold td-AUROC and C.

    Folds are by participant (one row each, `participant_folds`: the image models' ``fold`` column when
    present), the same for every model. td-AUROC is scikit-survival's ``cumulative_dynamic_auc`` (IPCW,
    censoring distribution from the whole cohort) of the out-of-fold log-risks at the `years` inside
    follow-up, with its KM-weighted mean; Harrell's C of the same scores.
    """
    from raypipe.metrics.survival import c_index

    data, _ = covariate_frame(df)
    clinical = [c for c in CLINICAL if c in data.columns]
    models = {"fracture_scores": ["bpvf", "gpvf"], "fracture_scores_clinical": ["bpvf", "gpvf", *clinical]}
    if "frax_mof" in data.columns:
        models["frax"] = ["frax_mof"]
    fold, source = participant_folds(df, folds, seed)
    n_folds = int(len(np.unique(fold)))
    out: dict[str, Any] = {"method": method, "folds": n_folds, "fold_source": source, "models": {}}
    horizons = [y * DAYS_PER_YEAR for y in years]
    for name, covs in models.items():
        if any(c not in data.columns for c in covs):
            continue
        oof = out_of_fold_scores(data, covs, fold, method, seed)
        if len(oof) < 2 * n_folds:
            raise ValueError(f"{name}: {len(oof)} participants are too few for {n_folds}-fold CV")
        t, e, lp = oof["time"].to_numpy(float), oof["event"].to_numpy(int), oof["score"].to_numpy(float)
        usable = [h for h in horizons if t.min() < h < t.max() and (t[e == 1] <= h).any()]
        entry: dict[str, Any] = {"covariates": covs, "n": int(len(oof)), "events": int(e.sum()),
                                 "c_index": c_index(t, e, lp).value}
        if usable:
            r = td_auroc(t, e, t, e, lp, usable)
            entry["td_auroc"] = {f"{h / DAYS_PER_YEAR:g}y": float(v) for h, v in zip(usable, r.values)}
            entry["td_auroc_mean"] = float(r.mean)
        out["models"][name] = entry
    return out


@dataclass(frozen=True)
class AgeRegression:
    """Predicted vs prompted age of generated images: R-square (squared Pearson r), fit line, MAE."""

    n: int
    r_squared: float
    pearson_r: float
    slope: float
    intercept: float
    mae: float


def age_regression(prompt_age: ArrayLike, predicted_age: ArrayLike) -> AgeRegression:
    """The thesis's age check (Methods 8, Results 2: R-square 0.841): an age regressor's predictions on the
    generated images against the age written in their prompts; least-squares line of predicted on prompted."""
    x, y = np.asarray(prompt_age, dtype=np.float64), np.asarray(predicted_age, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"prompt_age and predicted_age must be 1-D of one length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("ages must be finite")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("need at least 3 images with varying prompted and predicted ages")
    r = float(np.corrcoef(x, y)[0, 1])
    slope, intercept = np.polyfit(x, y, 1)
    return AgeRegression(int(x.size), r * r, r, float(slope), float(intercept), float(np.abs(y - x).mean()))
