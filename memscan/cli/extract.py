"""`memscan extract`: activations of a causal LM over a text source, as Parquet shards."""

from __future__ import annotations

import click

from memscan.cli.options import allow_other_files, overwrite
from memscan.cli.ray_flags import engine_of, ray_flags
from memscan.cli.render import print_summary
from memscan.extract import ExtractSettings
from memscan.extract import extract as run


@click.command()
@click.option("--model", required=True, help="Hugging Face model id or local folder (Auto classes).")
@click.option("--source", required=True,
              help="qf[:documents=N,lines=L,gen=F], hf:OWNER/NAME[:CONFIG], or a .txt/.jsonl/.parquet file or folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset folder to write (or resume).")
@click.option("--num-chunks", type=int, default=None, help="Seeded uniform sample of this many chunks [default: all].")
@click.option("--max-documents", type=int, default=None,
              help="Read only the first N documents (the prefix a `memscan train` run used).")
@click.option("--chunk-tokens", type=int, default=256, show_default=True, help="Tokens per chunk (the paper's T_max).")
@click.option("--test-fraction", type=float, default=0.1, show_default=True,
              help="Fraction of documents (by seeded hash) in the test split.")
@click.option("--layers", default=None,
              help="The residual stream (site hidden): last | all | indices like 0,6,-1 | none "
                   "[default: last, or none with --sites].")
@click.option("--sites", default=None,
              help="Sites inside blocks, read in the same forward pass: resid_pre, resid_mid, resid_post, attn_out, "
                   "mlp_out, mlp_hidden with blocks (attn_out:0-5, mlp_hidden:-1, resid_post:all), or module:PATH.")
@click.option("--positions", default="last", show_default=True, help="last | all | every:K.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp16", "fp32"]))
@click.option("--vec-dtype", default="auto", show_default=True, type=click.Choice(["auto", "float16", "float32"]),
              help="Stored vector type; auto is float16 for 16-bit models.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Spread a model larger than one device over the GPUs, CPU memory and disk (accelerate); "
                   "--device then only picks the default --dtype.")
@click.option("--max-memory", default=None,
              help="With --device-map: memory per device for the model, e.g. cpu=2GB,0=20GB (GPU indices, cpu, disk).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Chunks per forward pass.")
@click.option("--shard-rows", type=int, default=65536, show_default=True, help="Rows per Parquet shard.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-loss", is_flag=True, help="Skip the next-token loss (and the LM head).")
@click.option("--text-column", default="text", show_default=True, help="Text column of .jsonl/.parquet/hf sources.")
@click.option("--split", default=None, help="Split of an hf: dataset to read [default: train]; other sources have none.")
@click.option("--revision", default=None, help="Revision of the hub model and dataset.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own code to run.")
@click.option("--split-column", default=None,
              help="Membership from a column of a .jsonl/.parquet/hf: source: member/non-member, train/test, 1/0, "
                   "true/false (train = in the model's training data) [default: seeded hash split].")
@click.option("--members", default=None, type=click.Path(dir_okay=False),
              help="A text file of member document ids (or --key-column keys), one a line; every other document is test.")
@click.option("--key-column", default=None, help="The source column whose values the --members file lists.")
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
