"""Reading run folders into pandas (through the one schema, :mod:`smoothlab.runlog`),
summarising and fitting block smoothness: the tables. The report, which also needs the
figures, lives in the presentation layer: :func:`smoothlab.figures.report.write_report`.

Importing this package imports neither matplotlib nor torch.
"""

from smoothlab.analysis.fit import AffineFit, PowerFit, fit_blocks, fit_smoothness, fit_table
from smoothlab.analysis.modules import module_frame, module_matrix, module_side
from smoothlab.analysis.runs import (
    CALIBRATION_COLUMNS,
    METRICS_COLUMNS,
    SMOOTHNESS_COLUMNS,
    Run,
    load_run,
    load_runs,
    runs_frame,
)
from smoothlab.analysis.summary import block_summary, compare_methods, select_norm, smoothness_ratio

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
    "module_frame",
    "module_matrix",
    "module_side",
    "runs_frame",
    "select_norm",
    "smoothness_ratio",
]
