"""`memscan demo`: the README's main job, on the built-in default."""

from __future__ import annotations

import time

import click

from memscan.cli.render import print_summary


@click.command()
@click.option("--out", default="memscan-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the model, the activations and everything after.")
@click.option("--quick", is_flag=True, help="A tiny run (seconds), as the test suite uses.")
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out: str, quick: bool, seed: int) -> None:
    """Build a small GPT-2 on the Question-Formation language and extract its activations."""
    from memscan import demo as pipeline

    started = time.perf_counter()
    result = pipeline.run(out, quick=quick, seed=seed)
    print_summary(str(result.dataset_dir), result.manifest)
    click.echo(f"model     {result.model_dir}")
    click.echo(f"done in {time.perf_counter() - started:.1f} s; next: `memscan info {result.dataset_dir}`")
