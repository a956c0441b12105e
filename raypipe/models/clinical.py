"""Clinical baselines of papers/000: XGBoost classifiers A-D on clinical variables, and FRAX as a score.

Variable sets (paper, Methods): model A age + sex; B adds BMI; C adds glucocorticoid use, alcohol,
smoking and possible secondary osteoporosis; D adds type 2 diabetes, HIV, hepatitis C and renal failure.
Pure (no Ray): `ClinicalModel` follows the estimator convention (hyperparameters in `__init__`,
fitted state with a trailing underscore); `raypipe.tune.baselines` cross-validates it on Ray.
(The X-ray CoxPH baseline is a different model: `raypipe.baselines.coxph`.)
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CLINICAL_MODELS: dict[str, tuple[str, ...]] = {
    "A": ("age", "sex"),
    "B": ("age", "sex", "bmi"),
    "C": ("age", "sex", "bmi", "glucocorticoid", "alcohol", "smoker", "secondary_osteoporosis"),
    "D": ("age", "sex", "bmi", "glucocorticoid", "alcohol", "smoker", "secondary_osteoporosis",
          "t2dm", "hiv", "hcv", "renal_failure"),
}
FRAX_COLUMNS: tuple[str, ...] = ("frax_mof", "frax_hip")

# Small trees with shrinkage: the cohorts are small and the signal is in a few variables.
DEFAULT_PARAMS: dict[str, Any] = {
    "n_estimators": 200, "max_depth": 2, "learning_rate": 0.05, "subsample": 0.8, "min_child_weight": 1.0,
    "reg_lambda": 1.0, "tree_method": "hist", "n_jobs": 1,
}


def model_name(letter: str) -> str:
    """Prediction-file name of clinical model `letter` (`clinical_A` ...)."""
    return f"clinical_{letter}"


def clinical_features(frame: pd.DataFrame, variables: Sequence[str]) -> np.ndarray:
    """(n, len(variables)) float matrix: sex F=1/M=0, booleans 0/1, missing as NaN (XGBoost routes it)."""
    missing = [v for v in variables if v not in frame.columns]
    if missing:
        raise ValueError(f"clinical variable(s) {missing} are not in the data (have: {list(frame.columns)})")
    cols = []
    for name in variables:
        v = frame[name]
        if name == "sex":
            num = v.map(lambda s: {"F": 1.0, "M": 0.0}.get(str(s).strip().upper()[:1], np.nan) if pd.notna(s) else np.nan)
        else:
            num = pd.to_numeric(v.map(lambda s: float(s) if isinstance(s, (bool, np.bool_)) else s), errors="coerce")
        cols.append(num.to_numpy(dtype=np.float64))
    return np.stack(cols, axis=1)


class ClinicalModel:
    """XGBoost classifier on one of the paper's clinical variable sets (A-D), probabilities of the label."""

    def __init__(self, variables: Sequence[str], seed: int = 0, params: Mapping[str, Any] | None = None) -> None:
        self.variables = tuple(variables)
        self.seed = seed
        self.params = {**DEFAULT_PARAMS, **dict(params or {})}

    @classmethod
    def paper(cls, letter: str, seed: int = 0, params: Mapping[str, Any] | None = None) -> "ClinicalModel":
        """Clinical model A, B, C or D with the paper's variables."""
        if letter not in CLINICAL_MODELS:
            raise ValueError(f"clinical model must be one of {sorted(CLINICAL_MODELS)}, got {letter!r}")
        return cls(CLINICAL_MODELS[letter], seed=seed, params=params)

    def fit(self, frame: pd.DataFrame, y: Sequence[float]) -> "ClinicalModel":
        """Fit on rows with a known 0/1 label; stores `booster_` and `n_train_`."""
        from xgboost import XGBClassifier

        labels = pd.to_numeric(pd.Series(np.asarray(y, dtype=object)), errors="coerce").to_numpy(dtype=float)
        known = np.isfinite(labels)
        if len(np.unique(labels[known])) != 2:
            raise ValueError("need both classes among the labelled training rows")
        x = clinical_features(frame, self.variables)[known]
        self.booster_ = XGBClassifier(random_state=self.seed, **self.params)
        self.booster_.fit(x, labels[known].astype(int))
        self.n_train_ = int(known.sum())
        return self

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of the positive class per row."""
        if not hasattr(self, "booster_"):
            raise RuntimeError("ClinicalModel is not fitted")
        return self.booster_.predict_proba(clinical_features(frame, self.variables))[:, 1].astype(np.float64)


def frax_probability(frame: pd.DataFrame, column: str = "frax_mof") -> np.ndarray:
    """A FRAX column (10-year probability in %, as in the manifest) as a probability in [0, 1]; NaN if missing."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    return np.clip(values / 100.0, 0.0, 1.0)
