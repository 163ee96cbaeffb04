"""`memscan train` and `memscan saturation`: controlled memorization experiments."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from memscan.cli.options import Command, allow_other_files, overwrite, settings_options
from memscan.errors import InputError
from memscan.report import render_saturation
from memscan.saturation import SaturationSettings, analyse
from memscan.train import PRESETS, TrainSettings
from memscan.train import train as run


def _help(name: str) -> str:
    """The help text of a TrainSettings field whose flag is declared by hand (required unless a preset sets it)."""
    return str(TrainSettings.__dataclass_fields__[name].metadata["help"])


@click.command(cls=Command)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (log, checkpoints).")
@click.option("--preset", type=click.Choice(tuple(PRESETS)), default=None,
              help="The paper's settings; any flag given below overrides them (the defaults shown do not).")
@click.option("--source", default=None, help=_help("source"))
@click.option("--tokens", type=int, default=None, help=_help("tokens"))
@settings_options(TrainSettings, skip=("source", "tokens"))
@click.option("--untied", is_flag=True, help="Untie input and output embeddings.")
@overwrite
@allow_other_files
def train(out: str, preset: str | None, untied: bool, overwrite: bool, allow_other_files: bool,
          **flags: object) -> None:
    """Train a GPT-2 on a token budget; resumes from the last checkpoint when rerun."""
    values = {**(PRESETS[preset] if preset else {}), **_given(click.get_current_context(), flags)}
    if untied:
        values["tie_embeddings"] = False
    for required in ("source", "tokens"):
        if values.get(required) is None:
            raise InputError(f"--{required} is required (or a --preset that sets it)")
    settings = TrainSettings(**values)  # type: ignore[arg-type]
    info = run(settings, out, overwrite=overwrite, allow_other_files=allow_other_files)
    data = info.data
    click.echo(f"trained   {info.steps:,} steps on {data['train_tokens']:,} tokens "
               f"({data['documents']:,} documents): train loss {info.final_train_loss:.3f}, "
               f"held-out {info.final_heldout_loss:.3f}")
    click.echo(f"model     {info.final}")
    click.echo(f"extract   {extract_command(out, info.final, data, settings)}")


def extract_command(out: str | Path, model: str | Path, data: dict[str, Any], settings: TrainSettings) -> str:
    """The whole `memscan extract` command, each value shell-quoted, that extracts exactly the run's chunks:
    its documents (the prefix it read), chunk length, split rule and seed, into a folder beside the run."""
    run_folder = Path(out)
    if run_folder.name in ("", ".."):
        run_folder = run_folder.resolve()
    words = ["memscan", "extract", "--model", str(model), "--source", str(data["source"]),
             "--out", str(run_folder.parent / f"{run_folder.name}-activations"),
             "--max-documents", str(data["documents"]), "--chunk-tokens", str(data["context"]),
             "--test-fraction", str(data["test_fraction"]), "--seed", str(data["seed"])]
    if settings.text_column != "text":
        words += ["--text-column", settings.text_column]
    if settings.split is not None:
        words += ["--hf-split", settings.split]
    return shlex.join(words)


def _given(context: click.Context, flags: dict[str, object]) -> dict[str, object]:
    """The flags given on the command line (not left at their defaults, which a preset's values override)."""
    return {name: value for name, value in flags.items()
            if context.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}


@click.command(cls=Command)
@click.argument("target", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the analysis into.")
@settings_options(SaturationSettings)
@click.option("--allow-incomplete", is_flag=True,
              help="Analyse an unfinished training run's checkpoints so far (summary.json records it).")
@overwrite
@allow_other_files
def saturation(target: str, out: str, allow_incomplete: bool, overwrite: bool, allow_other_files: bool,
               **settings: object) -> None:
    """Norm growth over a training run's checkpoints, and saturated attention of its model."""
    summary = analyse(target, out, SaturationSettings(**settings), allow_incomplete,  # type: ignore[arg-type]
                      overwrite, allow_other_files)
    render_saturation(out, allow_other_files)
    if summary["norm_growth"]:
        fits = summary["norm_growth"]["fits"]
        click.echo("growth    R^2 " + ", ".join(f"{law} {fit['r2']:.3f}" for law, fit in fits.items()))
    click.echo(f"saturated cosine per layer {', '.join(f'{c:.3f}' for c in summary['layer_cosines'])}")
    click.echo(f"heads     {summary['argmax_heads']} of {summary['heads']} are argmax heads at c={summary['scale']:g}")
