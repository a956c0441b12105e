"""Clinical baselines of papers/001: a Cox proportional hazards model on the clinical models' variables, and FRAX.

`CoxPHBaseline` wraps lifelines' `CoxPHFitter` (Efron ties, the same likelihood as `raypipe.losses`) with
the encoding the deep models use (`sex` F = 1, booleans 0/1, missing values imputed with the training
mean), so CoxPH and DeepSurv see the same variables. `fit_clinical_baselines` fits clinical models 1/2/3
on the training rows and scores the held-out rows as prediction-file rows named `coxph_m1..3`, plus
`frax_mof` as a score when the column is present. Pure pandas/lifelines: no Ray.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DAYS_PER_YEAR = 365.25


def encode_clinical(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Numeric clinical matrix with the trainers' encoding (`raypipe.clinical`: sex F=1/M=0, booleans 0/1, NaN kept)."""
    from raypipe.clinical import clinical_matrix

    rows = frame["study_id"].astype(str).tolist() if "study_id" in frame.columns else None
    x = clinical_matrix({c: frame[c].to_numpy() for c in columns}, list(columns), row_ids=rows)
    return pd.DataFrame(x, columns=list(columns), index=frame.index)


class CoxPHBaseline:
    """Cox PH on clinical variables; hyperparameters in __init__, fitted state with a trailing underscore."""

    def __init__(self, columns: Sequence[str], penalizer: float = 0.0, ties: str = "efron") -> None:
        if ties != "efron":
            raise ValueError("lifelines' CoxPHFitter implements Efron ties only")
        self.columns = list(columns)
        self.penalizer = penalizer
        self.ties = ties

    def fit(self, frame: pd.DataFrame, duration_col: str = "time_days", event_col: str = "event") -> "CoxPHBaseline":
        """Fit on the rows of `frame` (missing covariates imputed with the training mean)."""
        from lifelines import CoxPHFitter

        x = encode_clinical(frame, self.columns)
        self.means_ = x.mean().fillna(0.0)
        data = x.fillna(self.means_).assign(_t=frame[duration_col].to_numpy(float), _e=frame[event_col].to_numpy(int))
        self.fitter_ = CoxPHFitter(penalizer=self.penalizer).fit(data, duration_col="_t", event_col="_e")
        return self

    @property
    def params_(self) -> pd.Series:
        """Log hazard ratios per variable."""
        return self.fitter_.params_

    def log_risk(self, frame: pd.DataFrame) -> np.ndarray:
        """Linear predictor (log partial hazard, centred as lifelines centres it) for each row."""
        x = encode_clinical(frame, self.columns).fillna(self.means_)
        return np.asarray(self.fitter_.predict_log_partial_hazard(x), dtype=np.float64).reshape(-1)

    def survival(self, frame: pd.DataFrame, days: Sequence[float]) -> np.ndarray:
        """S(t) (n, len(days)) from lifelines' Breslow baseline."""
        x = encode_clinical(frame, self.columns).fillna(self.means_)
        sf = self.fitter_.predict_survival_function(x, times=list(days))
        return sf.to_numpy().T


def fit_clinical_baselines(frame: pd.DataFrame, train_splits: Sequence[str] = ("train", "val"),
                           models: Sequence[int] = (1, 2, 3), fold: int = -1,
                           horizon_years: float = 5.0) -> pd.DataFrame:
    """CoxPH for clinical models 1/2/3 fitted on `train_splits`, scored on the other rows; plus FRAX.

    Returns prediction-schema rows (`coxph_m{k}` with score_kind log_risk and a `risk_5y` column;
    `frax_mof` as a probability score when present) for every row outside `train_splits`.
    """
    from raypipe.predictions import CLINICAL_COLUMNS, label_columns
    from raypipe.train.xray_config import CLINICAL_MODELS

    train = frame[frame["split"].isin(train_splits)]
    held = frame[~frame["split"].isin(train_splits)]
    if train.empty or held.empty:
        raise ValueError(f"need training rows ({list(train_splits)}) and held-out rows, got {len(train)} and {len(held)}")
    keep = ["patient_id", "study_id", "split", "time_days", "event", *label_columns(list(frame.columns)),
            *[c for c in CLINICAL_COLUMNS if c in frame.columns]]
    base = held[list(dict.fromkeys(keep))].copy().reset_index(drop=True)
    base["fold"] = int(fold)
    parts = []
    for k in models:
        model = CoxPHBaseline(CLINICAL_MODELS[k]).fit(train)
        part = base.assign(model=f"coxph_m{k}", score=model.log_risk(held), score_kind="log_risk")
        part[f"risk_{horizon_years:g}y"] = 1.0 - model.survival(held, [horizon_years * DAYS_PER_YEAR])[:, 0]
        parts.append(part)
        log.info("coxph_m%d: %s", k, ", ".join(f"{n} {v:+.3f}" for n, v in model.params_.items()))
    if "frax_mof" in held.columns and held["frax_mof"].notna().all():
        parts.append(base.assign(model="frax_mof", score=held["frax_mof"].to_numpy(float) / 100.0,
                                 score_kind="probability"))
    return pd.concat(parts, ignore_index=True)


def baseline_summary(model: CoxPHBaseline) -> dict[str, Any]:
    """Coefficients and concordance of a fitted baseline, for logs and model cards."""
    f = model.fitter_
    return {"params": {k: float(v) for k, v in f.params_.items()}, "concordance": float(f.concordance_index_),
            "log_likelihood": float(f.log_likelihood_)}
