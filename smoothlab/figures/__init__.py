"""Paper figures, one module per figure, all in the style of :mod:`smoothlab.figures.style`.

Every figure function takes data (frames or runs from :mod:`analysis`) and an
``out_stem``, writes ``<out_stem>.png`` (200 dpi) and ``<out_stem>.pdf``, closes the figure
and returns the written paths; empty data or a missing block raise ``ValueError`` naming
what was found. Importing this package selects matplotlib's headless ``Agg`` backend.
"""

from smoothlab.figures.example23 import GDTrajectory, example23, quadratic, run_gd
from smoothlab.figures.fig1 import fig1a, fig1b
from smoothlab.figures.fig2 import fig2
from smoothlab.figures.fig3 import fig3
from smoothlab.figures.fitplot import fig_fit
from smoothlab.figures.modules import fig_module_heatmap, fig_modules
from smoothlab.figures.report import write_report
from smoothlab.figures.style import block_color, method_color, paper_style, savefig

__all__ = [
    "GDTrajectory",
    "block_color",
    "example23",
    "fig1a",
    "fig1b",
    "fig2",
    "fig3",
    "fig_fit",
    "fig_module_heatmap",
    "fig_modules",
    "method_color",
    "paper_style",
    "quadratic",
    "run_gd",
    "savefig",
    "write_report",
]
