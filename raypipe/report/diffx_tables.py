"""papers/004 tables for Diff-X predictions (model ``diffx``, one row per participant) in `raypipe evaluate`.

Table 4 (risk groups alone, model 1 = + age, sex, BMI, model 2 = + FRAX per SD; C-index and LR chi-square),
Table 5 (BpVF and GpVF per 0.1 point, univariable and the score-based / clinical models), the pairwise
log-rank tests of the risk groups and the cross-validated CoxPH fracture-score models (td-AUROC at 1, 5
and 10 years and the mean). The numbers come from `raypipe.metrics.diffx`; this module only lays them out.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from raypipe.report.xray_tables import XrayTable

__all__ = ["DIFFX_MODEL", "diffx_tables"]

DIFFX_MODEL = "diffx"
_ROW_NAMES = {"group=LH": "LH (vs LL)", "group=HIGH": "HIGH (vs LL)", "age": "Age", "sex": "Sex", "bmi": "BMI",
              "frax_mof": "FRAX major osteoporotic", "bpvf": "Baseline pVF", "gpvf": "Generative pVF",
              "bpvf_high": "Baseline pVF risk group", "gpvf_high": "Generative pVF risk group"}
_COLUMN_NAMES = {"univariable": "Univariable", "risk_group": "Risk group alone", "model1": "Model 1 (+ age, sex, BMI)",
                 "model2": "Model 2 (+ FRAX)", "score_based": "Score-based model", "clinical": "Clinical model"}


def _hr(cell: Mapping[str, float] | None) -> tuple[str, str]:
    from raypipe.report.html import fmt_p

    if not cell:
        return "", ""
    return f"{cell['hr']:.3f} ({cell['ci_low']:.3f}-{cell['ci_high']:.3f})", fmt_p(cell["p"])


def _cox_table(title: str, t: Mapping[str, Any], fit_names: Mapping[str, str]) -> XrayTable:
    cols = list(t["columns"])
    header = ("Predictor",) + tuple(x for c in cols for x in (f"{_COLUMN_NAMES.get(c, c)} HR (95% CI)", "P"))
    rows = []
    for r, cells in t["rows"].items():
        label = f"{_ROW_NAMES.get(r, r)} ({t['units'][r]})"
        rows.append((label, *[x for c in cols for x in _hr(cells.get(c))]))
    fits = {k: v for k, v in t["fit"].items() if v}
    note = "; ".join(f"{fit_names.get(k, k)}: C {v['c_index']:.3f}, LR chi-square {v['lr_chi2']:.2f} (df {v['lr_df']})"
                     for k, v in fits.items())
    return XrayTable(title, header, tuple(rows), note)


def diffx_tables(df: pd.DataFrame) -> list[XrayTable]:
    """The papers/004 tables for the ``diffx`` rows of `df` (none when there are no such rows)."""
    from raypipe.metrics.diffx import pairwise_logrank, table4, table5
    from raypipe.report.html import fmt_p

    if "model" not in df.columns or "bpvf" not in df.columns:
        return []
    rows = df[df["model"] == DIFFX_MODEL].dropna(subset=["time_days", "event", "bpvf", "score"])
    if rows.empty:
        return []
    if rows["patient_id"].duplicated().any():
        raise ValueError("diffx predictions hold several rows for one participant; the tables need one each")
    rows = rows.assign(gpvf=rows["gpvf"] if "gpvf" in rows.columns else rows["score"])
    t, e = rows["time_days"].to_numpy(float), rows["event"].to_numpy(int)
    blocks = {
        "Diff-X (thesis Table 4): Cox models of the risk groups": lambda title: _cox_table(title, table4(rows), {
            "clinical": "Clinical (age, sex, BMI)", "frax": "FRAX", "risk_group": "Risk group alone",
            "model1": "Model 1", "model2": "Model 2"}),
        "Diff-X (thesis Table 5): BpVF and GpVF per 0.1 point": lambda title: _cox_table(title, table5(rows), {
            "bpvf_risk_group": "Baseline pVF risk group", "score_based": "Score-based model",
            "clinical": "Clinical model"}),
        "Diff-X: pairwise log-rank tests of the risk groups": lambda title: XrayTable(
            title, ("Groups", "Chi-square", "P", "P (Bonferroni)"),
            tuple((f"{p.a} vs {p.b}", f"{p.statistic:.2f}", fmt_p(p.p_value), fmt_p(p.p_bonferroni))
                  for p in pairwise_logrank(t, e, rows["group"].astype(str)))),
        "Diff-X: fracture-score CoxPH models, td-AUROC (IPCW)": lambda title: _score_models(title, rows),
    }
    out = []
    for title, make in blocks.items():
        try:
            out.append(make(title))
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:  # a small cohort must not break the report
            out.append(XrayTable(title, ("Not computed",), ((f"{type(exc).__name__}: {exc}",),)))
    return out


def _score_models(title: str, rows: pd.DataFrame) -> XrayTable:
    from raypipe.metrics.diffx import fracture_score_models

    fsm = fracture_score_models(rows)
    years = ["1y", "5y", "10y"]
    return XrayTable(
        f"{title}, {fsm['folds']}-fold CV by participant",
        ("Model", "Covariates", *[f"td-AUROC {y}" for y in years], "Mean td-AUROC", "Harrell C"),
        tuple((name, ", ".join(m["covariates"]), *[f"{m.get('td_auroc', {}).get(y, float('nan')):.3f}" for y in years],
               f"{m.get('td_auroc_mean', float('nan')):.3f}", f"{m['c_index']:.3f}") for name, m in fsm["models"].items()),
        "out-of-fold linear predictors; horizons outside follow-up are nan; the DeepSurv variant is not implemented")
