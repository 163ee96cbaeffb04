"""`memscan query` and `memscan report`: the assumption tests, then the page that shows them."""

from __future__ import annotations

import click

from memscan.cli.ray_flags import ray_flags, ray_options


@click.command()
@click.argument("index_dir", type=click.Path())
@click.option("--queries", "queries_dir", required=True, type=click.Path(), help="Dataset holding the queries.")
@click.option("--split", default="test", show_default=True, help="Split of --queries to query with.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours per query and per pattern.")
@click.option("--exact", is_flag=True, help="Exact blockwise search even where the index is approximate.")
@click.option("--beta", type=float, default=1.0, show_default=True, help="Inverse temperature of the energies.")
@click.option("--radius", default="r*", show_default=True, help="Ball radius for A2 and A3: r*, typical or a number.")
@click.option("--epsilon", type=float, default=None, help="Retrieval tolerance [default: 1% of median s_i].")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "gpu"]))
@click.option("--seed", type=int, default=0, show_default=True)
@ray_flags
def query(index_dir: str, queries_dir: str, out: str, engine: str, address: str | None, num_workers: int,
          gpus_per_worker: float, cpus_per_worker: int, **settings: object) -> None:
    """Nearest-neighbour tables, assumption tests A1-A3, energies and the cross-entropy floor."""
    from memscan.query import QuerySettings, run

    options = ray_options(engine, address, num_workers, gpus_per_worker, cpus_per_worker)
    summary = run(index_dir, queries_dir, out, QuerySettings(**settings), ray_options=options)  # type: ignore[arg-type]
    for s in summary["layers"]:
        click.echo(
            f"layer {s['layer']:>3}: typical radius {s['typical_radius']:.3g} vs r* {s['r_star']:.3g} "
            f"({s['typical_over_r_star']:.2f}x); A2 coverage {s['A2']['coverage_at_typical']:.1%}; "
            f"A3 disjoint at r* {s['A3']['disjoint_at_r_star']:.1%}; A1 retrieval {s['A1']['retrieval_rate']:.1%}; "
            f"floor {s['floor']['predicted_floor']:.3g} vs held-out loss {_nats(s['A1']['test_loss'])}")
    click.echo(f"run       {out} (next: `memscan report {out}`)")


@click.command()
@click.argument("run_dir", type=click.Path())
def report(run_dir: str) -> None:
    """Plots and an HTML page for a `memscan query` run folder."""
    from memscan.report import render

    click.echo(f"report    {render(run_dir)}")


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
