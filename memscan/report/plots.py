"""What every report page shares: saving a figure atomically, and report.json, the record of what a page drew.

A page is drawn into a folder beside that folder's own record (memscan.folders.REPORT is an
attached kind): report.json lists the files the page wrote, and a page drawn again replaces
them (its earlier files not drawn again go). The pages draw with pyplot on the Agg backend, so
they run without a display.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from memscan import files, folders


def axes(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure of its own and its one set of axes: no pyplot state and no backend chosen, so drawing a report
    leaves a notebook's plots alone."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def commit_figure(fig: Figure, path: Path, **savefig: Any) -> str:
    """Save a Figure as PNG atomically (a fresh temporary file, then rename); returns the file's name."""
    fig.tight_layout()
    fig.savefig(files.new_tmp(path), dpi=110, format="png", **savefig)
    files.commit_file(files.tmp_path(path), path)
    return path.name


def save(fig: Figure, path: Path) -> str:
    """Save a figure atomically; returns its name."""
    return commit_figure(fig, path)


@contextlib.contextmanager
def report_files(folder: Path, names: tuple[str, ...], allow_other_files: bool) -> Iterator[list[str]]:
    """Claim `folder` for a report drawn from its record (memscan.folders.REPORT, beside that record), collect
    the names the block writes, then sign report.json listing them; a report's earlier files not drawn again go."""
    claimed = folders.claim(folder, folders.REPORT, names, folders.identity(folder), overwrite=True,
                            allow_other_files=allow_other_files)
    written: list[str] = []
    yield written
    entries = [files.file_entry(folder / name) for name in written]
    folders.write_record(folder, folders.REPORT, {"fingerprint": folders.identity(folder), "files": entries},
                         claimed.previous)
