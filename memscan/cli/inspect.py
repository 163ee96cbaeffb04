"""`memscan verify` and `memscan info`: check any memscan folder, describe a dataset."""

from __future__ import annotations

from pathlib import Path

import click

from memscan.cli.render import print_summary


def _check(directory: Path) -> tuple[list[str], str]:
    """(problems, what was found sound) for the folder its marker names: a dataset (manifest.json),
    an index (index.json) or a `memscan query` run (summary.json)."""
    from memscan import query, store
    from memscan.errors import DataError
    from memscan.knn import index

    kinds = ((store.MANIFEST, store.verify, _dataset_line), (index.INFO_FILE, index.verify, _index_line),
             (query.SUMMARY, query.verify, _run_line))
    for marker, check, describe in kinds:
        if (directory / marker).exists():
            problems = check(directory)
            return problems, "" if problems else describe(directory)
    if any((directory / name).exists() for name in query.TABLE_FILES):
        return query.verify(directory), ""   # tables that no summary vouches for: an incomplete run
    raise DataError(f"'{directory}' is not a memscan dataset, index or run folder: it has no "
                    f"{store.MANIFEST}, {index.INFO_FILE} or {query.SUMMARY}")


def _dataset_line(directory: Path) -> str:
    from memscan import store

    manifest = store.read_manifest(directory)
    return f"{sum(manifest['counts']['rows'].values()):,} rows in {len(manifest['shards'])} shards, checksums match"


def _index_line(directory: Path) -> str:
    from memscan.knn import index

    info = index.read_info(directory)
    shards = len(info["shards"])
    return (f"index of {info['ntotal']:,} vectors ({info['factory']}, {shards} shard{'s' * (shards > 1)}), "
            "checksums match, its dataset unchanged")


def _run_line(directory: Path) -> str:
    from memscan import query

    layers = len(query.read_summary(directory)["layers"])
    return f"run of {layers} layer{'s' * (layers > 1)} and {len(query.TABLES)} tables, checksums match"


@click.command()
@click.argument("directory", type=click.Path())
def verify(directory: str) -> None:
    """Check a dataset, index or run folder against its record: files, sizes, checksums. Exit 1 on any problem."""
    from memscan.errors import DataError

    problems, checked = _check(Path(directory))
    if problems:
        for problem in problems:
            click.echo(f"memscan: {directory}: {problem}", err=True)
        raise DataError(f"{directory} failed verification ({len(problems)} problem{'s' * (len(problems) > 1)})")
    click.echo(f"ok: {directory}: {checked}")


@click.command()
@click.argument("directory", type=click.Path())
def info(directory: str) -> None:
    """Print a dataset's manifest summary."""
    from memscan import store

    print_summary(directory, store.read_manifest(directory))
