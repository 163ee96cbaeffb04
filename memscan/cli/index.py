"""`memscan index`: a FAISS index over one split and layer of a dataset."""

from __future__ import annotations

import click

from memscan.cli.options import Command, allow_other_files, overwrite, settings_options
from memscan.cli.ray_flags import engine_of, ray_flags
from memscan.knn.index import IndexResult, IndexSettings, build


@click.command(cls=Command)
@click.argument("data_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder to write.")
@settings_options(IndexSettings)
@overwrite
@allow_other_files
@ray_flags
def index(data_dir: str, out: str, overwrite: bool, allow_other_files: bool, engine: str, address: str | None,
          num_workers: int, gpus_per_worker: float, cpus_per_worker: int, **settings: object) -> None:
    """Build a FAISS index (GPU when present) and record its provenance and checksums in index.json."""
    index_settings = IndexSettings(**settings)  # type: ignore[arg-type]  # checked by the library
    runner = engine_of(engine, address, num_workers, gpus_per_worker, cpus_per_worker)
    info = build(data_dir, out, index_settings, overwrite=overwrite, engine=runner, allow_other_files=allow_other_files)
    for line in index_lines(out, info, engine):
        click.echo(line)


def index_lines(out: str, info: IndexResult, engine: str) -> list[str]:
    """What was built, why that factory, how its search parameters were tuned and the recall measured."""
    shards = len(info["shards"])
    lines = [f"index     {out}: {info['ntotal']:,} vectors of n={info['n']}, {info['factory']} ({info['metric']}), "
             f"{info['device']}{f', {shards} shards' if shards > 1 else ''}{' on Ray' * (engine == 'ray')}, "
             f"built in {info['build']['total_seconds']:.1f} s",
             f"why       {info['factory_reason']}"]
    if info["tuning"]:
        t = info["tuning"]
        for sweep in t["sweeps"]:
            name = sweep["parameter"]
            curve = ", ".join(f"{value}: {recall:.3f}" for value, recall in zip(sweep["curve"][name],
                                                                               sweep["curve"]["recall"]))
            lines.append(f"tuned     {name} {sweep['chosen']} ({'reaches' if sweep['reached'] else 'DOES NOT reach'} "
                         f"1-recall@1 {t['target_recall']} on {t['queries']:,} patterns; {curve})")
    if info["recall"]:
        r = info["recall"]
        lines.append(f"recall    1-recall@1 {r['recall_1_at_1']:.3f}, {r['k']}-recall@{r['k']} "
                     f"{r['recall_k_at_k']:.3f} over {r['queries']} queries ({r['search'] or 'exact'})")
    return lines
