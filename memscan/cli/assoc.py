"""`memscan assoc sweep` and `memscan assoc fit`: the associative-memory scaling laws."""

from __future__ import annotations

import click

from memscan.assoc import SweepSettings, run_fit, run_sweep
from memscan.cli.options import allow_other_files, overwrite
from memscan.errors import InputError
from memscan.report import render_assoc


def _ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of numbers (1e3 allowed) as ints."""
    try:
        return tuple(int(float(part)) for part in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated numbers; got '{text}'") from None


@click.group()
def assoc() -> None:
    """Cabannes et al.'s associative memories: error against d and T for memory schemes."""


@assoc.command()
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--alpha", type=float, default=2.0, show_default=True, help="Zipf exponent of the inputs.")
@click.option("--n-tokens", type=int, default=1000, show_default=True, help="N, the number of input tokens.")
@click.option("--classes", type=int, default=5, show_default=True, help="M, the number of classes (x mod M).")
@click.option("--dims", default="10,20,50,100,200,500,1000", show_default=True)
@click.option("--samples", default="10,30,100,300,1000,3000,10000,30000,100000", show_default=True)
@click.option("--seeds", type=int, default=20, show_default=True)
@click.option("--schemes", default=",".join(("p", "p_hat", "seen", "threshold", "top_seen", "sgd_small",
                                             "sgd_large", "adam")), show_default=True)
@click.option("--learn-embeddings", is_flag=True, help="SGD and Adam also learn the input embeddings.")
@overwrite
@allow_other_files
def sweep(out: str, dims: str, samples: str, schemes: str, overwrite: bool, allow_other_files: bool,
          **settings: object) -> None:
    """Exact population errors over dimensions, sample sizes, schemes and seeds (a Parquet table)."""
    info = run_sweep(SweepSettings(dims=_ints(dims), samples=_ints(samples), schemes=tuple(schemes.split(",")),
                                   **settings), out, overwrite, allow_other_files)  # type: ignore[arg-type]
    click.echo(f"sweep     {info.rows:,} rows in {info.seconds:.1f} s -> {out} (next: `memscan assoc fit {out}`)")


@assoc.command()
@click.argument("folder", type=click.Path())
def fit(folder: str) -> None:
    """Log-log slopes with 95% bootstrap intervals beside the theory, and the plots."""
    result = run_fit(folder)
    for scheme, s in result["slopes"].items():
        fitted = s["missing"] if "missing" in s else f"{s['slope']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]" + (
            f" ({s['dropped_zero_error']} zero-error points left out)" if s["dropped_zero_error"] else "")
        click.echo(f"{scheme:<10} slope in {s['axis']}: {fitted}  theory {s['theory']:+.3f}")
    for name, cells in result["trained"].items():
        pairs = "; ".join(f"{cell} {v['error']:.3f} (p_hat {v['p_hat']:.3f}, seen {v['seen']:.3f})" for cell, v in cells.items())
        click.echo(f"{name:<10} {pairs}")
    click.echo(f"plots     {', '.join(render_assoc(folder))} in {folder}")
