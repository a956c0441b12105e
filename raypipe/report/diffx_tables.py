"""papers/004 tables for Diff-X predictions (model ``diffx``, one row per participant) in `raypipe evaluate`.

Table 4 (risk groups alone, model 1 = + age, sex, BMI, model 2 = + FRAX per SD; C-index and LR chi-square),
Table 5 (BpVF and GpVF per 0.1 point, univariable and the score-based / clinical models), the pairwise
log-rank tests of the risk groups and the cross-validated CoxPH (Figure 18) and DeepSurv (Figure 17)
fracture-score models (td-AUROC at 1, 5 and 10 years and the mean). `raypipe.evaluate.diffx_numbers` computes them (`raypipe.metrics.diffx`); this
module only lays them out.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raypipe.report.xray_tables import XrayTable

__all__ = ["layout_diffx_tables"]

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


TITLES = {
    "table4": "Diff-X (thesis Table 4): Cox models of the risk groups",
    "table5": "Diff-X (thesis Table 5): BpVF and GpVF per 0.1 point",
    "logrank": "Diff-X: pairwise log-rank tests of the risk groups",
    "score_models": "Diff-X (thesis Figure 18): fracture-score CoxPH models, td-AUROC (IPCW)",
    "score_models_deepsurv": "Diff-X (thesis Figure 17): fracture-score DeepSurv models, td-AUROC (IPCW)",
}
_MODEL_NAMES = {"fracture_scores": "1) Fracture scores (BpVF + GpVF)",
                "fracture_scores_clinical": "2) Fracture scores + age, sex, BMI",
                "frax": "3) FRAX major osteoporotic"}


def layout_diffx_tables(numbers: Mapping[str, Any]) -> list[XrayTable]:
    """The papers/004 tables laid out from `raypipe.evaluate.diffx_numbers` (a block that failed says why)."""
    from raypipe.report.html import fmt_p

    out = []
    for key, title in TITLES.items():
        if key not in numbers:
            continue
        value = numbers[key]
        if isinstance(value, Exception):
            out.append(XrayTable(title, ("Not computed",), ((f"{type(value).__name__}: {value}",),)))
        elif key == "table4":
            out.append(_cox_table(title, value, {"clinical": "Clinical (age, sex, BMI)", "frax": "FRAX",
                                                 "risk_group": "Risk group alone", "model1": "Model 1",
                                                 "model2": "Model 2"}))
        elif key == "table5":
            out.append(_cox_table(title, value, {"bpvf_risk_group": "Baseline pVF risk group",
                                                 "score_based": "Score-based model", "clinical": "Clinical model"}))
        elif key == "logrank":
            out.append(XrayTable(title, ("Groups", "Chi-square", "P", "P (Bonferroni)"),
                                 tuple((f"{p.a} vs {p.b}", f"{p.statistic:.2f}", fmt_p(p.p_value),
                                        fmt_p(p.p_bonferroni)) for p in value)))
        else:
            out.append(_score_models(title, value))
    return out


def _score_models(title: str, fsm: Mapping[str, Any]) -> XrayTable:
    years = ["1y", "5y", "10y"]
    kind = "linear predictors" if fsm.get("method", "coxph") == "coxph" else "DeepSurv log-risks"
    return XrayTable(
        f"{title}, {fsm['folds']}-fold CV by participant",
        ("Model", "Covariates", "N (events)", *[f"td-AUROC {y}" for y in years], "Mean td-AUROC", "Harrell C"),
        tuple((_MODEL_NAMES.get(name, name), ", ".join(m["covariates"]), f"{m['n']} ({m['events']})",
               *[f"{m.get('td_auroc', {}).get(y, float('nan')):.3f}" for y in years],
               f"{m.get('td_auroc_mean', float('nan')):.3f}", f"{m['c_index']:.3f}") for name, m in fsm["models"].items()),
        f"out-of-fold {kind} (folds: {fsm.get('fold_source', 'random by participant')}); td-AUROC is the cumulative/"
        "dynamic AUROC with inverse probability of censoring weights, its mean weighted by the Kaplan-Meier "
        "estimate; horizons outside follow-up are nan")
