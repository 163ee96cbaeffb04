"""What `extract` reads: the model and source its settings name, or a model, tokenizer and documents the caller
holds in memory."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from memscan import corpus, models
from memscan.engines.capture import OpenedModel
from memscan.engines.knn import Engine, LocalEngine
from memscan.errors import InputError
from memscan.extract.settings import ExtractSettings


@dataclass(frozen=True)
class Inputs:
    """A loaded model with its tokenizer (a transformers PreTrainedModel, run where it is) and documents (a list
    of strings, a datasets.Dataset or IterableDataset) given in place of `settings.model` and `settings.source`;
    None: the settings' own. The settings then record their names (`named`), and the dataset's identity their
    content (the model's parameters and config, the documents' hash or Dataset fingerprint)."""

    model: Any = None
    tokenizer: Any = None
    source: Any = None

    def check(self, engine: Engine) -> None:
        """Refuse, in one line, a model without its tokenizer (or the reverse), or a model for an engine that
        runs its own copies (Ray loads `settings.model` on its workers)."""
        if (self.model is None) != (self.tokenizer is None):
            raise InputError("a loaded model needs its tokenizer, and a tokenizer its model: pass both or neither")
        if self.model is not None and not isinstance(engine, LocalEngine):
            raise InputError(f"a loaded model runs in this process only; the {engine.name} engine loads "
                             "settings.model on its workers: pass the model's folder as settings.model instead")

    def open_source(self, settings: ExtractSettings, rule: corpus.SplitRule) -> corpus.Source:
        """The source to read: the caller's documents, or the one `settings.source` names."""
        if self.source is None:
            return corpus.open_source(settings.source, seed=settings.seed, text_column=settings.text_column,
                                      split=settings.split, revision=settings.revision,
                                      label_column=rule.label_column, id_column=settings.id_column)
        return corpus.memory_source(self.source, text_column=settings.text_column, label_column=rule.label_column,
                                    id_column=settings.id_column)

    def open_model(self, settings: ExtractSettings, engine: Engine) -> OpenedModel:
        """The model to run: the caller's where it is (device and dtype its own), or the engine's opening of
        `settings.model`."""
        if self.model is None:
            return engine.open_model(settings.model_request())
        weights = next(self.model.parameters())
        return OpenedModel(models.held(self.model, self.tokenizer), weights.device, weights.dtype)

    def named(self, settings: ExtractSettings, model: OpenedModel, source: corpus.Source) -> ExtractSettings:
        """`settings` with the caller's model and documents named where it names a model and a source."""
        if self.model is not None:
            settings = replace(settings, model=model.loaded.info["id"])
        if isinstance(source, corpus.MemorySource):
            settings = replace(settings, source=source.name, split=None)
        return settings
