"""`memscan extract`: activations of a causal LM over a text source, as Parquet shards."""

from __future__ import annotations

import click

from memscan.cli.options import Command, allow_other_files, overwrite, settings_options
from memscan.cli.ray_flags import engine_of, ray_flags
from memscan.cli.render import print_summary
from memscan.extract import ExtractSettings
from memscan.extract import extract as run


def _help(name: str) -> str:
    """The help text of an ExtractSettings field (its flag is declared by hand: a required option)."""
    return str(ExtractSettings.__dataclass_fields__[name].metadata["help"])


@click.command(cls=Command)
@click.option("--model", required=True, help=_help("model"))
@click.option("--source", required=True, help=_help("source"))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write (or resume).")
@settings_options(ExtractSettings, skip=("model", "source"))
@click.option("--no-loss", is_flag=True, help="Skip the next-token loss (and the LM head).")
@overwrite
@allow_other_files
@ray_flags
def extract(out: str, overwrite: bool, allow_other_files: bool, no_loss: bool, engine: str, address: str | None,
            num_workers: int, gpus_per_worker: float, cpus_per_worker: int, **settings: object) -> None:
    """Extract activations at chosen layers and positions, with token ids and per-token loss."""
    runner = engine_of(engine, address, num_workers, gpus_per_worker, cpus_per_worker)
    result = run(ExtractSettings(loss=not no_loss, **settings), out, overwrite=overwrite,  # type: ignore[arg-type]
                 allow_other_files=allow_other_files, engine=runner)
    print_summary(out, dict(result))
