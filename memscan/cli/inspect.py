"""`memscan verify` and `memscan info`: check and describe a dataset folder."""

from __future__ import annotations

import click

from memscan.cli.render import print_summary


@click.command()
@click.argument("directory", type=click.Path())
def verify(directory: str) -> None:
    """Check a dataset against its manifest: counts, checksums, schema. Exit 1 on any problem."""
    from memscan import store
    from memscan.errors import DataError

    problems = store.verify(directory)
    if problems:
        for problem in problems:
            click.echo(f"memscan: {directory}: {problem}", err=True)
        raise DataError(f"{directory} failed verification ({len(problems)} problem{'s' * (len(problems) > 1)})")
    manifest = store.read_manifest(directory)
    rows = sum(manifest["counts"]["rows"].values())
    click.echo(f"ok: {directory}: {rows:,} rows in {len(manifest['shards'])} shards, checksums match")


@click.command()
@click.argument("directory", type=click.Path())
def info(directory: str) -> None:
    """Print a dataset's manifest summary."""
    from memscan import store

    print_summary(directory, store.read_manifest(directory))
