"""Assemble report.html (one self-contained file) and its PNGs from an `Evaluation`."""

from __future__ import annotations

import functools

import datetime as _dt
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from raypipe import storage
from raypipe.report import clinical_plots, plots
from raypipe.report import html as H
from raypipe.report.qc_section import preprocessing_dirs, qc_section_parts
from raypipe.report.tables import CharacteristicsTable

if TYPE_CHECKING:
    from raypipe.evaluate import Evaluation, ModelResult

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
_THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity")


def _slug(name: str) -> str:
    """File-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _time_name(days: int) -> str:
    """`1 y` for whole years of 365 days, else `N d`."""
    return f"{days // 365} y" if days % 365 == 0 else f"{days} d"


def _p_lookup(comparisons: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], float | None]:
    """(model, metric) -> p-value against the reference."""
    return {(c["b"], c["metric"]): c.get("p_value") for c in comparisons}


def _p_cell(res: ModelResult, reference: str, pvals: Mapping[tuple[str, str], float | None], metric: str) -> str:
    """P value cell: `Reference` for the reference model, else the comparison's p."""
    if res.name == reference:
        return '<span class="ref">Reference</span>'
    return H.esc(H.fmt_p(pvals.get((res.name, metric))))


def _inputs_table(ev: Evaluation) -> str:
    """Which models, how many studies, events and positives, and the threshold used."""
    rows = []
    for r in ev.models:
        label = f"{r.label_column}: {r.n_positive}/{r.n_studies}" if r.label_column else "\u2013"
        events = f"{r.n_events}/{r.n_studies}" if r.n_events is not None else "\u2013"
        thr = f"{r.threshold:.3g} ({r.threshold_source})" if r.threshold is not None else "\u2013"
        rows.append([r.name + (" (reference)" if r.name == ev.reference else ""), r.score_kind, str(r.n_studies),
                     str(r.n_patients), label, events, thr])
    return H.table(["Model", "Score", "Studies", "Patients", "Positives", "Events", "Threshold"], rows,
                   caption=f"Models evaluated on the '{ev.split}' split")


def _sources_table(ev: Evaluation) -> str:
    """Prediction files with their run metadata."""
    rows = []
    for path, meta in ev.sources.items():
        rows.append([path, str(meta.get("model_name", meta.get("model", "\u2013"))),
                     str(meta.get("model_version", meta.get("version", "\u2013"))),
                     str(meta.get("config_hash", "\u2013")), str(meta.get("created", "\u2013"))])
    return H.table(["Prediction file", "Model", "Version", "Config hash", "Created"], rows, caption="Inputs") if rows else ""


def _binary_table(ev: Evaluation, pvals: Mapping[tuple[str, str], float | None]) -> str:
    """Paper 000 Table 4 style: metric (95% CI) and P value against the reference, per model."""
    models = [r for r in ev.models if "auroc" in r.metrics]
    if not models:
        return ""
    header = ["Model", "AUROC (95% CI)", "P value"]
    for m in _THRESHOLD_METRICS:
        header += [f"{m.capitalize()} (95% CI)", "P value"]
    header += ["PPV (95% CI)", "NPV (95% CI)"]
    rows = []
    for r in models:
        row = [H.esc(r.name), H.esc(H.fmt_ci(r.metrics.get("auroc"))), _p_cell(r, ev.reference, pvals, "auroc")]
        for m in _THRESHOLD_METRICS:
            row += [H.esc(H.fmt_ci(r.metrics.get(m))), _p_cell(r, ev.reference, pvals, m)]
        row += [H.esc(H.fmt_ci(r.metrics.get("ppv"))), H.esc(H.fmt_ci(r.metrics.get("npv")))]
        rows.append(row)
    note = ("95% CIs: stratified patient-level percentile bootstrap ("
            f"{ev.n_boot} resamples). P values against the reference model on the studies both scored: "
            "DeLong test for AUROC, paired bootstrap (normal approximation) for threshold metrics. "
            "Threshold metrics at each model's threshold listed above.")
    return H.table(header, rows, caption="Discrimination of the binary outcome", note=note, raw=True,
                   css_class="perf")


def _survival_table(ev: Evaluation, pvals: Mapping[tuple[str, str], float | None]) -> str:
    """Paper 001's C-index comparison: Harrell and Uno C, IBS, with P for Harrell's C against the reference."""
    models = [r for r in ev.models if "c_index" in r.metrics]
    if not models:
        return ""
    header = ["Model", "Events / studies", "Harrell C (95% CI)", "P value", "Uno C (95% CI)", "IBS (95% CI)"]
    rows = []
    for r in models:
        rows.append([H.esc(r.name), H.esc(f"{r.n_events} / {r.n_studies}"), H.esc(H.fmt_ci(r.metrics.get("c_index"))),
                     _p_cell(r, ev.reference, pvals, "c_index"), H.esc(H.fmt_ci(r.metrics.get("c_index_uno"))),
                     H.esc(H.fmt_ci(r.metrics.get("ibs"))) if "ibs" in r.metrics else "\u2013"])
    note = ("Harrell's C with a stratified patient-level bootstrap CI; Uno's C and the integrated Brier score "
            "(IBS, lower is better; survival curves from a Breslow baseline) use the censoring distribution of the "
            "training rows. P value: paired patient-level bootstrap of the difference in Harrell's C against the "
            "reference model, on the studies both scored.")
    return H.table(header, rows, caption="Concordance and calibration over time", note=note, raw=True,
                   css_class="perf")


