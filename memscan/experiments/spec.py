"""An experiment file read, overridden with `--set`, checked as a whole and resolved (docs/experiments.md).

`load` returns an Experiment whose plan holds every table with every default filled in
(None where a stage decides for itself), and each [variant.NAME]'s plan: the file with
the variant's overrides laid over it, checked as fully as the file itself. Nothing runs,
nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memscan.errors import InputError
from memscan.experiments.consistency import Checker
from memscan.experiments.tables import (
    EXPERIMENT_KEYS,
    FOLDERS,
    REQUIRED,
    SHARED,
    STAGES,
    TABLES,
    ExperimentError,
    default_of,
    hint_of,
    table_keys,
)
from memscan.experiments.toml_text import flatten

SHIPPED_DIR = Path(__file__).parent / "shipped"
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")   # a bare TOML key and a plain folder name

Plan = dict[str, dict[str, Any]]


# ---------------------------------------------------------------- reading the file and --set


def locate(name: str) -> Path:
    """The path of an experiment file: `name` itself, or the shipped experiment of that name (`demo`, ...)."""
    path = Path(name)
    shipped = SHIPPED_DIR / f"{name}.toml"
    if not path.is_file() and "/" not in name and shipped.is_file():   # ./demo may be the demo's run folder
        return shipped
    return path


def shipped_names() -> list[str]:
    """The experiments that come with memscan (the repository's experiments/ folder)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def read(path: Path) -> dict[str, Any]:
    """The TOML document; a missing file or a syntax error is one line naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such experiment file (shipped: {', '.join(shipped_names())})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an experiment file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def apply_sets(document: dict[str, Any], sets: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The document with each `--set KEY=VALUE` applied in order.

    VALUE is read as a TOML value (`20`, `true`, `[1, 2]`, `{k = 5}`), as the string itself
    where it is not one or the key takes a string (`extract.layers=6`); a table merges into
    the table there; an empty VALUE (`model.id=`) removes the key, so its default applies.
    """
    for item in sets:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. query.k=20 or extract.layers=all")
        parent = document
        for depth, part in enumerate(path[:-1]):
            parent = parent.setdefault(part, {})
            if not isinstance(parent, dict):
                raise InputError(f"--set {key}: {'.'.join(path[:depth + 1])} is a value, not a table")
        if raw == "":
            parent.pop(path[-1], None)
            continue
        value = _set_value(raw, _takes_string(path))
        old = parent.get(path[-1])
        parent[path[-1]] = merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return document


def _set_value(raw: str, takes_string: bool) -> Any:
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw
    return raw if takes_string and not isinstance(value, str) else value


def _takes_string(path: list[str]) -> bool:
    """Whether the key a --set path names takes a string."""
    if path[0] == "variant":
        path = path[2:]
    if len(path) != 2:
        return False
    table, key = path
    if table == "experiment":
        return key in EXPERIMENT_KEYS
    return key in table_keys(table) and hint_of(table, key) is str


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` laid over `base`, tables merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


# ---------------------------------------------------------------- the experiment, checked and resolved


@dataclass(frozen=True)
class Experiment:
    """A checked experiment: the file's plan and each variant's (without variants the file's plan runs)."""

    file: str
    plan: Plan
    variants: dict[str, Plan]
    sets: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.plan["experiment"]["name"]

    def runs(self) -> Iterator[tuple[str | None, Plan]]:
        """(variant name, or None for the file itself; its plan) for each run, in the file's order."""
        if self.variants:
            yield from self.variants.items()
        else:
            yield None, self.plan


def load(name: str, sets: tuple[str, ...] | list[str] = ()) -> Experiment:
    """Read an experiment file (or a shipped one by name), apply `sets`, check everything and resolve it."""
    path = locate(name)
    file = path.name if path.parent == SHIPPED_DIR else str(path)   # named in errors as the user named it
    document = apply_sets(read(path), sets)
    variants = document.pop("variant", {})
    if not isinstance(variants, dict):
        raise ExperimentError(file, "variant", "must be tables: [variant.NAME] holding overrides")
    plan = resolve(file, document, path.stem)
    resolved = {}
    for variant, overrides in variants.items():
        _check_variant(file, variant, overrides)
        resolved[variant] = resolve(file, merged(document, overrides), path.stem, f"variant.{variant}.")
    return Experiment(file, plan, resolved, tuple(sets))


def _check_variant(file: str, name: str, overrides: Any) -> None:
    where = f"variant.{name}"
    if not VARIANT_NAME.fullmatch(name):
        raise ExperimentError(file, where, "a variant's name is its folder's: letters, digits, '_' and '-'")
    if name in FOLDERS.values():
        raise ExperimentError(file, where, f"'{name}' is a stage's folder; choose another name")
    if not isinstance(overrides, dict):
        raise ExperimentError(file, where, "must be a table of overrides, e.g. train.n_layer = 6")
    for table in ("experiment", "variant"):
        if table in overrides:
            raise ExperimentError(file, f"{where}.{table}", "a variant cannot change this table")


def resolve(file: str, document: Mapping[str, Any], stem: str, prefix: str = "") -> Plan:
    """Every table checked (keys, types, each stage's own checks, the stages together) and filled in."""
    for table, values in document.items():
        if table not in TABLES:
            raise ExperimentError(file, prefix + table, f"unknown table; an experiment has {', '.join(TABLES)}")
        if not isinstance(values, dict):
            raise ExperimentError(file, prefix + table, "must be a table")
    typed = {table: _typed(file, table, document[table], prefix) for table in (*SHARED, *STAGES) if table in document}
    stages = [stage for stage in STAGES if stage in typed]
    plan: Plan = {"experiment": _experiment_table(file, document.get("experiment", {}), stem, prefix)}
    for table, readers in _shared_readers(stages).items():
        if readers:
            plan[table] = _filled(file, table, typed.get(table, {}), prefix)
        elif table in typed:
            raise ExperimentError(file, prefix + table, "no stage of this experiment reads it")
    for stage in stages:
        plan[stage] = _filled(file, stage, {**_derived_defaults(stage, typed), **typed[stage]}, prefix)
    checker = Checker(file, prefix, plan)
    checker.inputs()
    for stage in stages:
        if stage != "report":
            checker.own_checks(stage)
    checker.across_stages()
    paper = checker.paper(document.get("paper", {}))
    if paper:
        plan["paper"] = paper
    return plan


def _shared_readers(stages: list[str]) -> dict[str, list[str]]:
    """The stages that read [model] and [source]: saturation reads them only where nothing is trained."""
    trained = "train" in stages
    model = [s for s in stages if s == "extract" or (s == "saturation" and not trained)]
    return {"model": model, "source": [s for s in stages if s in ("train", "extract", "saturation")]}


def _experiment_table(file: str, values: Any, stem: str, prefix: str) -> dict[str, str]:
    for key, value in values.items():
        if key not in EXPERIMENT_KEYS:
            raise ExperimentError(file, f"{prefix}experiment.{key}",
                                  f"unknown key; [experiment] takes {', '.join(EXPERIMENT_KEYS)}")
        if not isinstance(value, str) or (key == "name" and not value.strip()):
            raise ExperimentError(file, f"{prefix}experiment.{key}", f"must be a non-empty string; got {_shown(value)}")
    return {"name": _folder_name(file, values.get("name", stem), prefix), "reproduces": values.get("reproduces", "")}


def _folder_name(file: str, name: str, prefix: str) -> str:
    """The experiment's name, which `memscan run` takes as its folder without --out: one folder inside the
    working folder, so no separator (an absolute path has one), no '.' or '..', nothing hidden, no NUL."""
    if not name.strip() or name.startswith(".") or any(char in name for char in "/\\\0"):
        raise ExperimentError(file, f"{prefix}experiment.name",
                              f"{json.dumps(name)} cannot be a folder inside the working folder, which memscan run "
                              "writes into without --out: no '/', '\\' or NUL, not empty, no leading '.'")
    return name


def _typed(file: str, table: str, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The table's values in their settings' types; an unknown key or a wrong type is one line."""
    known = table_keys(table)
    out = {}
    for key, value in values.items():
        where = f"{prefix}{table}.{key}"
        if key not in known:
            takes = f"[{table}] takes {', '.join(known)}" if known else f"[{table}] takes no keys"
            raise ExperimentError(file, where, f"unknown key; {takes}")
        out[key] = _converted(file, where, value, hint_of(table, key))
    return out


def _converted(file: str, where: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` names: a list as a tuple, an integer as a float where a number is asked."""
    problem = ExperimentError(file, where, f"must be {_described(hint)}; got {_shown(value)}")
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise problem
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        try:
            return tuple(_converted(file, where, item, kind) for item, kind in zip(value, kinds))
        except ExperimentError:
            raise problem from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
        raise problem
    return value


def _described(hint: Any) -> str:
    """A type in words, for the errors: an integer, a list of numbers, ..."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        item = _described(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {item}s" if args[-1] is Ellipsis else f"a list of {len(args)} {item}s"
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
    return json.dumps(value, default=str)[:60]


def _derived_defaults(stage: str, typed: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Defaults that follow another stage: the extraction of a trained model takes the training run's
    chunk length, test fraction and seed (its split), unless the file gives them."""
    if stage != "extract" or "train" not in typed:
        return {}
    train = {key: typed["train"].get(key, default_of("train", key)) for key in ("context", "test_fraction", "seed")}
    return {"chunk_tokens": train["context"], "test_fraction": train["test_fraction"], "seed": train["seed"]}


def _filled(file: str, table: str, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Every key of the table: given, or its default (None where the stage decides)."""
    filled = {}
    for key in table_keys(table):
        value = values.get(key, default_of(table, key))
        if value is REQUIRED and table not in SHARED:   # [model] and [source] are checked with their readers
            raise ExperimentError(file, f"{prefix}{table}.{key}", "required (it has no default)")
        filled[key] = None if value is REQUIRED else value
    return filled


def variant_overrides(base: Plan, variant: Plan, file: str, name: str) -> dict[str, Any]:
    """The keys where a variant's plan differs from the base plan, as nested tables (for the resolved file)."""
    before, after = flatten(base), flatten(variant)
    changed = {keys: value for keys, value in after.items() if before.get(keys) != value}
    nested: dict[str, Any] = {}
    for keys, value in changed.items():
        if value is None and before.get(keys) is not None:   # TOML cannot say "unset"
            raise ExperimentError(file, f"variant.{name}.{'.'.join(keys)}", "unsets a value the file sets")
        if value is None:
            continue
        table = nested
        for key in keys[:-1]:
            table = table.setdefault(key, {})
        table[keys[-1]] = value
    return nested
