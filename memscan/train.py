"""`memscan train`: a GPT-2 trained on a token budget, whose training data is known exactly.

The source's documents are read in order, chunked and split exactly as `memscan extract`
does (same chunk length, seed and test fraction), until the train split holds the
budget; the run records that document prefix, so `memscan extract --max-documents N`
with the same settings gives rows that are exactly the training and held-out chunks.
Every step's batch is a function of (seed, step) alone, so a resumed run replays
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import tqdm.auto
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import memscan.store as store
from memscan import checks, corpus, files, folders, models, qf
from memscan.errors import DataError, InputError
from memscan.fields import setting
from memscan.results import StageResult

log = logging.getLogger(__name__)

RUN_FILE, LOG_FILE, CHECKPOINTS, RESUME = "run.json", "log.parquet", "checkpoints", "resume"
STATE_FILE, OPTIMIZER_FILE = "state.json", "optimizer.pt"
OLD_SUFFIX = ".old"
LOG_COLUMNS = ("step", "tokens_seen", "lr", "train_loss", "heldout_loss", "seconds")
_STEP_FOLDER = re.compile(r"step-(\d{7,})")
MAX_PARAMETERS = 10**11   # 1.6 TB of weights, gradients and AdamW state: more than one machine holds


@dataclass(frozen=True)
class TrainSettings:
    """A training run (see `memscan train --help`); presets fill these for the paper's settings."""

    source: str = setting(help="Text source, as for `memscan extract` [the preset's, else required].")
    tokens: int = setting(help="Training token budget D, rounded up to whole documents [the preset's, else "
                               "required].")
    tokenizer: str | None = setting(None, "Tokenizer for non-qf sources (hub id or folder) [default: the qf "
                                          "source's own].")
    n_layer: int = setting(6, "Transformer blocks.")
    n_embd: int = setting(512, "Width of the residual stream.")
    n_head: int = setting(4, "Attention heads per block.")
    context: int = setting(64, "Chunk length T_max (= n_positions).")
    tie_embeddings: bool = True      # --untied: separate input and output embeddings
    dropout: float = setting(0.0, "Dropout probability in [0, 1) (0 as in nanoGPT's pretraining).")
    test_fraction: float = setting(0.1, "Fraction of documents (by seeded hash) in the test split.")
    batch_size: int = setting(8, "Chunks per optimizer step.")
    steps: int | None = setting(None, "Optimizer steps [default: --epochs passes over the training chunks].")
    epochs: float = setting(1.0, "Passes over the training chunks, where --steps is not given.")
    lr: float = setting(6e-4, "Peak learning rate (AdamW), after the warmup, decaying by cosine.")
    min_lr_ratio: float = 0.1
    warmup_steps: int = setting(100, "Steps of linear learning-rate warmup.")
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = setting(50, "Steps between held-out evaluations.")
    eval_chunks: int = 256           # held-out chunks per evaluation (the first ones, always the same)
    checkpoints: int = 8             # log-spaced checkpoints, plus the last
    save_every: int = 200            # steps between rolling resume points
    dtype: str = setting("auto", "Training precision; auto: bf16 autocast where the hardware runs it natively.",
                         choices=("auto", "bf16", "fp32"))
    device: str = setting("auto")    # the shared --device
    seed: int = setting(0)           # the shared --seed
    text_column: str = "text"
    split: str | None = None         # the split of an hf: source (None: "train"); other sources have none

    def check(self) -> None:
        """Refuse out-of-range settings with one line that names the flag, the range and the value."""
        for name in ("tokens", "n_layer", "n_embd", "n_head", "context", "batch_size", "eval_every",
                     "eval_chunks", "checkpoints", "save_every", "steps"):
            checks.at_least(_flag(name), getattr(self, name), 1)
        checks.at_least("--warmup-steps", self.warmup_steps, 0)
        checks.at_least("--seed", self.seed, 0)
        checks.number("--epochs", self.epochs, 0, low_open=True)
        checks.number("--lr", self.lr, 0, low_open=True)
        checks.number("--min-lr-ratio", self.min_lr_ratio, 0, 1, high_open=False)
        checks.number("--dropout", self.dropout, 0, 1)
        checks.number("--test-fraction", self.test_fraction, 0, 1)
        checks.number("--weight-decay", self.weight_decay, 0)
        checks.number("--grad-clip", self.grad_clip, 0, low_open=True)
        checks.choice("--dtype", self.dtype, ("auto", "bf16", "fp32"))
        corpus.resolve_split(self.source, self.split)
        self._check_size()

    def _check_size(self) -> None:
        """Refuse a model too large to build before any memory is taken: one line naming the setting furthest above
        its default. Counted: the blocks (12 n_layer n_embd^2) and positions; the vocabulary is not known yet."""
        parameters = 12 * self.n_layer * self.n_embd ** 2 + self.context * self.n_embd
        if parameters <= MAX_PARAMETERS:
            return
        defaults = {f.name: f.default for f in fields(TrainSettings)}
        sizes = sorted(("n_embd", "n_layer", "context"), key=lambda name: getattr(self, name) / defaults[name])
        others = ", ".join(f"{_flag(name)} {getattr(self, name)}" for name in sizes[:-1])
        raise InputError(f"{_flag(sizes[-1])} {getattr(self, sizes[-1])} (with {others}) makes a model of about "
                         f"{parameters:.1e} parameters; memscan trains at most {MAX_PARAMETERS:.0e} (16 bytes each "
                         f"for weights, gradients and AdamW state): lower {_flag(sizes[-1])}")


