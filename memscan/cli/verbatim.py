"""`memscan verbatim`: does the model reproduce a chunk's continuation from its first tokens?"""

from __future__ import annotations

import click

from memscan.cli.options import Command, allow_other_files, overwrite, settings_options
from memscan.report import PAGE, render_verbatim
from memscan.verbatim import VerbatimSettings, run


@click.command(cls=Command)
@click.argument("data_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the results into.")
@settings_options(VerbatimSettings)
@overwrite
@allow_other_files
def verbatim(data_dir: str, out: str, overwrite: bool, allow_other_files: bool, **settings: object) -> None:
    """Greedy extraction of sampled train and test chunks: leading match, match fraction, extractable."""
    result = run(VerbatimSettings(data=data_dir, **settings), out, overwrite=overwrite,  # type: ignore[arg-type]
                 allow_other_files=allow_other_files)
    render_verbatim(out, allow_other_files)
    click.echo(f"verbatim  {out}: greedy decoding in {result.dtype}")
    for split, row in result.splits.items():
        match, rate = row["match_fraction"], row["extractable_rate"]
        click.echo(f"{split:<6} {row['chunks']:,} chunks: match fraction {match['value']:.3f} "
                   f"[{match['low']:.3f}, {match['high']:.3f}], extractable {rate['value']:.3f} "
                   f"[{rate['low']:.3f}, {rate['high']:.3f}]")
    click.echo(f"report    {out}/{PAGE}")
