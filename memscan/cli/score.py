"""`memscan score`: membership scores and the activation geometry on a dataset's chunks, with their ROC metrics."""

from __future__ import annotations

from typing import Any

import click

from memscan.cli.options import Command, allow_other_files, overwrite, settings_options
from memscan.report import render_scores
from memscan.score import ScoreSettings
from memscan.score import score as run


@click.command(cls=Command)
@click.argument("data_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the scores into.")
@click.option("--query-run", multiple=True, type=click.Path(file_okay=False),
              help=ScoreSettings.__dataclass_fields__["query_run"].metadata["help"])
@settings_options(ScoreSettings, skip=("query_run",))
@overwrite
@allow_other_files
def score(data_dir: str, out: str, overwrite: bool, allow_other_files: bool, **settings: object) -> None:
    """Rate every train and test chunk (each score's member side recorded) and measure its AUC and TPR at 1% /
    0.1% FPR."""
    result = run(ScoreSettings(data=data_dir, **settings), out,  # type: ignore[arg-type]
                 overwrite=overwrite, allow_other_files=allow_other_files)
    render_scores(out, allow_other_files)
    metrics = result.metrics
    click.echo(f"scores    {out}: {result.chunks['train']:,} train, {result.chunks['test']:,} test chunks")
    for name, row in metrics["scores"].items():
        click.echo(f"{name:<16} AUC {_estimate(row['auc'])}   TPR@1%FPR {_estimate(row['tpr@1%fpr'])}")
    for name, why in metrics["skipped"].items():
        click.echo(f"{name:<16} not rated: {why}")
    if "geometry" in metrics:
        _echo_views(metrics["geometry"])


def _echo_views(geometry: dict[str, Any]) -> None:
    """Each view's AUC and Holm-adjusted p, then the best view and whether it separates after the correction."""
    width = max(map(len, geometry["views"]))
    for name, row in geometry["views"].items():
        click.echo(f"{name:<{width}} AUC {_estimate(row['auc'])}   p {row['p']:.2g}   Holm p {row['p_holm']:.2g}")
    best = geometry["best_view"]
    verdict = "separates members" if best["separates"] else "does not separate members"
    click.echo(f"best view {best['name']}: AUC {_estimate(best['auc'])}, Holm p {best['p_holm']:.2g} "
               f"({verdict} at {best['alpha']:g}; {best['method']})")


def _estimate(entry: dict[str, Any]) -> str:
    """A metrics.json estimate as 'value [low, high]', or 'n/a (reason)' where it is null."""
    if entry["value"] is None:
        return f"n/a ({entry['reason']})"
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"