def _flag(name: str) -> str:
    """A setting's command-line flag: n_layer -> --n-layer."""
    return "--" + name.replace("_", "-")


PRESETS: dict[str, dict[str, Any]] = {
    # Vanilla decoders on the ~2M-token Question-Formation corpus (Bai et al.): 6 or 10 layers, width 512,
    # 4 heads, batch 8; 1.6M tokens is its train split at the default 10% held out.
    "qf-6": {"source": "qf", "tokens": 1_600_000, "n_layer": 6, "n_embd": 512, "n_head": 4, "batch_size": 8,
             "context": 64, "lr": 3e-4},
    "qf-10": {"source": "qf", "tokens": 1_600_000, "n_layer": 10, "n_embd": 512, "n_head": 4, "batch_size": 8,
              "context": 64, "lr": 3e-4},
    # GPT-2 small on a text budget (the 0.1% / 1% / 100% comparison: set --tokens and --source).
    "gpt2-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "context": 1024, "batch_size": 8, "lr": 6e-4,
                   "warmup_steps": 2000},
}


@dataclass
class TrainData:
    """Training and held-out chunks (m, T) int64 with next tokens (-1 where none), and their provenance."""

    train: torch.Tensor
    train_next: torch.Tensor
    heldout: torch.Tensor
    heldout_next: torch.Tensor
    provenance: dict[str, Any]


def load_tokenizer(settings: TrainSettings) -> Any:
    """The run's tokenizer: --tokenizer (a hub id or folder), or the qf source's own."""
    if settings.tokenizer is None:
        if not (settings.source == "qf" or settings.source.startswith("qf:")):
            raise InputError("--tokenizer is needed for sources other than qf (a hub id or a local folder)")
        return qf.tokenizer()
    try:
        return AutoTokenizer.from_pretrained(settings.tokenizer)
    except (OSError, ValueError) as exc:
        raise InputError(f"could not load tokenizer '{settings.tokenizer}': {str(exc).splitlines()[0]}") from None


