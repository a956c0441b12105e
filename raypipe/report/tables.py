"""Clinical characteristics by group (mean (SD) / n (%), t-test or ANOVA / chi-square), as the papers' Table 1-3."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from raypipe.predictions import CLINICAL_COLUMNS

logger = logging.getLogger(__name__)

VARIABLE_NAMES = {
    "age": "Age (years)",
    "sex": "Female",
    "height_cm": "Height (cm)",
    "weight_kg": "Weight (kg)",
    "bmi": "BMI (kg/m\u00b2)",
    "smoker": "Current smoker",
    "alcohol": "Current drinker",
    "glucocorticoid": "Use of glucocorticoids",
    "secondary_osteoporosis": "Possible secondary osteoporosis",
    "rheumatoid_arthritis": "Rheumatoid arthritis",
    "prior_fracture": "Previous fracture",
    "prevalent_fracture": "Prevalent fracture",
    "t2dm": "Type 2 diabetes",
    "hiv": "HIV",
    "hcv": "Hepatitis C",
    "renal_failure": "Renal failure",
    "frax_mof": "FRAX major osteoporotic",
    "frax_hip": "FRAX hip",
    "site": "Site",
    "event": "Incident fracture",
    "follow_up_years": "Follow-up (years)",
}


@dataclass(frozen=True)
class CharacteristicRow:
    """One line of the table: the variable, its summary per group, and the test's p-value."""

    variable: str
    cells: tuple[str, ...]
    p_value: float | None
    test: str | None


@dataclass(frozen=True)
class CharacteristicsTable:
    """Clinical characteristics of the evaluated studies split by one grouping."""

    title: str
    groups: tuple[str, ...]
    counts: tuple[int, ...]
    rows: tuple[CharacteristicRow, ...] = field(default_factory=tuple)


def _is_binary(values: pd.Series) -> bool:
    """Numeric 0/1 column (missing allowed)."""
    v = values.dropna()
    return pd.api.types.is_numeric_dtype(values) and len(v) > 0 and bool(v.isin([0, 1]).all())


def _continuous_row(name: str, data: pd.Series, by: pd.Series, groups: Sequence[str]) -> CharacteristicRow:
    """Mean (SD) per group; Student t-test for two groups, one-way ANOVA for more."""
    samples = [data[by == g].dropna().astype(float).to_numpy() for g in groups]
    cells = tuple(
        f"{s.mean():.1f} ({s.std(ddof=1):.1f})" if len(s) > 1 else ("\u2013" if len(s) == 0 else f"{s[0]:.1f}")
        for s in samples
    )
    p: float | None = None
    usable = [s for s in samples if len(s) > 1]
    if len(usable) == len(samples) >= 2 and any(s.std() > 0 for s in usable):
        if len(samples) == 2:
            p = float(stats.ttest_ind(samples[0], samples[1], equal_var=True).pvalue)
        else:
            p = float(stats.f_oneway(*samples).pvalue)
    test = "t-test" if len(samples) == 2 else "ANOVA"
    return CharacteristicRow(f"{VARIABLE_NAMES.get(name, name)}, mean (SD)", cells, _finite(p), test)


def _count_rows(name: str, positive: pd.Series, by: pd.Series, groups: Sequence[str], label: str) -> CharacteristicRow:
    """n (%) of `positive` per group, with a chi-square test on the 2 x k table."""
    cells = []
    table = []
    for g in groups:
        sel = positive[by == g].dropna().astype(bool)
        k, n = int(sel.sum()), int(len(sel))
        cells.append(f"{k} ({100.0 * k / n:.1f})" if n else "\u2013")
        table.append([k, n - k])
    return CharacteristicRow(f"{label}, n (%)", tuple(cells), _chi2(np.array(table).T), "chi-square")


def _chi2(table: np.ndarray) -> float | None:
    """Chi-square test of independence on a contingency table, None when it is degenerate."""
    table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return None
    return _finite(float(stats.chi2_contingency(table).pvalue))


def _finite(p: float | None) -> float | None:
    """p-value or None when not finite."""
    return p if p is not None and math.isfinite(p) else None


def characteristics_table(df: pd.DataFrame, by: str, title: str, order: Sequence[str] | None = None,
                          variables: Sequence[str] | None = None, outcome_rows: bool = True) -> CharacteristicsTable:
    """Summarise clinical columns of `df` per value of column `by` (one row per study expected).

    By default the clinical columns present, plus incident fracture (`event`) and follow-up when
    `outcome_rows` (leave them out when `by` is itself the outcome).
    """
    key = df[by].astype("object")
    present = key.notna()
    data = df.loc[present].copy()
    by_values = key[present].astype(str)
    groups = list(order) if order is not None else sorted(by_values.unique())
    groups = [g for g in groups if (by_values == g).any()]
    counts = tuple(int((by_values == g).sum()) for g in groups)
    if variables is None:
        variables = [c for c in (*CLINICAL_COLUMNS, "site") if c in data.columns]
        if outcome_rows and by != "event" and "event" in data.columns:
            variables = ["event", *variables]
        if outcome_rows and "time_days" in data.columns:
            data["follow_up_years"] = data["time_days"] / 365.25
            variables = [*variables, "follow_up_years"]
    rows: list[CharacteristicRow] = []
    for col in variables:
        if col == by or col not in data.columns or data[col].notna().sum() == 0:
            continue
        values = data[col]
        if col == "sex":
            text = values.astype("object").map(lambda v: None if pd.isna(v) else str(v).strip().upper()[:1])
            rows.append(_count_rows(col, (text == "F").where(text.notna()), by_values, groups, "Female"))
        elif _is_binary(values):
            rows.append(_count_rows(col, values, by_values, groups, VARIABLE_NAMES.get(col, col)))
        elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            rows.append(_continuous_row(col, values, by_values, groups))
        else:
            levels = sorted(values.dropna().astype(str).unique())
            if len(levels) > 12:
                logger.info("characteristics: skipping %s (%d levels)", col, len(levels))
                continue
            counts_table = np.array([[int(((values.astype(str) == lv) & (by_values == g)).sum()) for g in groups]
                                     for lv in levels])
            p = _chi2(counts_table)
            for i, lv in enumerate(levels):
                cells = tuple(f"{counts_table[i, j]} ({100.0 * counts_table[i, j] / max(counts[j], 1):.1f})"
                              for j in range(len(groups)))
                rows.append(CharacteristicRow(f"{VARIABLE_NAMES.get(col, col)} = {lv}, n (%)", cells,
                                              p if i == 0 else None, "chi-square" if i == 0 else None))
    return CharacteristicsTable(title=title, groups=tuple(groups), counts=counts, rows=tuple(rows))
