"""`memscan verbatim`: does the model reproduce a chunk's continuation from its first tokens?"""

from __future__ import annotations

import click

from memscan.cli.options import allow_other_files, overwrite
from memscan.verbatim import VerbatimSettings, run


@click.command()
@click.argument("data_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the results into.")
@click.option("--num-chunks", type=int, default=100, show_default=True, help="Seeded sample of chunks per split.")
@click.option("--prompt-tokens", type=int, default=32, show_default=True, help="Prompt: the chunk's first P tokens.")
@click.option("--suffix-tokens", type=int, default=32, show_default=True, help="Tokens decoded greedily and compared.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Prompts decoded at once.")
@click.option("--resamples", type=int, default=1000, show_default=True, help="Bootstrap resamples of each interval.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
              help="Decoding precision; auto picks as extract does (bf16 on GPUs and on CPUs that run it natively).")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own code to run.")
@click.option("--allow-other-model", is_flag=True,
              help="Use the dataset's model even when its weights differ from the manifest's weights_sha256 "
                   "(the summary records it).")
@overwrite
@allow_other_files
def verbatim(data_dir: str, out: str, overwrite: bool, allow_other_files: bool, **settings: object) -> None:
    """Greedy extraction of sampled train and test chunks: leading match, match fraction, extractable."""
    result = run(VerbatimSettings(data=data_dir, **settings), out, overwrite=overwrite,  # type: ignore[arg-type]
                 allow_other_files=allow_other_files)
    click.echo(f"verbatim  {out}: greedy decoding in {result.dtype}")
    for split, row in result.splits.items():
        match, rate = row["match_fraction"], row["extractable_rate"]
        click.echo(f"{split:<6} {row['chunks']:,} chunks: match fraction {match['value']:.3f} "
                   f"[{match['low']:.3f}, {match['high']:.3f}], extractable {rate['value']:.3f} "
                   f"[{rate['low']:.3f}, {rate['high']:.3f}]")