def load_data(settings: TrainSettings, tokenizer: Any) -> TrainData:
    """Read documents in order until the train split holds `tokens` tokens (whole documents)."""
    source = corpus.open_source(settings.source, seed=settings.seed, text_column=settings.text_column,
                                split=settings.split)
    needed = math.ceil(settings.tokens / settings.context)
    stats = corpus.CorpusStats()
    train: list[corpus.Chunk] = []
    heldout: list[corpus.Chunk] = []
    last_doc = -1
    for chunk in corpus.iter_chunks(source.documents(), tokenizer, settings.context, settings.test_fraction,
                                    settings.seed, stats):
        if chunk.doc_id != last_doc and len(train) >= needed:
            break
        last_doc = chunk.doc_id
        (train if chunk.split == "train" else heldout if chunk.split == "test" else []).append(chunk)
    if len(train) < needed:
        raise InputError(f"--tokens {settings.tokens:,} is more than the {len(train) * settings.context:,} training "
                         f"tokens the source has in chunks of {settings.context}; lower --tokens")
    if not heldout:
        raise InputError("the documents read hold no held-out chunk; raise --test-fraction or --tokens")

    def stack(chunks: list[corpus.Chunk], field: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(c, field) for c in chunks]).astype(np.int64))

    provenance = {"source": settings.source, "documents": last_doc + 1, "context": settings.context,
                  "seed": settings.seed, "test_fraction": settings.test_fraction,
                  "train_chunks": len(train), "train_tokens": len(train) * settings.context,
                  "heldout_chunks": len(heldout)}
    return TrainData(stack(train, "tokens"), stack(train, "next_tokens"), stack(heldout, "tokens"),
                     stack(heldout, "next_tokens"), provenance)


def build_model(settings: TrainSettings, tokenizer: Any) -> Any:
    """A GPT-2 from a config; a config the class rejects is a one-line error."""
    try:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=settings.context, n_embd=settings.n_embd,
            n_layer=settings.n_layer, n_head=settings.n_head, tie_word_embeddings=settings.tie_embeddings,
            resid_pdrop=settings.dropout, embd_pdrop=settings.dropout, attn_pdrop=settings.dropout,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(settings.seed)
        return GPT2LMHeadModel(config)
    except ValueError as exc:
        raise InputError(f"the model configuration was rejected: {str(exc).splitlines()[0]}") from None


def total_steps(settings: TrainSettings, train_chunks: int) -> int:
    """--steps, or `epochs` passes in which every training chunk is in exactly one batch."""
    return settings.steps or max(1, round(settings.epochs * math.ceil(train_chunks / settings.batch_size)))


