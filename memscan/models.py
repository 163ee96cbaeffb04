"""Causal LMs: loading, device and dtype choice, and the activation-capturing forward pass.

Layer numbering follows `output_hidden_states`: layer 0 is the embedding output, layer i
the output of block i, and the last layer (= number of blocks) is the final hidden state
that feeds the LM head, after the final layer norm.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.activations import NewGELUActivation

from memscan import checks, files, membership, sites
from memscan.errors import InputError, ModelError
from memscan.layout import RESIDUAL

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Rows of vocabulary-wide logits alive at once: 128 x 50k fp32 logits (26 MB) stay in cache, which
# made the loss 2x cheaper on CPU than 1024-row blocks (benchmarks/bench_extract.py).
LOSS_BLOCK_ROWS = 128
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CPU_BF16_VARIABLE = "MEMSCAN_CPU_BF16"
MAX_MEMORY_DEVICES = ("cpu", "disk")  # accelerate's budget keys besides GPU indices (and mps where there is one)
# What loading weights raises for a missing, malformed or refused file: a pickle that
# torch.load(weights_only=True) will not run, a damaged safetensors header.
LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError)


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when torch sees it; `cuda[:N]` (or `gpu`) without a GPU is an error, not a fallback."""
    checks.device("--device", name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not torch.cuda.is_available():
        raise InputError(f"--device {name} was asked for, but torch sees no CUDA device "
                         "(use --device cpu or auto)")
    return torch.device(checks.torch_device_name(name))


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """--max-memory `cpu=2GB,0=20GB` as accelerate's max_memory: bytes per GPU index, cpu, mps or disk.

    Sizes are read as accelerate reads them (500MB, 2GB, 1.5GiB) or as plain bytes; None stays None.
    """
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    devices = (*range(torch.cuda.device_count()), *MAX_MEMORY_DEVICES, *["mps"] * torch.backends.mps.is_available())
    budget: dict[int | str, int] = {}
    for item in text.split(","):
        key, sep, size = (part.strip() for part in item.partition("="))
        device = int(key) if key.isdigit() else key
        if not sep or device not in devices or device in budget:
            raise InputError(f"--max-memory must be DEVICE=SIZE items, each device once, such as cpu=2GB,0=20GB "
                             f"(devices here: {', '.join(map(str, devices))}); got '{text}'")
        try:
            budget[device] = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            raise InputError(f"--max-memory: '{item}' is not a size like 500MB, 2GB or 1.5GiB") from None
    return budget


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matrix products natively (AVX512-BF16 or AMX).

    MEMSCAN_CPU_BF16=1 or 0 overrides the probe (to test both answers on one machine);
    any other value is refused.
    """
    forced = os.environ.get(CPU_BF16_VARIABLE, "")
    if forced:
        if forced not in ("0", "1"):
            raise InputError(f"{CPU_BF16_VARIABLE} must be 1 or 0 (or unset, to probe the CPU); got '{forced}'")
        return forced == "1"
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_fast_fp16() -> bool:
    """True where oneDNN runs fp16 matrix products natively (AMX-FP16)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported())


EMULATED_CHECKS = {"bf16": cpu_has_fast_bf16, "fp16": cpu_has_fast_fp16}  # dtype -> "does this CPU run it natively?"


