"""papers/001 tables: Table 2 (six preprocessing variants) and the C-index comparisons (Figs. 3-4).

`raypipe evaluate` adds them when the prediction files hold the X-ray model names:
- Table 2: one row per image model named `..._{variant}` (variant in `raypipe.preprocess.xray.VARIANTS`,
  e.g. `deepsurv_imgonly_patches_l1l5`): AUROC, sensitivity, specificity, PPV and NPV of the 5-year fracture
  label with 95% CIs, as `raypipe.evaluate` computed them (threshold: Youden index of the validation rows).
- C-index comparison: for clinical models 1-3, CoxPH (`coxph_m{k}`), DeepSurv without images
  (`deepsurv_noimg_m{k}`) and with images (`deepsurv_img_m{k}`), then DeepSurv image only
  (`deepsurv_imgonly`) and FRAX (`frax_mof`): Harrell's C with a patient-level bootstrap 95% CI and the
  paired bootstrap p-value against CoxPH of the same clinical model, for all patients and for women only.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

CLINICAL_MODEL_IDS = (1, 2, 3)
FAMILIES = (("coxph_m{k}", "CoxPH"), ("deepsurv_noimg_m{k}", "DeepSurv without images"),
            ("deepsurv_img_m{k}", "DeepSurv with images"))
EXTRA_MODELS = (("deepsurv_imgonly", "DeepSurv image only"), ("frax_mof", "FRAX (MOF)"))
TABLE2_METRICS = ("auroc", "sensitivity", "specificity", "ppv", "npv")
VARIANT_NAMES = {
    "full_l1l5": "L1-L5 without masks", "full_l1l5_masked": "L1-L5 with masks",
    "full_l1l4": "L1-L4 without masks", "full_l1l4_masked": "L1-L4 with masks",
    "patches_l1l5": "L1-L5 patches without masks", "patches_l1l5_masked": "L1-L5 patches with masks",
}


@dataclass(frozen=True)
class XrayTable:
    """One table of the report: caption, header, rows of text cells, footnote."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


def variant_of(model: str) -> str | None:
    """The preprocessing variant a model name ends with (longest match), else None."""
    hits = [v for v in VARIANT_NAMES if model.endswith("_" + v) or model == v]
    return max(hits, key=len) if hits else None


def _fmt(entry: dict[str, Any] | None) -> str:
    """`value (low-high)` cell."""
    from raypipe.report.html import fmt_ci

    return fmt_ci(entry)


def table2(results: Sequence[Any]) -> XrayTable | None:
    """Table 2 from evaluated model results whose names carry a preprocessing variant."""
    rows = []
    order = list(VARIANT_NAMES)
    found = sorted((r for r in results if variant_of(r.name) and "auroc" in r.metrics),
                   key=lambda r: order.index(variant_of(r.name)))
    for r in found:
        rows.append((VARIANT_NAMES[variant_of(r.name)], r.name, *(_fmt(r.metrics.get(m)) for m in TABLE2_METRICS)))
    if not rows:
        return None
    return XrayTable("Performance in discriminating patients likely to develop a fracture by image type (5-year)",
                     ("Image type", "Model", "AUROC", "Sensitivity", "Specificity", "PPV", "NPV"), tuple(rows),
                     "95% CIs: patient-level bootstrap. Threshold metrics at each model's threshold (Youden index "
                     "of its validation rows when present).")


def _c_cell(rows: pd.DataFrame, n_boot: int, seed: int) -> tuple[str, dict[str, Any] | None]:
    """Harrell's C with a bootstrap CI on the rows (or a dash without events)."""
    from raypipe import metrics as M

    if rows.empty or rows["event"].sum() == 0:
        return "\u2013", None
    ci = M.concordance_ci(rows["time_days"].to_numpy(float), rows["event"].to_numpy(int),
                          rows["score"].to_numpy(float), n_boot=n_boot, seed=seed,
                          groups=rows["patient_id"].astype(str).to_numpy())
    entry = ci.to_dict()
    return _fmt(entry), entry


