"""The `memscan` command: a thin layer over the library, one module per command.

Every command checks its flags, calls one library function and renders the result.
MemscanError and OSError (missing files, a full disk, a read-only folder) become one line on stderr and exit code 1; set
MEMSCAN_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

import click

from memscan import __version__
from memscan.errors import MemscanError
from memscan.files import first_line

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="memscan")
@click.option("-v", "--verbose", is_flag=True, help="Log every shard and block, not just the milestones.")
def cli(verbose: bool) -> None:
    """Measure how a language model memorizes: activations, nearest neighbours, the theory's tests."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="memscan: %(message)s",
                        stream=sys.stderr)
    # Loading and saving a model is quick; hide transformers' per-file progress bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "faiss", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register() -> None:
    from memscan.cli import assoc, demo, extract, index, inspect, query, run, score, train, verbatim

    for command in (extract.extract, index.index, query.query, query.report, train.train, train.saturation,
                    assoc.assoc, inspect.verify, inspect.info, demo.demo, score.score, verbatim.verbatim, run.run):
        cli.add_command(command)


_register()


def error_line(exc: BaseException) -> str:
    """One line for a user's error: the message, or for an OSError (full disk, read-only folder, ...) its
    reason and the file it happened to, without errno numbers."""
    if isinstance(exc, OSError) and not isinstance(exc, MemscanError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        hint = {errno.ENOSPC: " (the disk is full; free space and rerun to resume)",
                errno.EROFS: " (the folder is on a read-only file system; choose another --out)",
                errno.EDQUOT: " (disk quota exceeded; free space and rerun to resume)"}.get(exc.errno or 0, "")
        return f"{exc.strerror}{where}{hint}"
    return first_line(exc)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the command, mapping user errors to one line and exit 1."""
    debug = os.environ.get("MEMSCAN_DEBUG") == "1"
    try:
        code = cli.main(args=argv, prog_name="memscan", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("memscan: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("memscan: interrupted; rerun the same command to resume", err=True)
        code = EXIT_INTERRUPTED
    except (MemscanError, OSError) as exc:
        if debug:
            raise
        click.echo(f"memscan: error: {error_line(exc)}", err=True)
        code = EXIT_ERROR
    sys.exit(code if isinstance(code, int) else 0)
