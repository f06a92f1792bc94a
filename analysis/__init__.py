"""Reading run folders into pandas, summarising and fitting block smoothness, and the
smoothness report (Markdown + self-contained HTML).

Importing this package does not import matplotlib; :func:`write_report` imports
:mod:`figures` when called.
"""

from analysis.fit import AffineFit, PowerFit, fit_blocks, fit_smoothness, fit_table
from analysis.report import write_report
from analysis.runs import (
    CALIBRATION_COLUMNS,
    METRICS_COLUMNS,
    SMOOTHNESS_COLUMNS,
    Run,
    load_run,
    load_runs,
    runs_frame,
)
from analysis.summary import block_summary, compare_methods, select_norm, smoothness_ratio

__all__ = [
    "CALIBRATION_COLUMNS",
    "METRICS_COLUMNS",
    "SMOOTHNESS_COLUMNS",
    "AffineFit",
    "PowerFit",
    "Run",
    "block_summary",
    "compare_methods",
    "fit_blocks",
    "fit_smoothness",
    "fit_table",
    "load_run",
    "load_runs",
    "runs_frame",
    "select_norm",
    "smoothness_ratio",
    "write_report",
]