def _td_auroc_table(ev: Evaluation) -> str:
    """Paper 004's time-dependent AUROC at each horizon and its mean."""
    models = [r for r in ev.models if "td_auroc_mean" in r.metrics]
    if not models:
        return ""
    times = [t for t in ev.times_days if any(f"td_auroc@{t}" in r.metrics for r in models)]
    header = ["Model", *(f"AUROC at {_time_name(t)} (95% CI)" for t in times), "Mean (95% CI)"]
    rows = [[r.name, *(H.fmt_ci(r.metrics.get(f"td_auroc@{t}")) for t in times), H.fmt_ci(r.metrics.get("td_auroc_mean"))]
            for r in models]
    note = "Cumulative/dynamic AUROC with inverse probability of censoring weights; bootstrap 95% CIs."
    return H.table(header, rows, caption="Time-dependent AUROC", note=note, css_class="perf")


def _risk_group_tables(ev: Evaluation) -> list[str]:
    """Paper 004 Table 4 style: hazard ratio of each risk group against the reference group."""
    out = []
    for r in ev.models:
        if not r.hazard_ratios:
            continue
        rows = []
        for h in r.hazard_ratios:
            pct = 100.0 * h.events / h.n if h.n else 0.0
            hr = "1.000 (Ref)" if h.reference else H.fmt_ci({"value": h.hr, "ci_low": h.ci_low, "ci_high": h.ci_high})
            rows.append([h.group, str(h.n), f"{h.events} ({pct:.1f})", hr, "" if h.reference else H.fmt_p(h.p_value)])
        caption = f"Risk groups of {r.name} (log-rank P {H.fmt_p(r.logrank_p)})"
        out.append(H.table(["Risk group", "n", "Events, n (%)", "Hazard ratio (95% CI)", "P value"], rows,
                           caption=caption, note="Univariable Cox model on group indicators; Wald 95% CI."))
    return out


def _characteristics_html(t: CharacteristicsTable) -> str:
    """Paper 000 Table 2 / paper 004 Table 3 style."""
    header = ["Characteristic", *(f"{g} (n={n})" for g, n in zip(t.groups, t.counts)), "P value"]
    rows = [[row.variable, *row.cells, H.fmt_p(row.p_value) if row.test else ""] for row in t.rows]
    tests = sorted({row.test for row in t.rows if row.test})
    note = ("Continuous variables: mean (SD), two-sided Student t-test (two groups) or one-way ANOVA; "
            f"categorical: n (%), chi-square test. Tests used: {', '.join(tests)}.")
    return H.table(header, rows, caption=t.title, note=note)


def _add_figure(figs: list[str], out_dir: str, png: bytes | None, name: str, caption: str) -> None:
    """Save one plot's PNG in `out_dir` and append its embedded <figure> (nothing when there is no plot)."""
    if png is None:
        return
    storage.atomic_write_bytes(storage.join(out_dir, name), png)
    figs.append(H.figure(png, caption, filename=name))


def _figures(ev: Evaluation, out_dir: str) -> list[str]:
    """Render every plot, save each PNG in `out_dir`, return the embedded <figure> elements."""
    figs: list[str] = []
    add = functools.partial(_add_figure, figs, out_dir)

    rocs = [r.roc for r in ev.models if r.roc is not None]
    if rocs:
        add(plots.roc_curves(rocs), "roc.png", "ROC curves of the binary outcome on the evaluated split.")
    tds = [r.td_curve for r in ev.models if r.td_curve is not None]
    if tds:
        add(plots.td_auroc_curves(tds), "td_auroc.png", "Cumulative/dynamic AUROC over follow-up (IPCW).")
    cals = [r.calibration for r in ev.models if r.calibration is not None]
    if cals and not any(r.calibration_at for r in ev.models):
        add(plots.calibration_plot(cals), "calibration.png",
            "Predicted against observed (Kaplan-Meier) 5-year fracture risk by deciles of predicted risk.")
    for r in ev.models:
        if r.gradcam:
            add(plots.gradcam_gallery(r.gradcam, f"Grad-CAM: {r.name}"), f"gradcam_{_slug(r.name)}.png",
                f"Grad-CAM heatmaps found next to the predictions of {r.name}.")
    return figs


