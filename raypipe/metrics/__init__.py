"""Evaluation metrics on numpy arrays; results are frozen dataclasses with named fields.

Binary: `auroc_ci`, `delong_test`, `binary_metrics(_ci)`, `youden_threshold`.
Survival: `c_index`, `concordance_ci`, `c_index_uno`, `td_auroc`, `integrated_brier_score`,
`kaplan_meier`, `logrank_test`, `cox_hazard_ratios`, `breslow_baseline`.
Clinical usefulness: `net_benefit`, `net_benefit_survival` (decision curves), `survival_calibration`.
Stratification (Diff-X): `risk_groups`, `group_incidence`, `group_hazard_ratios`.
Images and agreement: `psnr`, `ssim`, `ms_ssim`, `bland_altman`, `correlation_ci`.
metrics.json: `binary_summary`, `survival_summary`, `hazard_ratio_summary`, `metric_summary`, `to_json_dict`.
"""

from raypipe.metrics.agreement import BlandAltman, Correlation, bland_altman, correlation_ci
from raypipe.metrics.binary import (
    BinaryMetrics,
    BinaryMetricsCI,
    DeLongResult,
    auroc,
    auroc_bootstrap,
    auroc_ci,
    auroc_delong_ci,
    binary_metrics,
    binary_metrics_ci,
    delong_covariance,
    delong_test,
    youden_threshold,
)
from raypipe.metrics.bootstrap import (
    MetricCI,
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_replicates,
    bootstrap_weights,
    percentile_ci,
    unit_counts,
)
from raypipe.metrics.calibration import CalibrationGroups, survival_calibration
from raypipe.metrics.decision import DecisionCurve, net_benefit, net_benefit_survival
from raypipe.metrics.image import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_scales, psnr, ssim
from raypipe.metrics.stratification import (
    RISK_GROUPS,
    GroupIncidence,
    group_hazard_ratios,
    group_incidence,
    risk_groups,
)
from raypipe.metrics.summary import (
    binary_summary,
    comparison_entry,
    hazard_ratio_summary,
    metric_summary,
    survival_summary,
    time_label,
    to_json_dict,
)
from raypipe.metrics.survival import (
    BreslowBaseline,
    BrierScore,
    Concordance,
    CoxSummary,
    HazardRatio,
    KaplanMeier,
    LogRankResult,
    TimeDependentAUROC,
    breslow_baseline,
    c_index,
    c_index_uno,
    concordance_ci,
    cox_hazard_ratios,
    integrated_brier_score,
    kaplan_meier,
    logrank_test,
    td_auroc,
)

__all__ = [
    "MS_SSIM_WEIGHTS",
    "RISK_GROUPS",
    "BinaryMetrics",
    "BinaryMetricsCI",
    "BlandAltman",
    "BreslowBaseline",
    "CalibrationGroups",
    "BrierScore",
    "Concordance",
    "Correlation",
    "CoxSummary",
    "DeLongResult",
    "DecisionCurve",
    "GroupIncidence",
    "HazardRatio",
    "KaplanMeier",
    "LogRankResult",
    "MetricCI",
    "TimeDependentAUROC",
    "auroc",
    "auroc_bootstrap",
    "auroc_ci",
    "auroc_delong_ci",
    "binary_metrics",
    "binary_metrics_ci",
    "binary_summary",
    "bland_altman",
    "bootstrap_ci",
    "bootstrap_indices",
    "bootstrap_replicates",
    "bootstrap_weights",
    "breslow_baseline",
    "c_index",
    "c_index_uno",
    "comparison_entry",
    "concordance_ci",
    "correlation_ci",
    "cox_hazard_ratios",
    "delong_covariance",
    "delong_test",
    "group_hazard_ratios",
    "group_incidence",
    "hazard_ratio_summary",
    "integrated_brier_score",
    "kaplan_meier",
    "logrank_test",
    "metric_summary",
    "net_benefit",
    "net_benefit_survival",
    "ms_ssim",
    "ms_ssim_scales",
    "percentile_ci",
    "psnr",
    "risk_groups",
    "ssim",
    "survival_calibration",
    "survival_summary",
    "td_auroc",
    "time_label",
    "to_json_dict",
    "unit_counts",
    "youden_threshold",
]
