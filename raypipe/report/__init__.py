"""HTML report (tables and plots) from evaluated prediction files: `build_report(evaluation, out_dir)`."""

from raypipe.report.build import build_report, render_report

__all__ = ["build_report", "render_report"]
