"""memscan: how a language model memorizes, measured with nearest neighbours over its activations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from memscan.catalog import Folder
    from memscan.query import RunTables


def load(directory: Any) -> RunTables | Folder:
    """Any memscan folder's record and tables as pandas DataFrames, with its `kind` (memscan.catalog.load):
    a query run's RunTables (neighbours, queries, patterns, histograms, coverage), every other kind's Folder."""
    from memscan.catalog import load as load_folder   # here, not above: `memscan --help` stays instant

    return load_folder(directory)
