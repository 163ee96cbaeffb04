"""Options that several commands share, defined once."""

from __future__ import annotations

import click

allow_other_files = click.option(
    "--allow-other-files", is_flag=True,
    help="Write into the folder although it holds files memscan did not write (they are left untouched; "
         "one at a name this command writes is still refused).")
overwrite = click.option(
    "--overwrite", is_flag=True,
    help="Replace another job's output of this command in --out (only what memscan's record there lists). "
         "Without it the same job resumes or finds its output done, and another is refused.")
