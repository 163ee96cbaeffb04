"""The tables of an experiment file and the settings each one sets (docs/experiments.md).

A stage table's keys are its settings dataclass's fields: the command's flags with `_`
for `-`, plus the settings that have no flag, less the fields the runner fills itself
(the model a [train] stage trained, the dataset folder, ...). [model] and [source] set
the extraction's model and text, which [train] and [saturation] read too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from memscan.errors import InputError
from memscan.stages import STAGES as STAGE_REGISTRY

STAGES = ("train", "extract", "index", "query", "score", "saturation", "assoc", "report")
SHARED = ("model", "source")
TABLES = ("experiment", "paper", *SHARED, *STAGES, "variant")
EXPERIMENT_KEYS = ("name", "reproduces")
# Each stage's folder in a run folder: the demo's layout (a dataset, an index, a query run
# that `memscan report` draws, with the saturation folder inside it when there is one).
FOLDERS = {"train": "train", "extract": "activations", "index": "index", "query": "run", "score": "score",
           "saturation": "saturation", "assoc": "assoc", "report": "run"}

# Fields the runner fills from other tables or stages, never the stage's own table.
RUNNER_FIELDS = {
    "train": ("source", "text_column", "split"),
    "extract": ("model", "source", "revision", "trust_remote_code", "text_column", "split", "split_column",
                "members", "key_column", "id_column"),
    "score": ("data", "query_run", "verbatim"),
    "saturation": ("source",),
}
# [model] and [source]: key -> the ExtractSettings field it sets.
SHARED_KEYS = {
    "model": {"id": "model", "revision": "revision", "trust_remote_code": "trust_remote_code"},
    "source": {"id": "source", "text_column": "text_column", "split": "split", "split_column": "split_column",
               "members": "members", "key_column": "key_column", "id_column": "id_column"},
}
SHARED_READERS = ("train", "extract")   # the stages whose settings take [model] and [source] fields
REQUIRED = object()                     # the default of a field that has none


class ExperimentError(InputError):
    """One line naming the experiment file and the key that is wrong."""

    def __init__(self, file: str, key: str, message: str):
        super().__init__(f"{file}: {key}: {message}")


@cache
def settings_classes() -> dict[str, type]:
    """Each table's settings dataclass, from the stage registry; [model] and [source] set the extraction's."""
    classes = {name: STAGE_REGISTRY[name].settings for name in STAGES if STAGE_REGISTRY[name].settings is not None}
    return {**classes, **{table: STAGE_REGISTRY["extract"].settings for table in SHARED}}


@cache
def table_keys(table: str) -> dict[str, str]:
    """The keys a table takes, each mapped to the settings field it sets ({} for [report])."""
    if table in SHARED_KEYS:
        return SHARED_KEYS[table]
    if table not in settings_classes():
        return {}
    skipped = RUNNER_FIELDS.get(table, ())
    return {f.name: f.name for f in dataclasses.fields(settings_classes()[table]) if f.name not in skipped}


def default_of(table: str, key: str) -> Any:
    """The settings field's default (None where unset means the stage decides), or REQUIRED."""
    field = next(f for f in dataclasses.fields(settings_classes()[table]) if f.name == table_keys(table)[key])
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return REQUIRED


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def hint_of(table: str, key: str) -> Any:
    """The type a key's value must have (`X | None` as X: TOML has no null, a missing key is None)."""
    hint = _hints(settings_classes()[table])[table_keys(table)[key]]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def build(plan: Mapping[str, Mapping[str, Any]], stage: str, **runner: Any) -> Any:
    """The stage's settings from a resolved plan: its table, the [model] and [source] fields it takes,
    and `runner`, what is known only when it runs (the model [train] trained, the dataset folder, ...)."""
    cls = settings_classes()[stage]
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {table_keys(stage)[key]: value for key, value in plan[stage].items()}
    if stage in SHARED_READERS:
        for table in SHARED:
            values.update({field: plan[table][key] for key, field in SHARED_KEYS[table].items()
                           if table in plan and field in fields and plan[table][key] is not None})
    return cls(**{**values, **runner})


def owner_of(stage: str, field: str) -> str | None:
    """The `table.key` that sets a settings field of `stage`, or None for a field the runner sets."""
    if field in table_keys(stage):
        return f"{stage}.{field}"
    if stage in SHARED_READERS:
        for table, keys in SHARED_KEYS.items():
            for key, shared_field in keys.items():
                if shared_field == field:
                    return f"{table}.{key}"
    return None


def folder_of(stage: str, plan: Mapping[str, Any]) -> str:
    """A stage's folder in a run folder; saturation goes inside the query run, where the report draws it."""
    if stage == "saturation" and "query" in plan:
        return f"{FOLDERS['query']}/{FOLDERS['saturation']}"
    return FOLDERS[stage]
