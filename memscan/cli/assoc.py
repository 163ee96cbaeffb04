"""`memscan assoc sweep` and `memscan assoc fit`: the associative-memory scaling laws."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any, TypeVar

import click

from memscan import assoc as sweeps
from memscan.assoc import SweepSettings
from memscan.cli.options import Command, allow_other_files, overwrite, settings_options
from memscan.errors import InputError
from memscan.report import render_assoc

F = TypeVar("F", bound=Callable[..., Any])


def _ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of numbers (1e3 allowed) as ints."""
    try:
        return tuple(int(float(part)) for part in text.split(","))
    except ValueError:
        raise InputError(f"expected comma-separated numbers; got '{text}'") from None


@click.group()
def assoc() -> None:
    """Cabannes et al.'s associative memories: error against d and T for memory schemes."""


def _list_option(name: str) -> Callable[[F], F]:
    """A comma-separated list flag of a SweepSettings tuple field, with its help and its default as written."""
    field = SweepSettings.__dataclass_fields__[name]
    return click.option(f"--{name}", default=",".join(map(str, field.default)), show_default=True,
                        help=field.metadata["help"])


@assoc.command(cls=Command)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the sweep into.")
@settings_options(SweepSettings, skip=("dims", "samples", "schemes"))
@_list_option("dims")
@_list_option("samples")
@_list_option("schemes")
@overwrite
@allow_other_files
def sweep(out: str, dims: str, samples: str, schemes: str, overwrite: bool, allow_other_files: bool,
          **settings: object) -> None:
    """Exact population errors over dimensions, sample sizes, schemes and seeds (a Parquet table)."""
    info = sweeps.run_sweep(SweepSettings(dims=_ints(dims), samples=_ints(samples), schemes=tuple(schemes.split(",")),
                                   **settings), out, overwrite, allow_other_files)  # type: ignore[arg-type]
    click.echo(f"sweep     {info.rows:,} rows in {info.seconds:.1f} s -> {out} (next: `{shlex.join(['memscan', 'assoc', 'fit', out])}`)")


@assoc.command(cls=Command)
@click.argument("folder", type=click.Path())
def fit(folder: str) -> None:
    """Log-log slopes with 95% bootstrap intervals beside the theory, and the plots."""
    result = sweeps.run_fit(folder)
    for scheme, s in result["slopes"].items():
        fitted = s["missing"] if "missing" in s else f"{s['slope']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]" + (
            f" ({s['dropped_zero_error']} zero-error points left out)" if s["dropped_zero_error"] else "")
        click.echo(f"{scheme:<10} slope in {s['axis']}: {fitted}  theory {s['theory']:+.3f}")
    for name, cells in result["trained"].items():
        pairs = "; ".join(f"{cell} {v['error']:.3f} (p_hat {v['p_hat']:.3f}, seen {v['seen']:.3f})" for cell, v in cells.items())
        click.echo(f"{name:<10} {pairs}")
    click.echo(f"plots     {', '.join(render_assoc(folder))} in {folder}")