def _clinical_figures(ev: Evaluation, out_dir: str) -> list[str]:
    """Kaplan-Meier with bands and numbers at risk, calibration at each horizon, decision curve (saved + embedded)."""
    figs: list[str] = []
    add = functools.partial(_add_figure, figs, out_dir)

    for r in ev.models:
        if r.km_fits:
            add(clinical_plots.km_with_risk_table(r.km_fits, f"Kaplan-Meier by risk group: {r.name}", r.logrank_p),
                f"km_{_slug(r.name)}.png",
                f"Cumulative incidence of fracture (1 − Kaplan-Meier) by risk group of {r.name}; shaded: "
                "pointwise 95% CI (log(−log), Greenwood variance); below: patients still at risk.")
    cal_models = [(r.name, r.calibration_at) for r in ev.models if r.calibration_at]
    if cal_models:
        groups = max(len(c.n) for _, cals in cal_models for c in cals)
        add(clinical_plots.calibration_panels(cal_models), "calibration.png",
            f"Mean predicted risk against observed risk (Kaplan-Meier, 95% CI) in {groups} quantile groups of "
            "predicted risk at each horizon; log-risk models are turned into t-year risks with a Breslow baseline. "
            "Points on the dashed line: predicted risk matches what happened.")
    dcs = [(r.name, r.decision) for r in ev.models if r.decision is not None]
    horizons = {dc.horizon for _, dc in dcs}
    if len(horizons) > 1:  # one plot per horizon: curves at different horizons do not share axes
        main = max(horizons, key=lambda h: sum(dc.horizon == h for _, dc in dcs))
        dcs = [(n, dc) for n, dc in dcs if dc.horizon == main]
    if dcs:
        add(clinical_plots.decision_curves(dcs), "decision_curve.png",
            "Decision curve: net benefit of treating patients whose predicted risk reaches the threshold, against "
            "treating everyone (grey) or no one (black). Net benefit = true positives − false positives × "
            "threshold odds, per patient, with the event rate by the horizon from Kaplan-Meier. A model helps at "
            "the thresholds where its curve lies above both.")
    return figs


def render_report(ev: Evaluation, out_dir: str, title: str = "raypipe evaluation report",
                  qc_dirs: Sequence[str | os.PathLike[str]] = ()) -> str:
    """The report's HTML text; writes the figures' PNGs into `out_dir` as it goes."""
    pvals = _p_lookup(ev.metrics.get("comparisons", []))
    n_studies = max((r.n_studies for r in ev.models), default=0)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = [f"Evaluated split: {ev.split} \u00b7 {len(ev.models)} model(s) \u00b7 up to {n_studies} studies "
                f"\u00b7 reference model: {ev.reference}", f"Created {created} \u00b7 bootstrap resamples: {ev.n_boot}"]
    sections: list[str] = []
    nav: list[tuple[str, str]] = []

    def add(anchor: str, title_: str, *parts: str) -> None:
        if any(parts):
            sections.append(H.section(title_, *parts, anchor=anchor))
            nav.append((anchor, title_))

    add("models", "Models and inputs", _inputs_table(ev), _sources_table(ev))
    add("binary", "Performance: binary outcome", _binary_table(ev, pvals))
    add("survival", "Performance: time to fracture", _survival_table(ev, pvals), _td_auroc_table(ev))
    if getattr(ev, "ct_tables", None):
        from raypipe.report.ct_tables import render_ct_tables

        add("ct", "CT: image vs clinical models", *render_ct_tables(ev.ct_tables))
    if getattr(ev, "xray_tables", None):
        from raypipe.report.xray_tables import render_xray_tables

        add("xray", "X-ray: preprocessing variants and C-index comparisons", *render_xray_tables(ev.xray_tables))
    add("groups", "Risk stratification", *_risk_group_tables(ev))
    clinical = _clinical_figures(ev, out_dir)
    add("clinical", "Clinical usefulness: survival, calibration, decision curve",
        f'<div class="figures">{"".join(clinical)}</div>' if clinical else "")
    add("characteristics", "Clinical characteristics", *(_characteristics_html(t) for t in ev.characteristics))
    figs = _figures(ev, out_dir)
    add("figures", "Figures", f'<div class="figures">{"".join(figs)}</div>' if figs else "")
    add("qc", "Preprocessing QC", *qc_section_parts(preprocessing_dirs(ev.sources, qc_dirs), out_dir))
    notes = [*ev.notes, *(f"{r.name}: {n}" for r in ev.models for n in r.notes)]
    if notes:
        add("notes", "Notes", '<ul class="notes">' + "".join(f"<li>{H.esc(n)}</li>" for n in notes) + "</ul>")
    return H.page(title, "\n".join(sections), subtitle, nav)


def build_report(ev: Evaluation, out_dir: str | os.PathLike[str], title: str = "raypipe evaluation report",
                 qc_dirs: Sequence[str | os.PathLike[str]] = ()) -> str:
    """Write report.html (self-contained: PNGs embedded as data URIs, also saved beside it); return its path.

    `qc_dirs`: preprocessing output folders whose QC (qc.csv, contact sheet) the report shows, besides those
    the prediction files' runs name.
    """
    out = os.fspath(out_dir)
    storage.makedirs(out)
    text = render_report(ev, out, title, qc_dirs)
    path = storage.join(out, REPORT_NAME)
    storage.atomic_write_text(path, text)
    logger.info("wrote report %s (%d KiB)", path, len(text) // 1024)
    return path
