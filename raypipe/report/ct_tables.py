"""papers/000 Tables 3 and 4: CT image models (bone only vs bone + muscle) against clinical models A-D and FRAX.

Prediction files of `raypipe cv` and `raypipe.tune.baselines` carry each model twice: out-of-fold rows
(the development set; model `NAME`, split `val`, fold k) and the external set (model `NAME@external`,
split `external`). `raypipe.evaluate.evaluate_sets` evaluates both sets separately with `evaluate_frame`
(AUROC with bootstrap CI, DeLong p-values, accuracy/sensitivity/specificity with CIs and paired
bootstrap p-values), thresholds at the Youden index of each model's out-of-fold predictions (applied
unchanged to the external set). `ct_tables` lays the results out as the paper does when the report's
predictions hold those model names (`raypipe.evaluate.paper_ct_tables` computes, `layout_ct_tables` lays
out); `render_ct_tables` turns them into HTML for the report.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from raypipe.evaluate import Evaluation

log = logging.getLogger(__name__)

EXTERNAL_SUFFIX = "@external"
BONE = "cnn_rnn_bone"
BONE_MUSCLE = "cnn_rnn_bone_muscle"
CLINICAL = ("clinical_A", "clinical_B", "clinical_C", "clinical_D")
FRAX = ("frax_mof", "frax_hip")
TABLE_MODELS = (BONE_MUSCLE, BONE, *CLINICAL, *FRAX)
DISPLAY = {BONE: "Image: bone only", BONE_MUSCLE: "Image: bone + muscle", "clinical_A": "Clinical model A",
           "clinical_B": "Clinical model B", "clinical_C": "Clinical model C", "clinical_D": "Clinical model D",
           "frax_mof": "FRAX (MOF)", "frax_hip": "FRAX (hip)"}
METRICS = ("auroc", "accuracy", "sensitivity", "specificity")
METRIC_NAMES = {"auroc": "AUROC", "accuracy": "Accuracy", "sensitivity": "Sensitivity", "specificity": "Specificity"}


@dataclass(frozen=True)
class CTTable:
    """A table of the CT section: header, rows of cell texts, caption and a methods note."""

    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


def development_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Out-of-fold (development) rows: models without the external suffix, split not external/test."""
    ext = df["model"].astype(str).str.endswith(EXTERNAL_SUFFIX)
    return df[~ext & ~df["split"].astype(str).isin(["external", "test"])]


def external_rows(df: pd.DataFrame) -> pd.DataFrame:
    """External-set rows (models named NAME@external), renamed to NAME."""
    ext = df[df["model"].astype(str).str.endswith(EXTERNAL_SUFFIX)].copy()
    ext["model"] = ext["model"].astype(str).str.slice(0, -len(EXTERNAL_SUFFIX))
    return ext


def _cell(ev: Evaluation, model: str, metric: str) -> str:
    """`value (low-high)` of one model's metric in one set, or an en dash."""
    from raypipe.report.html import fmt_ci

    return fmt_ci(ev.metrics["models"].get(model, {}).get(metric))


def _p(ev: Evaluation, model: str, metric: str) -> str:
    """P value of `model` against the set's reference for `metric` (`Reference` for the reference itself)."""
    from raypipe.report.html import fmt_p

    if model == ev.reference:
        return "Reference"
    for c in ev.metrics.get("comparisons", []):
        if c["a"] == ev.reference and c["b"] == model and c["metric"] == metric:
            return fmt_p(c["p_value"])
    return "\u2013"


def table_models(df: pd.DataFrame) -> tuple[list[str], str | None]:
    """The papers/000 table models present in predictions, and the reference (bone + muscle, else bone)."""
    present = set(development_rows(df)["model"]) | set(external_rows(df)["model"])
    reference = BONE_MUSCLE if BONE_MUSCLE in present else (BONE if BONE in present else None)
    if reference is None or len(present & set(TABLE_MODELS)) < 2:
        return [], None
    return [m for m in TABLE_MODELS if m in present], reference


def layout_ct_tables(sets: dict[str, Evaluation], models: Sequence[str], reference: str,
                     n_boot: int) -> list[CTTable]:
    """Tables 3 and 4 of papers/000 laid out from the evaluated development/external sets."""
    present = set(models)
    note = ("Development set: out-of-fold predictions of the k-fold cross-validation; external set: mean of the "
            "fold models' scores. 95% CIs: patient-level stratified bootstrap "
            f"({n_boot} resamples). P values against the reference: DeLong test for AUROC, paired bootstrap for "
            "threshold metrics. Thresholds: chosen on the training side (each fold's Youden cut-off on its "
            "training patients; for the external set, the Youden cut-off of the out-of-fold predictions).")
    tables: list[CTTable] = []
    if BONE in present and BONE_MUSCLE in present:
        header = ["Metric (95% CI)"]
        for set_name in sets:
            label = "Development" if set_name == "development" else "External validation"
            header += [f"{label}: bone only", f"{label}: bone + muscle", "P value"]
        rows = []
        for m in METRICS:
            row = [METRIC_NAMES[m]]
            for ev in sets.values():
                row += [_cell(ev, BONE, m), _cell(ev, BONE_MUSCLE, m),
                        _p(ev, BONE, m) if ev.reference == BONE_MUSCLE else "\u2013"]
            rows.append(tuple(row))
        tables.append(CTTable("Image models: bone only vs bone + muscle (papers/000 Table 3)", tuple(header),
                              tuple(rows), note))
    others = [m for m in models if m not in (BONE, BONE_MUSCLE)]
    if others:
        header = ["Model"]
        for m in METRICS:
            header += [f"{METRIC_NAMES[m]} (95% CI)", "P value"]
        rows = []
        for set_name, ev in sets.items():
            rows.append(("Development set" if set_name == "development" else "External validation set",
                         *[""] * (2 * len(METRICS))))
            for name in [reference, *others]:
                if name not in ev.metrics["models"]:
                    continue
                row = [DISPLAY.get(name, name)]
                for m in METRICS:
                    row += [_cell(ev, name, m), _p(ev, name, m)]
                rows.append(tuple(row))
        tables.append(CTTable(f"Image ({DISPLAY[reference].split(': ')[1]}) vs clinical models "
                              "(papers/000 Table 4)", tuple(header), tuple(rows), note))
    return tables


def render_ct_tables(tables: Sequence[CTTable]) -> list[str]:
    """HTML of the CT tables for the report."""
    from raypipe.report import html as H

    return [H.table(t.header, t.rows, caption=t.caption, note=t.note, css_class="perf") for t in tables]
