"""`memscan index`: a FAISS index over one split and layer of a dataset."""

from __future__ import annotations

import click

from memscan.cli.options import Command, allow_other_files, device, index_memory, overwrite, seed
from memscan.cli.ray_flags import engine_of, ray_flags


@click.command(cls=Command)
@click.argument("data_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@click.option("--split", default="train", show_default=True, help="Split whose vectors are the patterns.")
@click.option("--layer", type=int, default=None, help="Layer (block, for a --sites site) to index [default: the last].")
@click.option("--site", default=None,
              help="Site to index (hidden, attn_out, mlp_hidden, module:PATH, ...) [default: hidden where stored].")
@click.option("--factory", default="auto", show_default=True,
              help="auto | Flat | IVF<nlist>,Flat | IVF<nlist>,PQ<m> | HNSW<M> | any FAISS factory string.")
@click.option("--metric", default="l2", show_default=True, type=click.Choice(["l2", "ip"]))
@device
@index_memory
@click.option("--train-size", type=int, default=None, help="IVF training sample [default: 64 per list].")
@click.option("--target-recall", type=float, default=0.95, show_default=True,
              help="1-recall@1 the chosen --nprobe / --ef-search reaches on a sample of the patterns.")
@click.option("--nprobe", type=int, default=None, help="IVF lists searched [default: tuned to --target-recall].")
@click.option("--ef-search", type=int, default=None, help="HNSW search depth [default: tuned to --target-recall].")
@click.option("--eval-recall", type=int, default=0, show_default=True,
              help="Queries for recall against exact search, written into index.json.")
@seed
@click.option("--shards", type=int, default=1, show_default=True,
              help="Copies of the trained index, each over one range of rows (with --engine ray: one per actor).")
@overwrite
@allow_other_files
@ray_flags
def index(data_dir: str, out: str, overwrite: bool, allow_other_files: bool, engine: str, address: str | None,
          num_workers: int, gpus_per_worker: float, cpus_per_worker: int, **settings: object) -> None:
    """Build a FAISS index (GPU when present) and record its provenance and checksums in index.json."""
    from memscan.knn.index import IndexSettings, build

    index_settings = IndexSettings(**settings)  # type: ignore[arg-type]  # checked by the library
    runner = engine_of(engine, address, num_workers, gpus_per_worker, cpus_per_worker)
    info = build(data_dir, out, index_settings, overwrite=overwrite, engine=runner, allow_other_files=allow_other_files)
    shards = len(info["shards"])
    click.echo(f"index     {out}: {info['ntotal']:,} vectors of n={info['n']}, {info['factory']} ({info['metric']}), "
               f"{info['device']}{f', {shards} shards' if shards > 1 else ''}{' on Ray' * (engine == 'ray')}, "
               f"built in {info['build']['total_seconds']:.1f} s")
    click.echo(f"why       {info['factory_reason']}")
    if info["tuning"]:
        t = info["tuning"]
        for sweep in t["sweeps"]:
            name = sweep["parameter"]
            curve = ", ".join(f"{value}: {recall:.3f}" for value, recall in zip(sweep["curve"][name],
                                                                               sweep["curve"]["recall"]))
            click.echo(f"tuned     {name} {sweep['chosen']} ({'reaches' if sweep['reached'] else 'DOES NOT reach'} "
                       f"1-recall@1 {t['target_recall']} on {t['queries']:,} patterns; {curve})")
    if info["recall"]:
        r = info["recall"]
        click.echo(f"recall    1-recall@1 {r['recall_1_at_1']:.3f}, {r['k']}-recall@{r['k']} {r['recall_k_at_k']:.3f} "
                   f"over {r['queries']} queries ({r['search'] or 'exact'})")