def _p_vs(a: pd.DataFrame, b: pd.DataFrame, n_boot: int, seed: int) -> str:
    """Paired bootstrap p-value of the difference in Harrell's C on the studies both models scored."""
    from raypipe import metrics as M
    from raypipe.report.html import fmt_p

    both = a.merge(b[["study_id", "score"]], on="study_id", suffixes=("", "_b"))
    if len(both) < 10 or both["event"].sum() == 0:
        return "\u2013"
    t, e = both["time_days"].to_numpy(float), both["event"].to_numpy(int)
    sa, sb = both["score"].to_numpy(float), both["score_b"].to_numpy(float)
    p = M.paired_bootstrap_p(lambda i: M.c_index(t[i], e[i], sa[i]).value - M.c_index(t[i], e[i], sb[i]).value, e,
                            both["patient_id"].astype(str).to_numpy(), n_boot, seed)
    return fmt_p(p)


def c_index_table(df: pd.DataFrame, split: str, n_boot: int = 1000, seed: int = 0) -> XrayTable | None:
    """The paper's C-index comparison (all patients and women) when CoxPH/DeepSurv model names are present."""
    if not {"time_days", "event"} <= set(df.columns):
        return None
    rows_df = df[df["split"] == split]
    present = set(rows_df["model"])
    lines: list[tuple[str, str, str]] = []  # (clinical model, method, model name)
    for k in CLINICAL_MODEL_IDS:
        lines += [(f"Model {k}", label, pattern.format(k=k)) for pattern, label in FAMILIES
                  if pattern.format(k=k) in present]
    lines += [("\u2013", label, name) for name, label in EXTRA_MODELS if name in present]
    if not lines or not any(name.startswith(("coxph_m", "deepsurv_")) for _, _, name in lines):
        return None
    women = rows_df["sex"].astype(str).str.upper().str.startswith("F") if "sex" in rows_df.columns else None
    out = []
    for clin, method, name in lines:
        m = rows_df[rows_df["model"] == name]
        ref_name = f"coxph_m{name[-1]}" if name[-1].isdigit() else None
        ref = rows_df[rows_df["model"] == ref_name] if ref_name in present and ref_name != name else None
        cells = [clin, method, name]
        for subset in ([None] if women is None else [None, women]):
            sel = m if subset is None else m[subset.loc[m.index].to_numpy()]
            text, _ = _c_cell(sel, n_boot, seed)
            cells.append(text)
            if ref is None:
                cells.append("Reference" if ref_name == name else "\u2013")
            else:
                r = ref if subset is None else ref[subset.loc[ref.index].to_numpy()]
                cells.append(_p_vs(sel, r, n_boot, seed))
        out.append(tuple(cells))
    header = ["Clinical model", "Method", "Model", "C-index, all (95% CI)", "P vs CoxPH"]
    if women is not None:
        header += ["C-index, women (95% CI)", "P vs CoxPH"]
    note = ("Harrell's C on the evaluated split with a patient-level percentile bootstrap CI "
            f"({n_boot} resamples); P: paired bootstrap of the difference in C against CoxPH with the same "
            "clinical variables. Model 1: age, sex; model 2: + BMI; model 3: + glucocorticoids, secondary "
            "osteoporosis.")
    return XrayTable(f"C-index of CoxPH and DeepSurv by clinical model (split '{split}')", tuple(header),
                     tuple(out), note)


def xray_tables(df: pd.DataFrame, results: Sequence[Any], split: str, n_boot: int = 1000,
                seed: int = 0) -> list[XrayTable]:
    """The papers/001 tables that the predictions allow (empty when no X-ray model names are present)."""
    tables = [table2(results), c_index_table(df, split, n_boot, seed)]
    return [t for t in tables if t is not None]


def render_xray_tables(tables: Sequence[XrayTable]) -> list[str]:
    """HTML of the tables for `raypipe.report.build`."""
    from raypipe.report import html as H

    return [H.table(list(t.header), [list(r) for r in t.rows], caption=t.title, note=t.note, css_class="perf")
            for t in tables]
