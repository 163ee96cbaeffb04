"""`memscan verify` and `memscan info`: check and describe any memscan folder, whatever its kind."""

from __future__ import annotations

import click

from memscan import catalog, folders
from memscan.cli.options import Command
from memscan.cli.render import print_summary
from memscan.errors import DataError


@click.command(cls=Command)
@click.argument("directory", type=click.Path())
def verify(directory: str) -> None:
    """Check any memscan folder against its record: files, sizes, checksums, the kind's own checks. Exit 1 on
    any problem, naming the file."""
    kind, problems, checked = catalog.verify(directory)
    if problems:
        for problem in problems:
            click.echo(f"memscan: {directory}: {problem}", err=True)
        raise DataError(f"{directory} ({kind}) failed verification ({len(problems)} problem{'s' * (len(problems) > 1)})")
    click.echo(f"ok: {directory}: {kind}: {checked}, checksums match")


@click.command(cls=Command)
@click.argument("directory", type=click.Path())
def info(directory: str) -> None:
    """Describe any memscan folder: its kind and record (a dataset's manifest in full)."""
    kind, record, line = catalog.describe(directory)
    if kind is folders.DATASET:
        print_summary(directory, record)
        return
    click.echo(f"{kind.name:<9} {directory}: {line}")
    click.echo(f"format    {record['format']} version {record.get('format_version', 1)}"
               if "format" in record else "format    (written before records named their format)")
    listed = [entry["name"] for entry in folders.entries(kind, record)]
    if listed:
        click.echo(f"files     {', '.join(listed)}")