def dtype_name(dtype: torch.dtype) -> str:
    """The flag's name of a torch dtype (bf16, fp16, fp32): what a record says a job ran in."""
    return {value: key for key, value in DTYPES.items()}[dtype]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs and CPUs that run it natively (measured 5.8x fp32 on AVX512-BF16), else fp16/fp32.

    A 16-bit type asked for on a CPU that only emulates it is honoured, with one warning.
    """
    if name != "auto":
        if device.type == "cpu" and name in EMULATED_CHECKS and not EMULATED_CHECKS[name]():
            _warn_emulated(name)
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@functools.cache
def _warn_emulated(name: str) -> None:
    """Once per process and type: the cache keeps a second call from logging again."""
    auto = "bf16" if cpu_has_fast_bf16() else "fp32"
    log.warning("--dtype %s runs emulated on this CPU, often over 100x slower than fp32; "
                "--dtype auto would pick %s here", name, auto)


@dataclass
class LoadedModel:
    """A causal LM in eval mode on its device, its tokenizer, and what the manifest records."""

    model: Any
    tokenizer: Any
    info: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[1])

    @property
    def context_length(self) -> int | None:
        config = self.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def load(model_id: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None,
         trust_remote_code: bool = False, device_map: str | None = None,
         max_memory: dict[int | str, int] | None = None) -> LoadedModel:
    """Load a hub id or local folder with the Auto classes; one-line errors for what users get wrong.

    With `device_map` ("auto") accelerate spreads the blocks over the GPUs, CPU memory and
    disk that `max_memory` (`parse_max_memory`) allows, and the model is not moved to `device`.
    """
    local = Path(model_id).expanduser()
    source = str(local) if local.exists() else model_id
    tokenizer = load_tokenizer(model_id, revision, trust_remote_code)
    placement = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, revision=revision,
                                                     trust_remote_code=trust_remote_code, **placement)
    except LOAD_ERRORS as exc:
        raise ModelError(f"could not load model '{model_id}': {load_problem(exc)}") from None
    if device_map is None:
        model.to(device)
    else:
        log.info("device map: %s", placement_summary(model))
    model.eval()
    use_native_gelu(model)
    return LoadedModel(model, tokenizer, model_info(model_id, model, tokenizer, revision))


def describe(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """What `load` tells about a model (its `info`, layers, width, context) without loading its weights.

    For a driver whose workers run the model (the Ray engine): the model is a skeleton built
    from the config out of torch's fake tensors, which have shapes and no storage, so a forward
    pass over it computes shapes only (`target_widths`) and real inputs are taken as fake. The
    tokenizer is loaded, and a local folder's weights are only hashed.
    """
    local = Path(model_id).expanduser()
    tokenizer = load_tokenizer(model_id, revision, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else model_id, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise ModelError(f"could not load model '{model_id}': {load_problem(exc)}") from None
    with FakeTensorMode(allow_non_fake_inputs=True):  # a 7B Llama: 1.6 s and no memory of its own
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, model_info(model_id, model, tokenizer, revision))


def model_info(model_id: str, model: Any, tokenizer: Any, revision: str | None) -> dict[str, Any]:
    """The manifest's `model`: part of every extraction's fingerprint, so `load` and `describe` share it."""
    local = Path(model_id).expanduser()
    return {
        "id": model_id,
        "path": str(local.resolve()) if local.exists() else None,
        "revision": getattr(model.config, "_commit_hash", None) or revision,
        "weights_sha256": weights_digest(local) if local.is_dir() else None,
        "class": type(model).__name__,
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)},
    }


def load_problem(exc: BaseException) -> str:
    """One line for weights that could not be loaded. A refused pickle is named as such: torch's own
    message suggests weights_only=False, which would run the pickle's code."""
    if isinstance(exc, pickle.UnpicklingError):
        return "a weights file holds a pickle of objects other than tensors; it was refused (loading it could run code)"
    return files.first_line(exc)


def placement_summary(model: Any) -> str:
    """`5 modules on cpu, 4 modules on disk`: where accelerate put the model's modules. A model that fits
    one device is moved there whole, without a map."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map is None:
        return f"the whole model on {next(model.parameters()).device}"
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return ", ".join(f"{count} module{'s' * (count != 1)} on {device}" for device, count in counts.items())


def execution_device(model: Any, module: torch.nn.Module) -> torch.device:
    """The device `module` computes on. Under a device map accelerate's hook on it or its nearest hooked
    parent says (offloaded weights wait on `meta` and run on the main device); else its weights' device."""
    if getattr(model, "hf_device_map", None) is not None:
        path = next(name for name, child in model.named_modules() if child is module).split(".")
        for depth in range(len(path), -1, -1):
            hook = getattr(model.get_submodule(".".join(path[:depth])), "_hf_hook", None)
            if getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
    return next(module.parameters()).device


def input_device(model: Any) -> torch.device:
    """Where token ids go: the device of the input embeddings."""
    return execution_device(model, model.get_input_embeddings())