def learning_rate(settings: TrainSettings, step: int, total: int) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio x lr (nanoGPT's schedule); step counts from 0."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total - settings.warmup_steps))
    floor = settings.lr * settings.min_lr_ratio
    return floor + 0.5 * (settings.lr - floor) * (1 + math.cos(math.pi * progress))


def batch_rows(seed: int, step: int, batch_size: int, rows: int) -> torch.Tensor:
    """Row indices of step `step`: epoch-wise seeded permutations, cut into batches (the last one shorter)."""
    per_epoch = math.ceil(rows / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[index * batch_size:(index + 1) * batch_size]


def checkpoint_steps(total: int, count: int) -> list[int]:
    """`count` log-spaced steps in [1, total], plus the last."""
    spaced = np.unique(np.round(np.logspace(0, math.log10(total), count)).astype(int))
    return sorted(set(spaced.tolist()) | {total})


def lm_loss(model: Any, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position with a known next token."""
    logits = model(input_ids=tokens).logits                                   # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


@torch.inference_mode()
def heldout_loss(model: Any, data: TrainData, settings: TrainSettings, device: torch.device, autocast: Any) -> float:
    """Mean next-token loss over the first `eval_chunks` held-out chunks (the model is left in training mode)."""
    model.eval()
    tokens, targets = data.heldout[: settings.eval_chunks], data.heldout_next[: settings.eval_chunks]
    total, count = 0.0, 0
    for start in range(0, len(tokens), settings.batch_size):
        x, y = tokens[start:start + settings.batch_size].to(device), targets[start:start + settings.batch_size].to(device)
        with autocast():
            total += lm_loss(model, x, y).item() * int((y >= 0).sum())
        count += int((y >= 0).sum())
    model.train()
    return total / count


def _fingerprint(settings: TrainSettings, provenance: dict[str, Any]) -> str:
    """A run's identity: its settings but how often it evaluates and saves, and its data's provenance."""
    identity = asdict(replace(settings, eval_every=0, save_every=0))
    return files.fingerprint({"settings": identity, "data": provenance})


# ---------------------------------------------------------------- the run folder: what memscan owns


def _owned_in_run(out: Path) -> Callable[[str], bool]:
    """Names memscan writes directly in a run folder: run.json, log.parquet (and their temporary names), checkpoints/."""
    def owned(name: str) -> bool:
        if name == CHECKPOINTS:
            return (out / name).is_dir()
        return name.removesuffix(files.TMP_SUFFIX) in (RUN_FILE, LOG_FILE)
    return owned


def _owned_checkpoint(name: str) -> bool:
    """checkpoints/step-NNNNNNN and checkpoints/resume, and their .tmp (staging) and .old (replaced) names."""
    base = name.removesuffix(files.TMP_SUFFIX).removesuffix(OLD_SUFFIX)
    step = _STEP_FOLDER.fullmatch(base)
    return base == RESUME or (step is not None and base == _step_folder(int(step[1])))


def _step_folder(step: int) -> str:
    """The folder name of the checkpoint at `step`: step-NNNNNNN."""
    return f"step-{step:07d}"


def _refuse_foreign(out: Path) -> None:
    """One line naming the files in a run folder (or its checkpoints/) that memscan did not write."""
    files.refuse_foreign(out, _owned_in_run(out))
    if (out / CHECKPOINTS).is_dir():
        files.refuse_foreign(out / CHECKPOINTS, _owned_checkpoint)


def _remove_run(out: Path) -> None:
    """Remove run.json first (a cut-short removal is then no run), memscan's checkpoints, and the log; nothing else."""
    files.remove_owned(out, [RUN_FILE])
    folder = out / CHECKPOINTS
    if folder.is_dir():
        files.remove_owned(folder, [p.name for p in folder.iterdir() if _owned_checkpoint(p.name)])
        with contextlib.suppress(OSError):  # still holds files memscan did not write (--allow-other-files)
            folder.rmdir()
    files.remove_owned(out, [LOG_FILE])


# ---------------------------------------------------------------- records: run.json and checkpoints


_RUN_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fingerprint": str, "settings": dict, "data": dict, "steps": int, "checkpoint_steps": list, "complete": bool,
}
_DATA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "source": str, "documents": int, "context": int, "seed": int, "test_fraction": (int, float),
    "train_chunks": int, "train_tokens": int, "heldout_chunks": int,
}
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int, "fingerprint": str, "running": (int, float), "running_count": int, "files": list,
}


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """run.json of a training run, its shape checked: one DataError line names the file and the key."""
    path = Path(run_dir) / RUN_FILE
    info = folders.read_record(Path(run_dir), folders.TRAINING)
    for key, kinds in _RUN_FIELDS.items():
        files.require(info, key, kinds, path)
    for key, kinds in _DATA_FIELDS.items():
        files.require(info["data"], key, kinds, path)
    files.require(info["settings"], "seed", int, path)
    files.require(info["settings"], "text_column", str, path)
    if info["steps"] < 1 or not all(type(step) is int for step in info["checkpoint_steps"]):
        raise DataError(f"{path}: 'steps' must be at least 1 and 'checkpoint_steps' a list of steps; "
                        f"got {info['steps']}, {info['checkpoint_steps']}")
    if info["complete"]:
        for key in ("final_train_loss", "final_heldout_loss"):
            files.require(info, key, (int, float), path)
    return info


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's state.json, its shape checked (the files it lists are checked by `check_checkpoint`)."""
    path = folder / STATE_FILE
    state = files.read_record(path, "checkpoint", _STATE_FIELDS)
    if state["step"] < 1 or state["running_count"] < 0 or not all(isinstance(e, dict) for e in state["files"]):
        raise DataError(f"{path} is damaged: step {state['step']}, running_count {state['running_count']}, "
                        "and a file record per file are expected")
    if folder.name.startswith("step-") and folder.name != _step_folder(state["step"]):
        raise DataError(f"{path} records step {state['step']}, not the step its folder is named for")
    return state


