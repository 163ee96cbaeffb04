"""What decides an extraction's output (`ExtractSettings`), as its manifest records it and its fingerprint
identifies it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from memscan import checks, corpus, files, models, store
from memscan.engines.capture import ModelRequest
from memscan.engines.planning import ChunkRequest
from memscan.fields import setting


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that decides an extraction's output (see `memscan extract --help`)."""

    model: str = setting(help="Hugging Face model id or local folder (Auto classes).")
    source: str = setting(help="qf[:documents=N,lines=L,gen=F], hf:OWNER/NAME[:CONFIG], or a .txt/.jsonl/.parquet "
                               "file or folder.")
    num_chunks: int | None = setting(None, "Seeded uniform sample of this many chunks [default: all].")
    max_documents: int | None = setting(None, "Read only the first N documents (the prefix a `memscan train` run "
                                              "used).")
    chunk_tokens: int = setting(256, "Tokens per chunk (the paper's T_max).")
    test_fraction: float = setting(0.1, "Fraction of documents (by seeded hash) in the test split.")
    layers: str | None = setting(None, "The residual stream (site hidden): last | all | indices like 0,6,-1 | none "
                                       "[default: last, or none with --sites].")
    sites: str | None = setting(None, "Sites inside blocks, read in the same forward pass: resid_pre, resid_mid, "
                                      "resid_post, attn_out, mlp_out, mlp_hidden with blocks (attn_out:0-5, "
                                      "mlp_hidden:-1, resid_post:all), or module:PATH.")
    positions: str = setting("last", "last | all | every:K.")
    dtype: str = setting("auto", "Forward-pass precision; auto: bf16 where the GPU or CPU runs it natively, else "
                                 "fp16 on GPUs, fp32 on CPUs.", choices=("auto", "bf16", "fp16", "fp32"))
    vec_dtype: str = setting("auto", "Stored vector type; auto is float16 for 16-bit models.",
                             choices=("auto", *store.VEC_DTYPES))
    device: str = setting("auto")   # the shared --device
    batch_size: int = setting(8, "Chunks per forward pass.")
    shard_rows: int = setting(65536, "Rows per Parquet shard.")
    seed: int = setting(0)   # the shared --seed
    loss: bool = True        # --no-loss: skip the next-token loss (and the LM head)
    text_column: str = setting("text", "Text column of .jsonl/.parquet/hf sources.")
    split: str | None = setting(None, "Split of an hf: dataset to read [default: train]; other sources have none.",
                                flag="--hf-split")
    revision: str | None = setting(None, "Revision of the hub model and dataset.")
    trust_remote_code: bool = setting(False, "Allow a hub model's own code to run.")
    split_column: str | None = setting(None, "Membership from a column of a .jsonl/.parquet/hf: source: "
                                             "member/non-member, train/test, 1/0, true/false (train = in the model's "
                                             "training data) [default: seeded hash split].")
    members: str | None = setting(None, "A text file of member document ids (or --key-column keys), one a line; every "
                                        "other document is test.")
    key_column: str | None = setting(None, "The source column whose values the --members file lists.")
    id_column: str | None = setting(None, "The source column holding each document's own key, stored per chunk as "
                                          "doc_key [default: a column named id where the source has one].")
    device_map: str | None = setting(None, "Spread a model larger than one device over the GPUs, CPU memory and disk "
                                           "(accelerate); --device then only picks the default --dtype.",
                                     choices=("auto",))
    max_memory: str | None = setting(None, "With --device-map: memory per device for the model, e.g. "
                                           "cpu=2GB,0=20GB (GPU indices, cpu, disk).")

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
ADDED_SETTINGS = ("sites", "device_map", "max_memory", "id_column")
# The engines whose name a dataset's settings (and so its fingerprint) held before the engine left its identity.
LEGACY_ENGINES = ("local", "ray")


def settings_record(resolved: ExtractSettings) -> dict[str, Any]:
    """The resolved settings as the fingerprint and manifest hold them; a setting newer than a dataset is left
    out while unused (None), so datasets written before it still resume and compare equal. The engine is not
    among them (every engine writes the same bytes); the manifest's settings add its name beside them."""
    record = asdict(resolved)
    if record["id_column"] == corpus.DEFAULT_ID_COLUMN:   # named or not, the `id` column gives the same dataset
        record["id_column"] = None
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
