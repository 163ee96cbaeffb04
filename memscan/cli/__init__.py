"""The `memscan` command: a thin layer over the library, one module per command.

Every command checks its flags, calls one library function and renders the result.
MemscanError and OSError (missing files, a full disk, a read-only folder) become one line on stderr and exit code 1; so
do running out of memory and the errors torch and the tokenizers raise (`library_error_line`); set MEMSCAN_DEBUG=1
to see the traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from types import TracebackType

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


# What to lower when a command runs out of memory, by command; any other command gets DEFAULT_MEMORY_HINT.
MEMORY_HINTS = {
    "extract": "--batch-size or --chunk-tokens", "train": "--n-embd, --n-layer, --context or --batch-size",
    "saturation": "--chunks or --chunk-tokens", "assoc": "--dims, --n-tokens or --classes",
    "index": "--train-size, or build it in pieces with --shards", "query": "--k", "verbatim": "--batch-size",
    "run": "the experiment's sizes (--set STAGE.KEY=VALUE)",
}
DEFAULT_MEMORY_HINT = "the sizes this command was given"
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")
_ALLOCATOR_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\][^.]*\.\s*")  # torch's C++ assertion, before its message


def _raised_in(traceback: TracebackType | None) -> str:
    """The module of the innermost Python frame of a traceback: where an exception was raised ('' if unknown)."""
    if traceback is None:
        return ""
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return str(traceback.tb_frame.f_globals.get("__name__", ""))


def library_error_line(exc: Exception, command: str | None) -> str | None:
    """One line for running out of memory or for an error of torch or a tokenizer; None for any other exception,
    which is a bug and keeps its traceback.

    Out of memory: a MemoryError, or a RuntimeError whose message says an allocation failed (torch's CPU allocator,
    CUDA), wherever raised. Otherwise where the exception was raised decides, not its type alone: a bare
    `except RuntimeError` would hide memscan's own bugs. Torch: a RuntimeError raised in torch, or in transformers'
    model code that calls torch's operators; a tokenizer: any Exception raised in `tokenizers` or a transformers
    `tokenization_*` module (malformed text, a broken vocabulary). A memscan bug that makes torch fail (a shape
    mismatch) becomes one line too, which says to rerun with MEMSCAN_DEBUG=1 for the traceback.
    """
    module, message = _raised_in(exc.__traceback__), first_line(exc)
    package = module.split(".")[0]
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                        and any(words in message.lower() for words in _OUT_OF_MEMORY)):
        detail = _ALLOCATOR_PREFIX.sub("", message) if str(exc).strip() else ""
        return (f"out of memory{f' ({detail})' if detail else ''}; lower "
                f"{MEMORY_HINTS.get(command or '', DEFAULT_MEMORY_HINT)} and rerun")
    if package == "tokenizers" or ".tokenization_" in module:
        return f"the tokenizer failed: {message} (check the text source and the tokenizer)"
    if isinstance(exc, RuntimeError) and package in ("torch", "transformers"):
        return f"torch failed: {message} (if no setting explains it, rerun with MEMSCAN_DEBUG=1 and report it)"
    return None


def _command_of(argv: list[str] | None) -> str | None:
    """The command named on a command line (`train` in `memscan -v train ...`), None when there is none."""
    return next((arg for arg in (sys.argv[1:] if argv is None else argv) if arg in cli.commands), None)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the command, mapping user errors (and `library_error_line`'s) to one line and exit 1."""
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
    except Exception as exc:  # MemoryError included; anything library_error_line does not name is a bug
        line = library_error_line(exc, _command_of(argv))
        if debug or line is None:
            raise
        click.echo(f"memscan: error: {line}", err=True)
        code = EXIT_ERROR
    sys.exit(code if isinstance(code, int) else 0)
