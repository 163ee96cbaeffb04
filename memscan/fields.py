"""A settings field that carries its flag's meaning: the default and the help text live once, in the dataclass.

The settings dataclasses declare their fields with `setting(default, "help")`; the command line's options
are generated from them (memscan.cli.options.settings_options), and `memscan run` reads the same fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple[str, ...] = (),
            flag: str | None = None) -> Any:
    """A dataclass field with the help text of its flag (`--name-with-dashes` unless `flag`), and the choices
    the command line offers where they are fixed."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def flag_of(field: dataclasses.Field[Any]) -> str:
    """The command-line flag of a settings field."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")
