"""An experiment's stages checked one by one (each settings class's own `check()`) and against each
other: what a stage reads exists, a trained model's extraction keeps its training split, the index
and score layers are extracted, the query splits are written. Nothing is loaded or downloaded:
where the model is a hub id, what only the model knows (its layer count) is checked when it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from memscan import corpus, fields
from memscan.errors import InputError
from memscan.experiments.comparison import PAPER, RESERVED, SCALE_NUMBERS, numbers, quantities
from memscan.experiments.tables import STAGES, ExperimentError, build, owner_of, settings_classes
from memscan.extract import resolve_layers
from memscan.files import first_line
from memscan.layout import parse_layers, parse_positions
from memscan.train import load_tokenizer

# What each stage reads: a stage without the one before it has nothing to work on.
NEEDS = {"index": ("extract", "the index is built over its activations"),
         "query": ("index", "its queries are searched in that index"),
         "score": ("extract", "it rates the extracted chunks"),
         "report": ("query", "the page draws a query run")}
MEASURED = tuple(stage for stage in STAGES if stage != "report")   # stages whose records [paper] can name
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")
_ANY_LAYER = 1 << 20   # checks a --layers spec's syntax where the model's layer count is not known


def _parsed(stage: str, settings: Any) -> None:
    """The settings a stage parses only once it runs, through the stage's own code where that needs no model
    or data: extract's --positions against --chunk-tokens, train's tokenizer where none is named."""
    if stage == "extract":
        parse_positions(settings.positions, settings.chunk_tokens)
    elif stage == "train" and settings.tokenizer is None:   # a named one is loaded from its folder or the hub
        load_tokenizer(settings)


class Checker:
    """The checks of one resolved plan; every failure is an ExperimentError naming the file and the key."""

    def __init__(self, file: str, prefix: str, plan: Mapping[str, Mapping[str, Any]]):
        self.file, self.prefix, self.plan = file, prefix, plan

    def refuse(self, key: str, message: str) -> NoReturn:
        raise ExperimentError(self.file, self.prefix + key, message)

    def value(self, key: str) -> Any:
        table, _, name = key.partition(".")
        return self.plan[table][name]

    def settings(self, stage: str) -> Any:
        """The stage's settings, with stand-ins for what only the run knows (they are not range-checked)."""
        if stage == "extract":
            return build(self.plan, stage, model=self.value("model.id") or "(the model [train] trains)")
        return build(self.plan, stage, **({"data": "(the extraction)"} if stage == "score" else {}))

    # ---------------------------------------------------------------- each stage on its own

    def inputs(self) -> None:
        """Each stage has what it reads: the stage before it, a text source, a model."""
        for stage, (needed, why) in NEEDS.items():
            if stage in self.plan and needed not in self.plan:
                self.refuse(stage, f"needs an [{needed}] table: {why}")
        trained = "train" in self.plan
        if {"train", "extract"} & set(self.plan) and self.value("source.id") is None:
            self.refuse("source.id", "required: the text to train on or extract from (qf, hf:OWNER/NAME, a file)")
        if "model" in self.plan and trained and self.value("model.id") is not None:
            self.refuse("model.id", "the model is the one [train] trains; remove model.id or the [train] table")
        if "extract" in self.plan and not trained and self.value("model.id") is None:
            self.refuse("model.id", "required: the model to extract from (a hub id or a folder), or a [train] "
                                    "table that trains one")
        if "saturation" in self.plan and not trained and self.value("model.id") is None:
            self.refuse("saturation", "needs a [train] table (its checkpoints) or model.id (a model)")
        if "source" in self.plan and self.value("source.id") is not None:
            self._opened_source()

    def own_checks(self, stage: str) -> None:
        """The stage's settings through their own `check()` and the stage's parsers of them (`_parsed`):
        what the stage would refuse is refused here; its one line names the key it is about."""
        try:
            settings = self.settings(stage)
            settings.check()
            _parsed(stage, settings)
        except InputError as exc:
            message = first_line(exc)
            raise ExperimentError(self.file, self.prefix + self._key_in(stage, message), message) from None

    def _key_in(self, stage: str, message: str) -> str:
        """The key a check's message is about: its first flag (`--k` is query.k) or leading setting name."""
        flags = {fields.flag_of(field): field.name for cls in settings_classes().values()
                 for field in dataclasses.fields(cls)}   # a field has one flag in every stage that has it
        named = [flags.get(match[0], match[1].replace("-", "_")) for match in _FLAG.finditer(message)]
        named.append(message.split(" ", 1)[0])
        return next((owner for owner in (owner_of(stage, field) for field in named) if owner), stage)

    # ---------------------------------------------------------------- the stages together

    def across_stages(self) -> None:
        if "train" in self.plan and "extract" in self.plan:
            self._extraction_of_the_trained_model()
        if "extract" in self.plan:
            self._layers()
            self._splits()
        if "score" in self.plan:
            self._score()

    def _extraction_of_the_trained_model(self) -> None:
        """The extraction reads the training run's document prefix and keeps its split."""
        if self.value("extract.max_documents") is not None:
            self.refuse("extract.max_documents", "the extraction reads the documents [train] trained on; remove it")
        for key in ("test_fraction", "seed"):
            given, trained = self.value(f"extract.{key}"), self.value(f"train.{key}")
            if given != trained:
                self.refuse(f"extract.{key}", f"{given} differs from train.{key} = {trained}: the extraction's "
                                              "split must be the training run's")
        if self.value("extract.chunk_tokens") > self.value("train.context"):
            self.refuse("extract.chunk_tokens", f"{self.value('extract.chunk_tokens')} is longer than the trained "
                                                f"model's context (train.context = {self.value('train.context')})")
        for key in ("split_column", "members", "key_column"):
            if self.value(f"source.{key}") is not None:
                self.refuse(f"source.{key}", "a trained model's members are its training split; remove it")

    def _layer_count(self) -> int | None:
        """The model's layers where known without loading it: [train]'s, or a local folder's config.json."""
        if "train" in self.plan:
            return self.value("train.n_layer")
        config = Path(self.value("model.id")).expanduser() / "config.json"
        try:
            values = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        count = values.get("num_hidden_layers", values.get("n_layer")) if isinstance(values, dict) else None
        return count if isinstance(count, int) else None

    def _extracted(self, spec: str, count: int | None) -> set[int] | None:
        """The layers a --layers spec stores, None where that needs the model's layer count."""

        if spec == "none":
            return set()
        if spec in ("last", "all") and count is None:
            return None
        try:
            layers = set(parse_layers(spec, _ANY_LAYER if count is None else count))
        except InputError as exc:
            self.refuse("extract.layers", first_line(exc))
        return None if count is None and "-" in spec else layers   # -1: counted from an unknown end

    def _layers(self) -> None:
        """index.layer and score.layer name a layer the extraction stores."""
        settings = self.settings("extract")
        if getattr(settings, "sites", None):
            return   # sites add layers of their own: checked when the dataset exists
        spec, count = resolve_layers(settings), self._layer_count()
        extracted = self._extracted(spec, count)
        for key in ("index.layer", "score.layer"):
            stage = key.split(".")[0]
            layer = self.value(key) if stage in self.plan else None
            if layer is None:
                continue
            unknown_last = spec == "last" and count is None
            if layer < 0 or unknown_last or (extracted is not None and layer not in extracted):
                hint = f"; leave {key} unset for the last layer" if spec == "last" else ""
                self.refuse(key, f"{layer} is not extracted (extract.layers = {spec}){hint}")

    def _opened_source(self) -> Any:
        """The text source, opened where that needs no network (a file or the generator; an hf: id is not)."""
        source = self.value("source.id")
        if source.startswith("hf:"):
            return None
        try:
            return corpus.open_source(source, seed=0)
        except InputError as exc:
            self.refuse("source.id", first_line(exc))

    def _written_splits(self) -> set[str]:
        """The splits the extraction writes: train, test unless nothing is held out, qf's gen where it has one."""
        written = {"train"}
        if self.value("extract.test_fraction") > 0 or self.value("source.split_column") or self.value("source.members"):
            written.add("test")
        opened = self._opened_source()
        if isinstance(opened, corpus.QFSource) and opened.config.generalization_fraction > 0:
            written.add("gen")
        return written

    def _splits(self) -> None:
        written = self._written_splits()
        for key in ("index.split", "query.split"):
            stage = key.split(".")[0]
            if stage in self.plan and self.value(key) not in written:
                self.refuse(key, f"'{self.value(key)}' is not a split the extraction writes "
                                 f"({', '.join(sorted(written))})")

    def _score(self) -> None:
        """Score rates per-token losses, and the query run's chunks: test, or train queried leave-one-out."""
        if not self.value("extract.loss"):
            self.refuse("extract.loss", "false leaves no per-token loss for [score] to rate")
        if "query" not in self.plan:
            return
        split = self.value("query.split")
        if split not in ("train", "test"):
            self.refuse("query.split", f"'{split}': [score] rates the train and test chunks of the query run")
        if split == "train" and self.value("index.split") != "train":
            self.refuse("query.split", "'train' against an index of another split: [score] rates members with a "
                                       "leave-one-out run (index.split = train)")

    # ---------------------------------------------------------------- the paper's numbers

    def paper(self, paper: Any) -> dict[str, Any]:
        """[paper]: a number for each measured quantity it names (`query.typical_radius = 10.0`), and its own
        tables: [paper.derived] numbers alike, [paper.source] and [paper.depends_on] naming those numbers,
        [paper.scale] the paper's model and sizes (memscan.experiments.comparison)."""
        if not isinstance(paper, dict):
            self.refuse("paper", "must be a table of numbers, e.g. query.typical_radius = 10.0")
        for table in RESERVED:
            if not isinstance(paper.get(table, {}), dict):
                self.refuse(f"paper.{table}", "must be a table")
        for keys, (kind, value) in numbers(paper).items():
            self._quantity(("paper", *keys) if kind == PAPER else ("paper", "derived", *keys), value)
        named = {".".join(keys) for keys in numbers(paper)}
        self._naming(quantities(paper.get("source", {})), named, "source", lambda text: isinstance(text, str),
                     "must be a string saying where the number comes from")
        self._naming(quantities(paper.get("depends_on", {})), named, "depends_on", SCALE_NUMBERS.__contains__,
                     f"must be one of {', '.join(SCALE_NUMBERS)}")
        self._scale(paper.get("scale", {}))
        return paper

    def _quantity(self, keys: tuple[str, ...], value: Any) -> None:
        """A number of [paper] or [paper.derived]: it names a measured stage and a key in its record."""
        stem = keys[:3] if keys[1] == "derived" else keys[:2]   # paper(.derived).STAGE
        where, stage = ".".join(keys), stem[-1]
        measured = [name for name in MEASURED if name in self.plan]
        if stage not in measured:
            self.refuse(where, f"names no measured stage of this experiment ({', '.join(measured) or 'none'})")
        if len(keys) == len(stem):
            self.refuse(where, f"name a quantity of the {stage} stage's record, e.g. paper.{stage}.NAME")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.refuse(where, f"must be a finite number; got {json.dumps(value, default=str)[:60]}")

    def _naming(self, table: dict[str, Any], named: set[str], name: str, good: Any, expected: str) -> None:
        """[paper.source] or [paper.depends_on]: each key one of the numbers, each value what `good` accepts."""
        for quantity, value in table.items():
            where = f"paper.{name}.{quantity}"
            if quantity not in named:
                self.refuse(where, "names no number of [paper] or [paper.derived]")
            if not good(value):
                self.refuse(where, f"{expected}; got {json.dumps(value, default=str)[:60]}")

    def _scale(self, scale: dict[str, Any]) -> None:
        """[paper.scale]: `model` a description, and positive numbers for the sizes it states."""
        for key, value in scale.items():
            where = f"paper.scale.{key}"
            if key == "model":
                if not isinstance(value, str):
                    self.refuse(where, "must be a string naming the paper's model")
            elif key not in SCALE_NUMBERS:
                self.refuse(where, f"unknown key; [paper.scale] takes model, {', '.join(SCALE_NUMBERS)}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                self.refuse(where, f"must be a positive number; got {json.dumps(value, default=str)[:60]}")