def load_tokenizer(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a hub id or local model folder (without loading the model)."""
    local = Path(model_id).expanduser()
    if looks_like_path(model_id) and not local.exists():
        raise InputError(f"--model '{model_id}' does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else model_id, revision=revision,
                                             trust_remote_code=trust_remote_code, local_files_only=local.exists())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"could not load model '{model_id}': {files.first_line(exc)}") from None


def use_native_gelu(model: Any) -> None:
    """Swap transformers' Python tanh-GELU (GPT-2's `gelu_new`) for torch's fused kernel.

    The same function (differences ~1e-7 in fp32), one kernel instead of six elementwise
    passes: the GPT-2-small backbone ran 1.37x faster in bf16 on the CPU.
    """
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))


def looks_like_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id


def held(model: Any, tokenizer: Any) -> LoadedModel:
    """A model and tokenizer the caller loaded (`extract(..., model=, tokenizer=)`), put in eval mode where they
    are; its record's `id` is its name_or_path, and `parameters_sha256` and `config_sha256` identify it."""
    if not isinstance(model, PreTrainedModel) or not callable(getattr(tokenizer, "decode", None)):
        raise InputError(f"model must be a transformers PreTrainedModel with its tokenizer; got "
                         f"{type(model).__name__} and {type(tokenizer).__name__}")
    dtype = next(model.parameters()).dtype
    if dtype not in DTYPES.values():
        raise InputError(f"a model in {dtype} cannot be extracted; convert it to one of {', '.join(DTYPES)}")
    model.eval()
    info = model_info(model.config.name_or_path or type(model).__name__, model, tokenizer, None)
    vocabulary = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
    info.update(path=None, weights_sha256=None, parameters_sha256=parameters_digest(model), config_sha256=files.fingerprint(
        model.config.to_dict()), tokenizer={**info["tokenizer"], "vocab_sha256": files.fingerprint(vocabulary)})
    return LoadedModel(model, tokenizer, info)


def parameters_digest(model: Any) -> str:
    """One sha256 over a model's parameters and buffers (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(folder: Path) -> str:
    """One sha256 over the weight files of a local model, so a resume notices changed weights."""
    return files.sha256_of_files(sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES), with_names=True)


@dataclass(frozen=True)
class Target:
    """One stored set of vectors: the residual stream at an `output_hidden_states` layer (site
    "hidden", `hooked` None), or a hooked `sites.Site` at its block (layer -1 for a module: path)."""

    site: str
    layer: int
    hooked: sites.Site | None = None


def hidden_targets(layers: list[int]) -> list[Target]:
    """The residual stream at `layers` (what --layers stores)."""
    return [Target(RESIDUAL, layer) for layer in layers]


@torch.inference_mode()
def capture(model: Any, input_ids: torch.Tensor, next_ids: torch.Tensor, targets: list[Target],
            positions: torch.Tensor, with_loss: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Activations and next-token losses of one batch of equal-length chunks.

    input_ids, next_ids: (B, T) int64, next_ids -1 where no next token is known.
    Returns vec, one (B, P, n_target) tensor per target in the model's dtype, and nll (B, P)
    float32 (NaN where no next token) or None. Runs the backbone only, in one forward pass
    whatever the targets; the LM head sees just the P kept positions, and only when their
    loss is asked for.
    """
    vec, final = _backbone(model, input_ids, targets, positions)
    nll = next_token_nll(model, at_positions(final, positions), next_ids[:, positions]) if with_loss else None
    return vec, nll


# What one batch's capture returns: (vec, nll) without the loss (nll None), (vec, nll, stats) with it.
BatchCapture = tuple[list[torch.Tensor], torch.Tensor | None] | tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]


def capture_batch(model: Any, tokens: np.ndarray, next_tokens: np.ndarray, targets: list[Target],
                  positions: torch.Tensor, with_loss: bool, device: torch.device) -> BatchCapture:
    """One batch of (B, T) token ids (next ids -1 where none) as both engines run it: `capture_statistics`
    (vec, nll, per-token stats) with the loss, else `capture` without it (vec, None)."""
    input_ids = torch.tensor(tokens, dtype=torch.long, device=device)   # a copy: Ray's arrays are read-only
    next_ids = torch.tensor(next_tokens, dtype=torch.long, device=device)
    if with_loss:
        return capture_statistics(model, input_ids, next_ids, targets, positions)
    return capture(model, input_ids, next_ids, targets, positions, False)


