"""`memscan query` and `memscan report`: the assumption tests, then the page that shows them (any folder's)."""

from __future__ import annotations

import shlex

import click

from memscan.cli.options import Command, allow_other_files, overwrite, settings_options
from memscan.cli.ray_flags import engine_of, ray_flags
from memscan.layout import SiteKey
from memscan.query import QuerySettings, run
from memscan.report import render_folder
from memscan.wording import floor_text, number


@click.command(cls=Command)
@click.argument("index_dir", type=click.Path())
@click.option("--queries", "queries_dir", required=True, type=click.Path(), help="Dataset holding the queries.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@settings_options(QuerySettings)
@overwrite
@allow_other_files
@ray_flags
def query(index_dir: str, queries_dir: str, out: str, overwrite: bool, allow_other_files: bool, engine: str,
          address: str | None,
          num_workers: int, gpus_per_worker: float, cpus_per_worker: int, **settings: object) -> None:
    """Nearest-neighbour tables, assumption tests A1-A3, energies and the cross-entropy floor."""
    query_settings = QuerySettings(**settings)  # type: ignore[arg-type]  # checked by the library
    runner = engine_of(engine, address, num_workers, gpus_per_worker, cpus_per_worker)
    summary = run(index_dir, queries_dir, out, query_settings, engine=runner, overwrite=overwrite,
                  allow_other_files=allow_other_files)
    if summary["queries_are_patterns"]:
        click.echo(f"queries   split '{query_settings.split}' is the index's own: each query leaves its own row "
                   "out (leave-one-out), so nearest distances are to the nearest OTHER pattern")
    for s in summary["layers"]:
        where = SiteKey(s["site"], s["layer"]).label()
        click.echo(
            f"{where}: typical radius {number(s['typical_radius'])} vs r* {number(s['r_star'])} "
            f"({number(s['typical_over_r_star'], '.2f')}x); "
            f"A2 coverage {number(s['A2']['coverage_at_typical'], '.1%')}; "
            f"A3 disjoint at r* {number(s['A3']['disjoint_at_r_star'], '.1%')}; "
            f"A1 retrieval {number(s['A1']['retrieval_rate'], '.1%')}; "
            f"floor {floor_text(s['floor'])} vs held-out loss {number(s['A1']['test_loss'])}")
    click.echo(f"run       {out} (next: `{shlex.join(['memscan', 'report', out])}`)")


@click.command(cls=Command)
@click.argument("folder", type=click.Path())
@allow_other_files
def report(folder: str, allow_other_files: bool) -> None:
    """One self-contained HTML page, report.html, for any memscan folder (query run, scores, verbatim, saturation,
    assoc sweep, training run, dataset, index; an experiment's links each stage's page), listed in its report.json."""
    click.echo(f"report    {render_folder(folder, allow_other_files=allow_other_files)}")
