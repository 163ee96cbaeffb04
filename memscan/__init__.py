"""memscan: how a language model memorizes, measured with nearest neighbours over its activations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from memscan.query import RunTables


def load(run_dir: Any) -> RunTables:
    """A `memscan query` run folder's tables as pandas DataFrames (see memscan.query.load)."""
    from memscan.query import load as load_run

    return load_run(run_dir)
