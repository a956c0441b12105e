"""papers/001 tables: Table 2 (six preprocessing variants) and the C-index comparisons (Figs. 3-4).

`raypipe evaluate` computes the numbers (`xray_c_index_rows`) and this module lays them out, when the
prediction files hold the X-ray model names:
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

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


def c_index_table(rows: Sequence[Mapping[str, Any]], split: str, n_boot: int, women: bool) -> XrayTable | None:
    """The paper's C-index comparison laid out from `raypipe.evaluate.xray_c_index_rows` (None when empty)."""
    from raypipe.report.html import fmt_p

    if not rows:
        return None
    out = []
    for r in rows:
        cells = [r["clinical"], r["method"], r["model"]]
        for part in r["subsets"]:
            cells.append(_fmt(part["c_index"]) if part["c_index"] else "\u2013")
            p = part["p_vs_coxph"]
            cells.append("Reference" if p == "reference" else ("\u2013" if p is None else fmt_p(p)))
        out.append(tuple(cells))
    header = ["Clinical model", "Method", "Model", "C-index, all (95% CI)", "P vs CoxPH"]
    if women:
        header += ["C-index, women (95% CI)", "P vs CoxPH"]
    note = ("Harrell's C on the evaluated split with a patient-level percentile bootstrap CI "
            f"({n_boot} resamples); P: paired bootstrap of the difference in C against CoxPH with the same "
            "clinical variables. Model 1: age, sex; model 2: + BMI; model 3: + glucocorticoids, secondary "
            "osteoporosis.")
    return XrayTable(f"C-index of CoxPH and DeepSurv by clinical model (split '{split}')", tuple(header),
                     tuple(out), note)


def layout_xray_tables(results: Sequence[Any], c_rows: Sequence[Mapping[str, Any]], split: str, n_boot: int,
                       women: bool) -> list[XrayTable]:
    """The papers/001 tables the evaluation allows (empty when no X-ray model names are present)."""
    tables = [table2(results), c_index_table(c_rows, split, n_boot, women)]
    return [t for t in tables if t is not None]


def render_xray_tables(tables: Sequence[XrayTable]) -> list[str]:
    """HTML of the tables for `raypipe.report.build`."""
    from raypipe.report import html as H

    return [H.table(list(t.header), [list(r) for r in t.rows], caption=t.title, note=t.note, css_class="perf")
            for t in tables]