def check_checkpoint(folder: Path) -> dict[str, Any]:
    """The state of a checkpoint whose every file is whole: listed in state.json with its size and sha256.

    A file missing, altered, or in the folder but not listed is one DataError line naming it.
    """
    state = read_state(folder)
    listed = {entry.get("name") for entry in state["files"]}
    unlisted = sorted(p.name for p in folder.iterdir() if p.name != STATE_FILE and p.name not in listed)
    problems = [files.file_problem(folder, entry) for entry in state["files"]]
    problems += [f"{name} is not listed in its {STATE_FILE}" for name in unlisted]
    problem = next((p for p in problems if p), None)
    if problem:
        raise DataError(f"checkpoint '{folder}' is damaged: {problem}; remove that folder (an earlier "
                        "checkpoint is then used) or retrain with --overwrite")
    return state


@contextlib.contextmanager
def loading(folder: Path) -> Iterator[None]:
    """A checkpoint file that cannot be loaded (a refused pickle, a damaged safetensors header) becomes one line."""
    try:
        yield
    except (*models.LOAD_ERRORS, RuntimeError) as exc:
        raise DataError(f"checkpoint '{folder}' cannot be loaded: {models.load_problem(exc)}") from None


def _fsync(path: Path) -> None:
    """Flush a written file to disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _save(model: Any, tokenizer: Any, optimizer: Any, folder: Path, state: dict[str, Any]) -> None:
    """Weights (safetensors), tokenizer, optimizer, then state.json listing them all; staged and renamed.

    Every file is fsynced before state.json vouches for it, and state.json before the rename,
    so a listed checkpoint folder is whole; a kill at any point leaves one whole folder to resume from.
    """
    staging = files.tmp_path(folder)
    files.refuse_link(staging)
    files.refuse_link(folder)
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
    written = sorted(staging.iterdir())
    for path in written:
        _fsync(path)
    files.write_json_atomic(staging / STATE_FILE, {**state, "files": [files.file_entry(p) for p in written]})
    old = folder.with_name(folder.name + OLD_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    files.fsync_directory(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The log-spaced checkpoints of a run, (step, folder) in step order; their state.json is checked."""
    folder = Path(run_dir) / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if _STEP_FOLDER.fullmatch(p.name)] if folder.is_dir() else []
    return sorted((read_state(p)["step"], p) for p in found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint (log-spaced or the rolling resume point) with the highest step, or None."""
    found = checkpoints(run_dir)
    resume = run_dir / CHECKPOINTS / RESUME
    if resume.is_dir():
        found.append((read_state(resume)["step"], resume))
    return max(found)[1] if found else None


def final_checkpoint(run_dir: Path, steps: int) -> Path:
    """The folder of a finished run's last checkpoint (derived from the run folder, never read from a record)."""
    return Path(run_dir) / CHECKPOINTS / _step_folder(steps)


# ---------------------------------------------------------------- training


@dataclass(frozen=True, eq=False)
class TrainResult(StageResult):
    """A finished `memscan train` run folder: its signed run.json (with `final`), read as a mapping or by property."""

    kind = folders.TRAINING

    @property
    def steps(self) -> int:
        """The optimizer steps the run took."""
        return self.record["steps"]

    @property
    def final(self) -> Path:
        """The last checkpoint's folder (derived from the run folder, never read from the record)."""
        return final_checkpoint(self.folder, self.steps)

    @property
    def data(self) -> dict[str, Any]:
        """The training data's provenance: source, documents, context, seed, test fraction, chunk and token counts."""
        return dict(self.record["data"])

    @property
    def final_train_loss(self) -> float:
        """The mean training loss over the steps since the last evaluation."""
        return self.record["final_train_loss"]

    @property
    def final_heldout_loss(self) -> float:
        """The held-out loss at the last step."""
        return self.record["final_heldout_loss"]


def train(settings: TrainSettings, out: str | Path, overwrite: bool = False, allow_other_files: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train (or resume, or find finished) a run in `out`; returns its result. `on_step(step, loss)` observes.

    The job holds `out` (an exclusive lock) from start to end. Files in `out` that memscan
    did not write are refused unless `allow_other_files`, and never removed; `overwrite`
    replaces another run's run.json, log and checkpoints.
    """
    settings.check()
    with files.job_folder(Path(out)) as folder:
        return TrainResult(folder, _train_in(folder, settings, overwrite, allow_other_files, on_step))


def _train_in(out: Path, settings: TrainSettings, overwrite: bool, allow_other_files: bool,
              on_step: Callable[[int, float], None] | None) -> dict[str, Any]:
    """`train` in a folder this job holds."""
    if not allow_other_files:
        _refuse_foreign(out)
    folders.refuse_links(out, [RUN_FILE, LOG_FILE, CHECKPOINTS])
    info = read_run(out) if (out / RUN_FILE).exists() else None   # a run.json memscan did not write: refused now
    folders.refuse_in_the_way(out, [LOG_FILE, CHECKPOINTS], folders.owned_names(out))
    tokenizer = load_tokenizer(settings)
    data = load_data(settings, tokenizer)
    device = models.resolve_device(settings.device)
    use_bf16 = models.resolve_dtype(settings.dtype, device) == torch.bfloat16
    dtype = "bf16" if use_bf16 else "fp32"
    fingerprint = _fingerprint(replace(settings, dtype=dtype), data.provenance)
    if info is not None and info["fingerprint"] != fingerprint and not overwrite:
        raise InputError(f"--out '{out}' holds another training run (other settings or data); "
                         "choose another folder or pass --overwrite")
    if overwrite and (info is None or info["fingerprint"] != fingerprint):
        if info is not None:
            log.warning("--overwrite: removing the training run in %s", out)
        _remove_run(out)  # also stale checkpoints that no run.json vouches for
        info = None
    if info is not None and info["complete"]:
        return {**info, "final": str(final_checkpoint(out, info["steps"]))}
    total = total_steps(settings, len(data.train)) if info is None else info["steps"]
    # The model first, run.json after: a model that cannot be built (out of memory) leaves no run, and the folder
    # this job created (job_folder) is removed.
    model, optimizer, state, rows = _start(out, settings, tokenizer, fingerprint, total, device)
    if info is None:
        info = folders.write_record(out, folders.TRAINING, {
            "fingerprint": fingerprint, "settings": asdict(settings), "dtype": dtype, "data": data.provenance,
            "steps": total, "checkpoint_steps": checkpoint_steps(total, settings.checkpoints), "complete": False,
            "folders": [CHECKPOINTS]})

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    rows = _run_steps(out, settings, data, model, optimizer, tokenizer, state, rows, info, device, autocast, on_step)
    shutil.rmtree(out / CHECKPOINTS / RESUME, ignore_errors=True)
    final = final_checkpoint(out, info["steps"])
    info.update(complete=True, final=str(final), final_train_loss=rows[-1]["train_loss"],
                final_heldout_loss=rows[-1]["heldout_loss"], files=[files.file_entry(out / LOG_FILE)])
    return folders.write_record(out, folders.TRAINING, info)


def _start(out: Path, settings: TrainSettings, tokenizer: Any, fingerprint: str, total: int, device: torch.device,
           ) -> tuple[Any, Any, dict[str, Any], list[dict[str, Any]]]:
    """Model (on `device`), optimizer, state and log rows: fresh, or from the latest checkpoint once its files check out."""
    resume = latest_checkpoint(out)
    if resume is None:
        model = build_model(settings, tokenizer).to(device)
        return model, _optimizer(model, settings), {"step": 0, "running": 0.0, "running_count": 0}, []
    state = check_checkpoint(resume)
    if state["fingerprint"] != fingerprint:
        raise InputError(f"checkpoint '{resume}' belongs to another run; remove that folder to resume from "
                         "an earlier checkpoint")
    with loading(resume):
        model = AutoModelForCausalLM.from_pretrained(resume).to(device)
        optimizer = _optimizer(model, settings)
        optimizer.load_state_dict(torch.load(resume / OPTIMIZER_FILE, weights_only=True))
    log.info("resuming %s at step %d of %d", out, state["step"], total)
    return model, optimizer, state, _read_log(out, state["step"])


def _optimizer(model: Any, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (nanoGPT's grouping)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))


def _read_log(out: Path, step: int) -> list[dict[str, Any]]:
    """The log rows up to `step` (a resumed run rewrites the rest)."""
    if not (out / LOG_FILE).exists():
        return []
    table = store.read_table(out / LOG_FILE)
    if set(table.column_names) != set(LOG_COLUMNS):
        raise DataError(f"{out / LOG_FILE} has columns {', '.join(table.column_names)}; "
                        f"expected {', '.join(LOG_COLUMNS)}")
    return [row for row in table.to_pylist() if row["step"] <= step]


def _run_steps(out: Path, settings: TrainSettings, data: TrainData, model: Any, optimizer: Any, tokenizer: Any,
               state: dict[str, Any], rows: list[dict[str, Any]], info: dict[str, Any], device: torch.device,
               autocast: Callable[[], Any], on_step: Callable[[int, float], None] | None) -> list[dict[str, Any]]:
    """Steps state["step"]..total: evaluate and log every eval_every, checkpoint on schedule; returns the log rows."""
    total = info["steps"]
    model.train()
    started, running, running_count = time.perf_counter(), state["running"], state["running_count"]
    progress = tqdm.auto.tqdm(total=total, initial=state["step"], unit="step", desc="train", disable=None)
    try:
        for step in range(state["step"], total):
            lr = learning_rate(settings, step, total)
            loss = _optimizer_step(model, optimizer, data, settings, step, lr, device, autocast)
            running, running_count = running + loss, running_count + 1
            done = step + 1
            progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
            progress.update()
            if on_step is not None:
                on_step(done, loss)
            if done % settings.eval_every == 0 or done == total or done == 1:
                rows.append({"step": done, "tokens_seen": done * settings.batch_size * settings.context, "lr": lr,
                             "train_loss": running / running_count,
                             "heldout_loss": heldout_loss(model, data, settings, device, autocast),
                             "seconds": time.perf_counter() - started})
                running, running_count = 0.0, 0
                store.write_table(out / LOG_FILE, {k: np.array([r[k] for r in rows]) for k in LOG_COLUMNS})
                log.info("step %d/%d: train %.3f, held-out %.3f", done, total, rows[-1]["train_loss"],
                         rows[-1]["heldout_loss"])
            state = {"step": done, "fingerprint": info["fingerprint"], "running": running,
                     "running_count": running_count}
            if done in info["checkpoint_steps"]:
                _save(model, tokenizer, optimizer, out / CHECKPOINTS / _step_folder(done), state)
            elif done % settings.save_every == 0:
                _save(model, tokenizer, optimizer, out / CHECKPOINTS / RESUME, state)
    finally:
        progress.close()
    return rows


def _optimizer_step(model: Any, optimizer: Any, data: TrainData, settings: TrainSettings, step: int, lr: float,
                    device: torch.device, autocast: Callable[[], Any]) -> float:
    """One AdamW step on step `step`'s batch at learning rate `lr`; returns its loss (refused if not finite)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    index = batch_rows(settings.seed, step, settings.batch_size, len(data.train))
    x, y = data.train[index].to(device), data.train_next[index].to(device)
    with autocast():
        loss = lm_loss(model, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if not math.isfinite(value):
        raise InputError(f"training diverged at step {step + 1} (loss {value}); lower --lr")
    return value
