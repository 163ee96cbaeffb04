"""Experiments as files: `memscan run EXPERIMENT.toml` runs a whole pipeline, checked before it starts
and resumed stage by stage (docs/experiments.md). The paper's experiments ship in `shipped/`
(the repository's experiments/ folder).
"""

from __future__ import annotations

from memscan.experiments.runner import Outcome, resolved_text, run
from memscan.experiments.spec import Experiment, load, locate, shipped_names

__all__ = ["Experiment", "Outcome", "load", "locate", "resolved_text", "run", "shipped_names"]
