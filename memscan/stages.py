"""Every stage memscan runs, in one registry: its settings, the folder kind it writes, the function that computes
it and, apart, the page that renders it. The command line, `memscan run` and `memscan verify` read it.

A stage's compute function writes its folder and returns a typed result (memscan.results.StageResult); its
renderer, where it has one, draws that folder's page afterwards, so no compute stage imports the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import memscan.extract as extract
import memscan.query as query
import memscan.report as report
import memscan.verbatim as verbatim
from memscan import assoc, folders, saturation, score, train
from memscan.knn import index


@dataclass(frozen=True)
class Stage:
    """One stage: the command that runs it, its settings dataclass (None: it has none), the folder kind it
    writes, its compute function and its renderer (None: nothing to draw)."""

    name: str
    settings: type | None
    kind: folders.Kind
    compute: Callable[..., Any]
    render: Callable[..., Any] | None = None


STAGES = {stage.name: stage for stage in (
    Stage("extract", extract.ExtractSettings, folders.DATASET, extract.extract),
    Stage("index", index.IndexSettings, folders.INDEX, index.build),
    Stage("query", query.QuerySettings, folders.QUERY_RUN, query.run, report.render),
    Stage("score", score.ScoreSettings, folders.SCORES, score.score, report.render_scores),
    Stage("verbatim", verbatim.VerbatimSettings, folders.VERBATIM, verbatim.run, report.render_verbatim),
    Stage("report", None, folders.REPORT, report.render_folder),
    Stage("train", train.TrainSettings, folders.TRAINING, train.train),
    Stage("saturation", saturation.SaturationSettings, folders.SATURATION, saturation.analyse,
          report.render_saturation),
    Stage("assoc", assoc.SweepSettings, folders.ASSOC, assoc.run_sweep, report.render_assoc),
)}


def writing(kind: folders.Kind) -> Stage | None:
    """The stage whose compute function writes folders of `kind` (None for an experiment's folder)."""
    return next((stage for stage in STAGES.values() if stage.kind == kind and stage.name != "report"), None)