@torch.inference_mode()
def capture_statistics(model: Any, input_ids: torch.Tensor, next_ids: torch.Tensor, targets: list[Target],
                       positions: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`capture` with the LM head over every position, for the per-chunk table's membership statistics.

    Returns vec (one (B, P, n_target) per target), nll (B, P) at the kept positions, and stats
    (3, B, T) float32: per-token nll, mu and var (`membership.row_statistics`), NaN where no
    next token. The kept positions' nll is taken from stats, so the shards and the per-chunk
    table hold the same numbers bit for bit.
    """
    vec, final = _backbone(model, input_ids, targets, positions)
    stats = next_token_statistics(model, final, next_ids)
    return vec, at_positions(stats[0], positions), stats


def _backbone(model: Any, input_ids: torch.Tensor, targets: list[Target],
              positions: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One (B, P, n_target) tensor per target at the kept positions, and the final hidden states (B, T, n).

    Hooked sites are read by forward hooks during the same pass (`sites.capture`); hidden
    states other than the final one are asked of the model only when a target needs them.
    """
    last = int(model.config.num_hidden_layers)
    inner = any(t.hooked is None and t.layer != last for t in targets)
    with sites.capture(model, [t.hooked for t in targets if t.hooked is not None], positions) as captured:
        out = model.base_model(input_ids=input_ids.to(input_device(model)), output_hidden_states=inner,
                               use_cache=False)
    final = out.last_hidden_state
    hooked, vec = iter(captured.values()), []
    for target in targets:
        if target.hooked is not None:
            vec.append(next(hooked))
        else:
            state = final if target.layer == last else out.hidden_states[target.layer]
            vec.append(at_positions(state, positions))
    return [v.to(positions.device) for v in vec], final   # blocks under a device map end on several devices


def at_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values[:, positions] on whichever device `values` is (the layers of a device map are on several)."""
    return values[:, positions.to(values.device)]


@torch.inference_mode()
def target_widths(model: Any, targets: list[Target]) -> list[int]:
    """Each target's vector width, from one forward pass over two tokens (an MLP's hidden width, a module's
    output width, are known only to the module)."""
    probe = torch.zeros((1, 2), dtype=torch.long, device=input_device(model))
    vec, _ = _backbone(model, probe, targets, torch.tensor([1], device=probe.device))
    return [int(v.shape[-1]) for v in vec]


def next_token_statistics(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """nll, mu and var (3, B, T) float32 of the next tokens from final hidden states (B, T, n); NaN where
    the target is -1. The block loop of `next_token_nll`, with `membership.row_statistics` per block."""
    head, hidden, targets = _on_head(model, hidden, targets)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    stats = torch.full((3, flat_targets.numel()), float("nan"), dtype=torch.float32, device=hidden.device)
    rows = (flat_targets >= 0).nonzero().squeeze(1)
    for block in rows.split(LOSS_BLOCK_ROWS):
        stats[:, block] = torch.stack(membership.row_statistics(head(flat_hidden[block]), flat_targets[block]))
    return stats.reshape(3, *targets.shape)


def next_token_nll(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target | prefix) from final hidden states (B, P, n); NaN where target is -1."""
    head, hidden, targets = _on_head(model, hidden, targets)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    nll = torch.full(flat_targets.shape, float("nan"), dtype=torch.float32, device=hidden.device)
    rows = (flat_targets >= 0).nonzero().squeeze(1)
    for block in rows.split(LOSS_BLOCK_ROWS):
        logits = head(flat_hidden[block]).float()                   # (rows, vocab)
        nll[block] = F.cross_entropy(logits, flat_targets[block], reduction="none")
    return nll.reshape(targets.shape)


def _on_head(model: Any, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The LM head, and hidden states and targets moved to the device it runs on (under a device map it
    may sit on another device than the last block)."""
    head = model.get_output_embeddings()
    device = execution_device(model, head)
    return head, hidden.to(device), targets.to(device)
