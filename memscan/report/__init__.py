"""The report layer: one self-contained page per folder, above the stages it reads.

`render_folder` (memscan.report.pages) writes report.html for a memscan folder of any kind;
`render` (memscan.report.run) a `memscan query` run folder's, `render_scores`, `render_verbatim`,
`render_saturation` and `render_assoc` the others'. Each page embeds its figures and lists itself
in the folder's report.json (memscan.report.plots). No stage imports this package: a caller runs
the stage, then its renderer.
"""

from __future__ import annotations

from memscan.report.assoc import render_assoc
from memscan.report.page import PAGE
from memscan.report.pages import RENDERERS, render_dataset, render_experiment, render_folder, render_index, render_training
from memscan.report.run import COMPARISON, ROWS, SATURATION_DIR, _comparison_table, render
from memscan.report.saturation import render_saturation
from memscan.report.scores import bridge_points, render_scores
from memscan.report.verbatim import render_verbatim
from memscan.report.verdicts import THRESHOLDS

# _comparison_table: the run page's comparison with the paper, which tests/test_experiment.py reads here.
__all__ = ["COMPARISON", "PAGE", "RENDERERS", "ROWS", "SATURATION_DIR", "THRESHOLDS", "_comparison_table",
           "bridge_points", "render", "render_assoc", "render_dataset", "render_experiment", "render_folder",
           "render_index", "render_saturation", "render_scores", "render_training", "render_verbatim"]
