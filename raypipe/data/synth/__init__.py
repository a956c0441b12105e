"""Synthetic cohorts (CT DICOM series + TotalSegmentator-style masks, lateral radiographs + keypoints,
clinical variables and Cox-model outcomes) for demos, tests and benchmarks. See docs/synthetic_cohort.md."""
from .cohort import MANIFEST_COLUMNS, draw_clinical, synth_cohort

__all__ = ["MANIFEST_COLUMNS", "draw_clinical", "synth_cohort"]
