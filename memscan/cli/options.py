"""Options that several commands share, defined once."""

from __future__ import annotations

import click

allow_other_files = click.option(
    "--allow-other-files", is_flag=True,
    help="Write into --out although it holds files memscan did not write (they are left untouched).")
