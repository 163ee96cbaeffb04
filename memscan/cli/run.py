"""`memscan run`: an experiment file, checked as a whole, then its stages, each only where needed."""

from __future__ import annotations

import shlex

import click

from memscan import experiments
from memscan.cli.options import Command, allow_other_files, overwrite
from memscan.experiments import comparison
from memscan.report import PAGE


@click.command(cls=Command)
@click.argument("experiment")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder (one folder per stage inside) [default: the experiment's name].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a key: query.k=20, extract.layers=all, 'train={n_layer=2, n_embd=32}' (a table "
                   "merges), model.id= (nothing: the key's default). Repeat it.")
@click.option("--check", is_flag=True, help="Check the experiment and print it resolved; run nothing.")
@overwrite
@allow_other_files
def run(experiment: str, out: str | None, sets: tuple[str, ...], check: bool, overwrite: bool,
        allow_other_files: bool) -> None:
    """Run EXPERIMENT (a .toml file, or a shipped one by name: demo, bai2024-radius, ...) into --out."""
    loaded = experiments.load(experiment, sets)
    if check:
        click.echo(experiments.resolved_text(loaded), nl=False)
        return
    folder = out or loaded.name
    for outcome in experiments.run(loaded, folder, overwrite=overwrite, allow_other_files=allow_other_files):
        label = outcome.variant or loaded.name
        ran = ", ".join(outcome.ran) or "nothing (every stage is up to date)"
        kept = f"; up to date: {', '.join(outcome.kept)}" if outcome.kept and outcome.ran else ""
        click.echo(f"{label}: ran {ran}{kept} -> {outcome.folder}")
        for line in comparison.text(outcome.comparison) if outcome.comparison else ():
            click.echo(f"          {line}")
    click.echo(f"report    {folder}/{PAGE} (a page per stage, linked)")
    rerun = shlex.join(["memscan", "run", f"{folder}/experiment.toml", "--out", folder])
    click.echo(f"resolved  {folder}/experiment.toml (`{rerun}` reruns it)")
