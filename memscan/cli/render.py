"""Plain-text rendering shared by the commands."""

from __future__ import annotations

from typing import Any

import click

from memscan import store


def dataset_lines(directory: str, manifest: dict[str, Any]) -> list[str]:
    """What a dataset holds, one line per fact: model, source, shape, rows per split, shards."""
    counts = manifest.get("counts", {})
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    lines = [
        f"dataset   {directory} ({'complete' if manifest['complete'] else 'INCOMPLETE: rerun to resume'})",
        f"model     {manifest['model']['id']} ({manifest['model']['class']}, "
        f"{manifest['model']['num_parameters']:,} parameters, {manifest['dtype']})",
        f"source    {manifest['settings']['source']} (seed {manifest['seed']})",
        f"vectors   positions {manifest['positions']}, chunks of {manifest['chunk_tokens']} tokens",
        *(f"site      {site['name']}: n={site['n']} {manifest['vec_dtype']}, layers {site['layers']}"
          for site in store.sites_of(manifest)),
    ]
    if counts:
        per_split = ", ".join(f"{split} {n:,}" for split, n in counts["chunks"].items())
        rows = sum(counts["rows"].values())
        lines.append(f"chunks    {per_split}")
        lines.append(f"rows      {rows:,} in {len(manifest['shards'])} shards, {total_bytes / 1e6:,.1f} MB")
    return lines


def print_summary(directory: str, manifest: dict[str, Any]) -> None:
    """Prints `dataset_lines`."""
    click.echo("\n".join(dataset_lines(directory, manifest)))
