"""The `memscan` command: a thin layer over the library, one module per command.

Every command checks its flags, calls one library function and renders the result.
MemscanError and OSError (missing files, a full disk, a read-only folder) become one line on stderr and exit code 1; so
do running out of memory and the errors torch and the tokenizers raise (`library_error_line`); set MEMSCAN_DEBUG=1
to see the traceback instead.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
from types import TracebackType

import click

from memscan.version import __version__
from memscan.errors import MemscanError
from memscan.files import first_line

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


VERBOSITY = {"verbose": logging.DEBUG, "quiet": logging.WARNING}


def _set_verbosity(context: click.Context, parameter: click.Parameter, value: bool) -> None:
    """-v logs every shard and block, -q only warnings and errors; before or after the command name alike."""
    if value and parameter.name:
        logging.getLogger().setLevel(VERBOSITY[parameter.name])


def verbosity_options() -> list[click.Option]:
    """-v/--verbose and -q/--quiet, which the group and every command accept."""
    return [click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_set_verbosity,
                         help="Log every shard and block, not just the milestones."),
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_verbosity,
                         help="Log only warnings and errors.")]


# Every command: the module that defines it (imported when the command runs, so `memscan --help` stays instant and
# imports no torch) and the line `memscan --help` shows. tests/structure.py reads these names as imports.
COMMANDS = {
    "extract": ("memscan.cli.extract", "Extract activations at chosen layers, sites and positions into Parquet."),
    "index": ("memscan.cli.index", "Build a FAISS index over one split, site and layer of a dataset."),
    "query": ("memscan.cli.query", "Nearest-neighbour tables, assumption tests A1-A3, energies, the floor."),
    "report": ("memscan.cli.query", "One self-contained HTML page for any memscan folder (an experiment's links each stage's)."),
    "score": ("memscan.cli.score", "Rate every train and test chunk by membership scores; AUC and TPR."),
    "verbatim": ("memscan.cli.verbatim", "Greedy extraction: does the model complete a chunk's suffix verbatim?"),
    "train": ("memscan.cli.train", "Train a GPT-2 on a token budget; resumes from the last checkpoint."),
    "saturation": ("memscan.cli.train", "Norm growth over a training run's checkpoints, and saturated attention."),
    "assoc": ("memscan.cli.assoc", "Cabannes et al.'s associative memories: error against d and T."),
    "run": ("memscan.cli.run", "Run an experiment file (or a shipped one by name), stage by stage."),
    "demo": ("memscan.cli.demo", "Train a small GPT-2 on Question-Formation, then every stage after it."),
    "verify": ("memscan.cli.inspect", "Check any memscan folder against its record: files, sizes, checksums."),
    "info": ("memscan.cli.inspect", "Describe any memscan folder: its kind and its record."),
    "show": ("memscan.cli.show", "Top examples of a run, scores or verbatim folder, with text."),
}


class Commands(click.Group):
    """The command group, each command imported from its module when it is asked for (COMMANDS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        command = getattr(importlib.import_module(COMMANDS[name][0]), name)
        if not any(param.name == "verbose" for param in command.params):
            _with_verbosity(command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="memscan")
def cli() -> None:
    """Measure how a language model memorizes: activations, nearest neighbours, the theory's tests."""


def _configure_logging() -> None:
    """memscan's lines on stderr at INFO (-v and -q change the level as they are parsed); others' quiet. The root
    handler replaces the library's own (memscan.UntilConfigured, silent once root has one), and the "memscan"
    logger's level is left to the root's, so -q quiets it."""
    logging.basicConfig(format="memscan: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("memscan").setLevel(logging.NOTSET)
    # Loading and saving a model is quick; hide transformers' per-file progress bars.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "faiss", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _with_verbosity(command: click.Command) -> None:
    """The command, and each of its subcommands, accepting -v and -q."""
    command.params.extend(verbosity_options())
    for sub in getattr(command, "commands", {}).values():
        _with_verbosity(sub)


cli.params.extend(verbosity_options())


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
    return next((arg for arg in (sys.argv[1:] if argv is None else argv) if arg in COMMANDS), None)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the command, mapping user errors (and `library_error_line`'s) to one line and exit 1."""
    debug = os.environ.get("MEMSCAN_DEBUG") == "1"
    _configure_logging()
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
