"""The report layer: every plot and page memscan draws, one module per page, above the stages it reads.

`render` (memscan.report.run) draws a `memscan query` run folder's page, `render_scores`,
`render_saturation` and `render_assoc` the plots of a score, saturation and assoc sweep
folder; each lists what it drew in the folder's report.json (memscan.report.plots). No
stage imports this package: a caller runs the stage, then its renderer.
"""

from __future__ import annotations

from memscan.report.assoc import render_assoc
from memscan.report.run import COMPARISON, IMAGES, PAGE, ROWS, SATURATION_DIR, _comparison_table, render
from memscan.report.saturation import render_saturation
from memscan.report.scores import bridge_points, render_scores

# _comparison_table: the run page's comparison with the paper, which tests/test_experiment.py reads here.
__all__ = ["COMPARISON", "IMAGES", "PAGE", "ROWS", "SATURATION_DIR", "_comparison_table", "bridge_points", "render",
           "render_assoc", "render_saturation", "render_scores"]
