"""`memscan train` and `memscan saturation`: controlled memorization experiments."""

from __future__ import annotations

import click

from memscan.cli.options import allow_other_files, overwrite
from memscan.errors import InputError
from memscan.report import render_saturation
from memscan.saturation import SaturationSettings, analyse
from memscan.train import PRESETS, TrainSettings
from memscan.train import train as run


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (log, checkpoints).")
@click.option("--preset", type=click.Choice(["qf-6", "qf-10", "gpt2-small"]), default=None,
              help="The paper's settings; any flag below overrides them.")
@click.option("--source", default=None, help="Text source, as for `memscan extract` [preset's, else required].")
@click.option("--tokens", type=int, default=None, help="Training token budget D (rounded up to whole documents).")
@click.option("--tokenizer", default=None, help="Tokenizer for non-qf sources (hub id or folder).")
@click.option("--n-layer", type=int, default=None)
@click.option("--n-embd", type=int, default=None)
@click.option("--n-head", type=int, default=None)
@click.option("--context", type=int, default=None, help="Chunk length T_max (= n_positions).")
@click.option("--untied", "tie_embeddings", flag_value=False, default=None, help="Untie input and output embeddings.")
@click.option("--batch-size", type=int, default=None)
@click.option("--steps", type=int, default=None, help="Optimizer steps [default: one epoch].")
@click.option("--epochs", type=float, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--warmup-steps", type=int, default=None)
@click.option("--eval-every", type=int, default=None)
@click.option("--test-fraction", type=float, default=None)
@click.option("--dropout", type=float, default=None, help="Dropout probability in [0, 1) [default: 0].")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp32"]), default=None)
@click.option("--device", default=None, help="auto | cpu | cuda[:N].")
@click.option("--seed", type=int, default=None)
@overwrite
@allow_other_files
def train(out: str, preset: str | None, overwrite: bool, allow_other_files: bool, **flags: object) -> None:
    """Train a GPT-2 on a token budget; resumes from the last checkpoint when rerun."""
    values = {**(PRESETS[preset] if preset else {}), **{k: v for k, v in flags.items() if v is not None}}
    for required in ("source", "tokens"):
        if required not in values:
            raise InputError(f"--{required} is required (or a --preset that sets it)")
    info = run(TrainSettings(**values), out, overwrite=overwrite,  # type: ignore[arg-type]
               allow_other_files=allow_other_files)
    data = info.data
    click.echo(f"trained   {info.steps:,} steps on {data['train_tokens']:,} tokens "
               f"({data['documents']:,} documents): train loss {info.final_train_loss:.3f}, "
               f"held-out {info.final_heldout_loss:.3f}")
    click.echo(f"model     {info.final}")
    click.echo(f"extract   memscan extract --model {info.final} --source {data['source']} "
               f"--max-documents {data['documents']} --chunk-tokens {data['context']} "
               f"--test-fraction {data['test_fraction']} --seed {data['seed']} ...")


@click.command()
@click.argument("target", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--source", default=None, help="Text for the hidden states [default: the run's source, else qf].")
@click.option("--chunk-tokens", type=int, default=None)
@click.option("--chunks", type=int, default=8, show_default=True)
@click.option("--scale", type=float, default=1000.0, show_default=True, help="c in f(x; c theta).")
@click.option("--seed", type=int, default=0, show_default=True)
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
