"""`memscan train`: a GPT-2 trained on a token budget, whose training data is known exactly.

The source's documents are read in order, chunked and split exactly as `memscan extract`
does (same chunk length, seed and test fraction), until the train split holds the
budget; the run records that document prefix, so `memscan extract --max-documents N`
with the same settings gives rows that are exactly the training and held-out chunks.
Every step's batch is a function of (seed, step) alone, so a resumed run replays
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memscan import corpus, files, models, qf, store
from memscan.errors import InputError

log = logging.getLogger(__name__)

RUN_FILE, LOG_FILE, CHECKPOINTS, RESUME = "run.json", "log.parquet", "checkpoints", "resume"


@dataclass(frozen=True)
class TrainSettings:
    """A training run (see `memscan train --help`); presets fill these for the paper's settings."""

    source: str
    tokens: int                      # training budget D, rounded up to whole documents
    tokenizer: str | None = None     # hub id or folder; None: the qf source's own tokenizer
    n_layer: int = 6
    n_embd: int = 512
    n_head: int = 4
    context: int = 64                # chunk length T_max, also the model's n_positions
    tie_embeddings: bool = True
    dropout: float = 0.0             # 0 as in nanoGPT's pretraining; exact resumes need no RNG state
    test_fraction: float = 0.1
    batch_size: int = 8
    steps: int | None = None         # None: `epochs` passes over the training chunks
    epochs: float = 1.0
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_chunks: int = 256           # held-out chunks per evaluation (the first ones, always the same)
    checkpoints: int = 8             # log-spaced checkpoints, plus the last
    save_every: int = 200            # steps between rolling resume points
    dtype: str = "auto"              # auto: bf16 autocast where the hardware runs it natively
    device: str = "auto"
    seed: int = 0
    text_column: str = "text"
    split: str = "train"

    def check(self) -> None:
        for name in ("tokens", "n_layer", "n_embd", "n_head", "context", "batch_size", "eval_every",
                     "eval_chunks", "checkpoints", "save_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be at least 1; got {self.steps}")
        if not 0 <= self.test_fraction < 1:
            raise InputError(f"--test-fraction must be in [0, 1); got {self.test_fraction}")


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
    if settings.tokenizer is None:
        if not (settings.source == "qf" or settings.source.startswith("qf:")):
            raise InputError("--tokenizer is needed for sources other than qf (a hub id or a local folder)")
        return qf.tokenizer()
    from transformers import AutoTokenizer

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
    from transformers import GPT2Config, GPT2LMHeadModel

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
    identity = asdict(replace(settings, eval_every=0, save_every=0))
    return files.fingerprint({"settings": identity, "data": provenance})


def _save(model: Any, tokenizer: Any, optimizer: Any, folder: Path, state: dict[str, Any]) -> None:
    """save_pretrained (safetensors) + optimizer + state.json, staged and renamed: a listed folder is whole."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps(state))
    old = folder.with_name(folder.name + ".old")   # a kill at any point leaves one whole folder to resume from
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint (rolling or log-spaced) with the highest step, or None."""
    found = [(json.loads((p / "state.json").read_text())["step"], p)
             for p in (run_dir / CHECKPOINTS).glob("*")
             if (p / "state.json").exists() and not p.name.endswith((".tmp", ".old"))]
    return max(found)[1] if found else None


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The log-spaced checkpoints of a run, (step, folder) in step order."""
    return sorted((json.loads((p / "state.json").read_text())["step"], p)
                  for p in (Path(run_dir) / CHECKPOINTS).glob("step-*")
                  if (p / "state.json").exists() and not p.name.endswith((".tmp", ".old")))


def train(settings: TrainSettings, out: str | Path, overwrite: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train (or resume, or find finished) a run in `out`; returns run.json. `on_step(step, loss)` observes."""
    settings.check()
    out = Path(out)
    tokenizer = load_tokenizer(settings)
    data = load_data(settings, tokenizer)
    device = models.resolve_device(settings.device)
    use_bf16 = settings.dtype == "bf16" or (settings.dtype == "auto" and models.resolve_dtype("auto", device) == torch.bfloat16)
    fingerprint = _fingerprint(replace(settings, dtype="bf16" if use_bf16 else "fp32"), data.provenance)
    run_file = out / RUN_FILE
    if run_file.exists() and json.loads(run_file.read_text())["fingerprint"] != fingerprint:
        if not overwrite:
            raise InputError(f"--out '{out}' holds another training run (other settings or data); "
                             "choose another folder or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    total = total_steps(settings, len(data.train))
    info = {"fingerprint": fingerprint, "settings": asdict(settings), "data": data.provenance, "steps": total,
            "checkpoint_steps": checkpoint_steps(total, settings.checkpoints), "complete": False}
    if run_file.exists():
        info = json.loads(run_file.read_text())
        if info["complete"]:
            return info
    files.write_json_atomic(run_file, info)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    resume = latest_checkpoint(out)
    state = {"step": 0, "running": 0.0, "running_count": 0}
    if resume is not None:
        state = json.loads((resume / "state.json").read_text())
        if state["fingerprint"] != fingerprint:
            raise InputError(f"checkpoint '{resume}' belongs to another run; remove it or pass --overwrite")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resume)
        log.info("resuming %s at step %d of %d", out, state["step"], total)
    else:
        model = build_model(settings, tokenizer)
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    rows: list[dict[str, Any]] = []
    if resume is not None:
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
        if (out / LOG_FILE).exists():
            rows = [r for r in store.read_table(out / LOG_FILE).to_pylist() if r["step"] <= state["step"]]

    model.train()
    started, running, running_count = time.perf_counter(), state["running"], state["running_count"]
    for step in range(state["step"], total):
        lr = learning_rate(settings, step, total)
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
        if not math.isfinite(loss.item()):
            raise InputError(f"training diverged at step {step + 1} (loss {loss.item()}); lower --lr")
        running, running_count = running + loss.item(), running_count + 1
        done = step + 1
        if on_step is not None:
            on_step(done, loss.item())
        if done % settings.eval_every == 0 or done == total or done == 1:
            rows.append({"step": done, "tokens_seen": done * settings.batch_size * settings.context, "lr": lr,
                         "train_loss": running / running_count,
                         "heldout_loss": heldout_loss(model, data, settings, device, autocast),
                         "seconds": time.perf_counter() - started})
            running, running_count = 0.0, 0
            store.write_table(out / LOG_FILE, {k: np.array([r[k] for r in rows]) for k in rows[0]})
            log.info("step %d/%d: train %.3f, held-out %.3f", done, total, rows[-1]["train_loss"], rows[-1]["heldout_loss"])
        state = {"step": done, "fingerprint": fingerprint, "running": running, "running_count": running_count}
        if done in info["checkpoint_steps"]:
            _save(model, tokenizer, optimizer, out / CHECKPOINTS / f"step-{done:07d}", state)
        elif done % settings.save_every == 0:
            _save(model, tokenizer, optimizer, out / CHECKPOINTS / RESUME, state)
    shutil.rmtree(out / CHECKPOINTS / RESUME, ignore_errors=True)
    info.update(complete=True, final=str(out / CHECKPOINTS / f"step-{total:07d}"),
                final_train_loss=rows[-1]["train_loss"], final_heldout_loss=rows[-1]["heldout_loss"])
    files.write_json_atomic(run_file, info)
    return info
