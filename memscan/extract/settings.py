"""What decides an extraction's output (`ExtractSettings`), as its manifest records it and its fingerprint
identifies it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from memscan import checks, corpus, files, models, store
from memscan.engines.capture import ModelRequest
from memscan.engines.planning import ChunkRequest


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that decides an extraction's output (see `memscan extract --help`)."""

    model: str
    source: str
    num_chunks: int | None = None        # None: every chunk of the corpus
    max_documents: int | None = None     # None: the whole source; else its first N documents (a training run's prefix)
    chunk_tokens: int = 256              # the paper's T_max
    test_fraction: float = 0.1
    layers: str | None = None            # last | all | indices (negative from the end); None: last, or none with sites
    sites: str | None = None             # sites inside blocks and module outputs (memscan.sites), e.g. attn_out:0-5
    positions: str = "last"              # last | all | every:K
    dtype: str = "auto"                  # auto | bf16 | fp16 | fp32
    vec_dtype: str = "auto"              # auto (float16 for 16-bit models) | float16 | float32
    device: str = "auto"
    batch_size: int = 8
    shard_rows: int = 65536
    seed: int = 0
    loss: bool = True
    text_column: str = "text"
    split: str | None = None             # the split of an hf: dataset to read (None: "train"); other sources have none
    revision: str | None = None
    trust_remote_code: bool = False
    split_column: str | None = None      # a source column naming membership (member/non-member, train/test, 1/0, ...)
    members: str | None = None           # a file of member document ids (or keys of key_column), one a line
    key_column: str | None = None        # the source column whose values the --members file lists
    device_map: str | None = None        # auto: accelerate spreads the model over the GPUs, CPU memory and disk
    max_memory: str | None = None        # with device_map: a budget per device, e.g. cpu=2GB,0=20GB

    def check(self) -> None:
        """Refuse out-of-range settings with one line that names the flag, the range and the value."""
        checks.at_least("--num-chunks", self.num_chunks, 1)
        checks.at_least("--max-documents", self.max_documents, 1)
        checks.at_least("--chunk-tokens", self.chunk_tokens, 1)
        checks.number("--test-fraction", self.test_fraction, 0, 1)
        checks.choice("--dtype", self.dtype, ("auto", "bf16", "fp16", "fp32"))
        checks.choice("--vec-dtype", self.vec_dtype, ("auto", *store.VEC_DTYPES))
        checks.at_least("--batch-size", self.batch_size, 1)
        checks.at_least("--shard-rows", self.shard_rows, 1)
        checks.at_least("--seed", self.seed, 0)
        checks.need(self.device_map in (None, "auto"),
                    f"--device-map must be auto (or left out); got '{self.device_map}'")
        checks.need(self.max_memory is None or self.device_map is not None, "--max-memory needs --device-map auto")
        models.parse_max_memory(self.max_memory)
        corpus.resolve_split(self.source, self.split)
        self.split_rule()

    def split_rule(self) -> corpus.SplitRule:
        """The rule that makes a document train or test: --split-column, --members, or the seeded hash."""
        return corpus.split_rule(self.split_column, self.members, self.key_column)

    def model_request(self) -> ModelRequest:
        """The model these settings run, and where (for the engine to open)."""
        return ModelRequest(self.model, self.revision, self.trust_remote_code, self.device, self.dtype,
                            self.device_map, self.max_memory)

    def chunk_request(self) -> ChunkRequest:
        """What decides these settings' chunks (for the engine to plan)."""
        return ChunkRequest(self.model, self.revision, self.trust_remote_code, self.max_documents, self.chunk_tokens,
                            self.test_fraction, self.seed, self.num_chunks)


# Settings added after format version 1: out of the record while None.
ADDED_SETTINGS = ("sites", "device_map", "max_memory")
# The engines whose name a dataset's settings (and so its fingerprint) held before the engine left its identity.
LEGACY_ENGINES = ("local", "ray")


def settings_record(resolved: ExtractSettings) -> dict[str, Any]:
    """The resolved settings as the fingerprint and manifest hold them; a setting newer than a dataset is left
    out while unused (None), so datasets written before it still resume and compare equal. The engine is not
    among them (every engine writes the same bytes); the manifest's settings add its name beside them."""
    record = asdict(resolved)
    return {key: value for key, value in record.items() if not (key in ADDED_SETTINGS and value is None)}


def resolve_layers(settings: ExtractSettings) -> str:
    """--layers as stored: given, or `last` (the paper's vector) unless --sites asks for other sites instead."""
    if settings.layers is not None:
        return settings.layers
    return "none" if settings.sites else "last"


def fingerprints(identity: dict[str, Any], rule: corpus.SplitRule) -> tuple[str, ...]:
    """The dataset's fingerprint (its identity and split rule), then those a memscan that held the engine in the
    settings gave the same dataset (LEGACY_ENGINES): all of them resume it."""
    document = {**identity, "split_rule": rule.describe()}
    legacy = [{**document, "settings": {**identity["settings"], "engine": name}} for name in LEGACY_ENGINES]
    return tuple(files.fingerprint(entry) for entry in (document, *legacy))
