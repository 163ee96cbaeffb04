"""Flags that several commands share, defined once: each name means one thing in every command.

tests/test_flags.py reads every command's --help and fails when a flag name has two meanings or two defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from memscan import checks, fields
from memscan.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])


def _device(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """--device checked where it is parsed: a bad one is click's usage error."""
    try:
        return None if value is None else checks.device("--device", value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from None


allow_other_files = click.option(
    "--allow-other-files", is_flag=True,
    help="Write into the folder although it holds files memscan did not write (they are left untouched; "
         "one at a name this command writes is still refused).")
overwrite = click.option(
    "--overwrite", is_flag=True,
    help="Replace another job's output of this command in --out (only what memscan's record there lists). "
         "Without it the same job resumes or finds its output done, and another is refused.")
device = click.option(
    "--device", default="auto", show_default=True, callback=_device,
    help="Where torch and FAISS run: auto | cpu | cuda[:N] (gpu: the same as cuda); auto takes a GPU when one "
         "is seen.")
seed = click.option("--seed", type=int, default=0, show_default=True,
                    help="Seed of every random choice this command makes (samples, splits, initialization).")
SHARED = {"device": device, "seed": seed}   # settings fields whose flag is one of the shared options above

# Flags renamed so that one name means one thing: (command, old spelling) -> new spelling. The old one still works
# and warns once.
RENAMED = {("extract", "--split"): "--hf-split", ("index", "--memory"): "--index-memory",
           ("verbatim", "--num-chunks"): "--per-split"}


class Command(click.Command):
    """A memscan command: reads the old spellings of renamed flags (RENAMED), with one warning each."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)   # after `--` every word is an argument
        return super().parse_args(ctx, [*map(self._current, args[:end]), *args[end:]])

    def _current(self, arg: str) -> str:
        old, equals, value = arg.partition("=")
        new = RENAMED.get((self.name or "", old))
        if new is None:
            return arg
        click.echo(f"memscan: warning: {self.name} {old} is now {new}; the old spelling still works for now",
                   err=True)
        return new + equals + value


def settings_options(cls: type, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Click options for the fields of a settings dataclass declared with `fields.setting`, in field order, with
    the dataclass's defaults and help (the shared --device and --seed options for those fields); `skip`: fields
    the command takes otherwise."""
    hints = typing.get_type_hints(cls)
    options = [_option(field, hints[field.name]) for field in dataclasses.fields(cls)
               if field.name not in skip and "help" in field.metadata]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def _option(field: dataclasses.Field[Any], hint: Any) -> Callable[[F], F]:
    """One field's click option."""
    if field.name in SHARED:
        return SHARED[field.name]
    kind = next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)
    if kind is bool:
        return click.option(fields.flag_of(field), field.name, is_flag=True, help=field.metadata["help"])
    choice = click.Choice(field.metadata["choices"]) if field.metadata["choices"] else kind
    return click.option(fields.flag_of(field), field.name, type=choice, default=field.default,
                        show_default=field.default is not None, help=field.metadata["help"])


# Flags that mean "this command's own X" and so take a default (or help) per command, each with the reason. Every
# other flag name that two commands share has one help text and one default (tests/test_flags.py).
PER_COMMAND = {
    "--out": "the folder this command writes; required, except demo and run, which name one themselves",
    "--batch-size": "items per forward pass, sized for each command's work (chunks, prompts, sequences)",
    "--dtype": "the precision of each command's forward pass; verbatim pins fp32 so ties break alike everywhere",
    "--split": "a memscan dataset's split: index takes its patterns from train, query its queries from test",
    "--source": "the text a command reads; train falls back on its preset's, saturation on the run's own",
    "--layer": "the layer a command reads: the one to index, the one of the query runs to score",
    "--sites": "extract's sites to capture; query's sites of the dataset to analyse besides the index's",
    "--chunk-tokens": "tokens per chunk; saturation takes the training run's own by default",
}
