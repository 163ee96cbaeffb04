"""What every report page shares: figures embedded in the page, and report.json, the record of what a page wrote.

A page is drawn into a folder beside that folder's own record (memscan.folders.REPORT is an
attached kind): report.json lists the files the page wrote (report.html, and a run's
comparison.json), and a page drawn again replaces them; files an earlier report.json listed
and this one does not (the PNGs of older pages) go. Figures are drawn on matplotlib Figure
objects (no pyplot state, no backend chosen) and embedded in the page as PNG data URIs, so a
page moved or mailed keeps its plots.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from memscan import files, folders


def axes(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure of its own and its one set of axes: no pyplot state and no backend chosen, so drawing a report
    leaves a notebook's plots alone."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def embed(fig: Figure) -> str:
    """A figure as a `data:image/png;base64,...` URI for an <img> of the page (bbox tight: long labels stay whole)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=96, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@contextlib.contextmanager
def report_files(folder: Path, names: tuple[str, ...], allow_other_files: bool) -> Iterator[list[str]]:
    """Claim `folder` for a report drawn from its record (memscan.folders.REPORT, beside that record), collect
    the names the block writes, then sign report.json listing them; a report's earlier files not written again go."""
    claimed = folders.claim(folder, folders.REPORT, names, folders.identity(folder), overwrite=True,
                            allow_other_files=allow_other_files)
    written: list[str] = []
    yield written
    entries = [files.file_entry(folder / name) for name in written]
    folders.write_record(folder, folders.REPORT, {"fingerprint": folders.identity(folder), "files": entries},
                         claimed.previous)

