"""Sites inside a transformer block, read with forward hooks during the model's own forward pass.

A site is a named value inside block b (`attn_out:3`) or any module's output
(`module:transformer.h.5.mlp.c_fc`). Per block:

- resid_pre   the block's input (the residual stream before the block)
- resid_mid   the residual stream after attention, before the MLP
- resid_post  the block's output (before the final norm, which HF applies after the last block)
- attn_out    the attention sub-layer's output, as added to the residual stream
- mlp_out     the MLP's output, as added to the residual stream
- mlp_hidden  the MLP's hidden activation after the nonlinearity, the input of its output
              projection (Geva et al.'s "keys"; act(gate(x)) * up(x) for gated MLPs)

The model runs as Hugging Face wrote it: hooks only copy what its modules return or
receive, so every value is the model's own, not a re-implementation's. resid_pre and
resid_post need only the list of blocks, so they work for any family; the other names
come from one table per family (`FAMILIES`), keyed by `config.model_type`. Values are
taken in eval mode, where dropout is the identity.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from memscan.errors import InputError, ModelError

FLAG = "--sites"
BLOCK_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_hidden")
MODULE = "module"
Kind = Literal["output", "input"]
OUTPUT: Kind = "output"
INPUT: Kind = "input"
Templates = tuple[tuple[str, Kind], ...]  # (module path with {block}, kind) per summed read
# Words that name a sub-layer's modules across families: what an unmapped site name could mean.
HINTS = {
    "resid_mid": ("ln", "norm"),
    "attn_out": ("attn", "attention"),
    "mlp_out": ("mlp", "ffn", "feed_forward", "fc", "dense"),
    "mlp_hidden": ("mlp", "ffn", "feed_forward", "fc", "dense", "proj"),
}
MAX_NAMES = 12  # module names listed in one error line


@dataclass(frozen=True)
class Read:
    """One hooked value: a module's output (a forward hook) or its first input (a forward pre-hook).

    path is relative to the model handed to `parse`, as in `model.named_modules()`.
    """

    path: str
    kind: Kind


@dataclass(frozen=True)
class Site:
    """A resolved site: its name, block (None for `module:`) and the reads whose sum is its value."""

    name: str
    block: int | None
    reads: tuple[Read, ...]

    @property
    def label(self) -> str:
        """`attn_out:3` or `module:PATH`: the site as the user would write it for one block."""
        return f"{self.name}:{self.reads[0].path if self.block is None else self.block}"


@dataclass(frozen=True)
class Family:
    """Where a family's blocks live and how each site name is read from block `{block}`.

    blocks is the path of the ModuleList of blocks relative to `model.base_model`; each
    site is a tuple of (module path template, kind) whose values are summed.
    """

    blocks: str
    sites: dict[str, Templates]


# The block's own input and output: the same in every family, and all an unknown family offers.
RESIDUAL: dict[str, Templates] = {"resid_pre": (("{block}", INPUT),), "resid_post": (("{block}", OUTPUT),)}


def _table(mid: Templates, attn: str, mlp: str, hidden: str) -> dict[str, Templates]:
    """A family's site table from where its resid_mid, attention, MLP and MLP hidden values are read."""
    return {
        **RESIDUAL,
        "resid_mid": mid,
        "attn_out": ((attn, OUTPUT),),
        "mlp_out": ((mlp, OUTPUT),),
        "mlp_hidden": ((hidden, INPUT),),
    }


GPT2 = Family("h", _table(mid=(("{block}.ln_2", INPUT),), attn="{block}.attn", mlp="{block}.mlp",
                          hidden="{block}.mlp.c_proj"))
# GPT-NeoX adds attention through post_attention_dropout and the MLP through post_mlp_dropout.
# With use_parallel_residual (Pythia's default) the MLP reads LN(resid_pre), not resid_mid,
# and resid_post = resid_pre + attn_out + mlp_out; resid_mid is still resid_pre + attn_out, the
# stream as it stands after attention, so it is the same sum in both layouts.
GPT_NEOX = Family("layers", _table(mid=(("{block}", INPUT), ("{block}.post_attention_dropout", OUTPUT)),
                                   attn="{block}.post_attention_dropout", mlp="{block}.post_mlp_dropout",
                                   hidden="{block}.mlp.dense_4h_to_h"))
LLAMA = Family("layers", _table(mid=(("{block}.post_attention_layernorm", INPUT),), attn="{block}.self_attn",
                                mlp="{block}.mlp", hidden="{block}.mlp.down_proj"))
# OPT has no MLP module: fc1, the activation and fc2 are the block's own children, so fc2's input
# is act(fc1(x)) and fc2's output is what the MLP adds. Its MLP half works on (B*T, n) rows;
# `capture` folds them back to (B, T, n).
OPT_PRE_LN = Family("decoder.layers", _table(mid=(("{block}.final_layer_norm", INPUT),), attn="{block}.self_attn",
                                             mlp="{block}.fc2", hidden="{block}.fc2"))
# OPT-350m (do_layer_norm_before=False) normalises after each residual sum: the stream the MLP
# half starts from, and adds to, is self_attn_layer_norm's output.
OPT_POST_LN = Family("decoder.layers", {**OPT_PRE_LN.sites, "resid_mid": (("{block}.self_attn_layer_norm", OUTPUT),)})
FAMILIES = {"gpt2": GPT2, "gpt_neox": GPT_NEOX, "llama": LLAMA, "mistral": LLAMA, "opt": OPT_PRE_LN}


def family_of(config: Any) -> Family | None:
    """The site table for a model's config (None for a family memscan has no table for)."""
    if config.model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        return OPT_POST_LN
    return FAMILIES.get(config.model_type)


# ---------------------------------------------------------------- parsing


def parse(spec: str, num_blocks: int, model: torch.nn.Module) -> list[Site]:
    """Resolve a --sites string such as `resid_post:all,mlp_hidden:-1,module:transformer.h.0.mlp`.

    Items are comma-separated; a block item is NAME:BLOCKS with BLOCKS one of `all`, an index
    (negative counts from the end) or an inclusive range `A-B`. Returns the sites in the order
    given, each once. Raises InputError (one line) for an unknown name, a block out of range,
    a malformed range, an unknown module path (with close matches), or a name the model's
    family cannot map (with the module names that could be meant); ModelError where a
    family's table names a module this model lacks (a variant of the family).
    """
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise InputError(f"{FLAG} needs comma-separated items such as resid_post:all,mlp_hidden:-1; got '{spec}'")
    names = dict(model.named_modules())
    sites: list[Site] = []
    for item in items:
        sites.extend(_parse_item(item, num_blocks, model, names))
    return list(dict.fromkeys(sites))


def _parse_item(item: str, num_blocks: int, model: torch.nn.Module,
                names: dict[str, torch.nn.Module]) -> list[Site]:
    """The sites of one NAME:BLOCKS or module:PATH item."""
    name, sep, where = item.partition(":")
    if name == MODULE:
        return [Site(MODULE, None, (Read(_module_path(where, item, names), OUTPUT),))]
    if name not in BLOCK_SITES:
        close = difflib.get_close_matches(name, (*BLOCK_SITES, MODULE), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"{FLAG}: unknown site '{name}' in '{item}'{hint}; "
                         f"known: {', '.join(BLOCK_SITES)}, module:PATH")
    if not sep or not where:
        raise InputError(f"{FLAG}: '{item}' needs blocks after the name: {name}:all, {name}:0, {name}:-1 or {name}:0-5")
    blocks, templates = _locate(name, model, names)
    found = [Site(name, b, tuple(Read(t.format(block=f"{blocks}.{b}"), kind) for t, kind in templates))
             for b in parse_blocks(where, num_blocks, item)]
    missing = [read.path for site in found for read in site.reads if read.path not in names]
    if missing:
        raise ModelError(f"{FLAG}: memscan's '{model.config.model_type}' table reads {name} from module "
                         f"{missing[0]}, which this model lacks; name a module instead (module:PATH)")
    return found


def _module_path(path: str, item: str, names: dict[str, torch.nn.Module]) -> str:
    """A module path of the model, checked; the error offers the closest real names."""
    if path in names and path:
        return path
    close = difflib.get_close_matches(path, [n for n in names if n], n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; list them with model.named_modules()"
    raise InputError(f"{FLAG}: '{item}' names no module of this model{hint}")


def parse_blocks(where: str, num_blocks: int, item: str) -> list[int]:
    """Block indices 0..num_blocks-1 from `all`, `N` (negative from the end) or an inclusive `A-B`."""
    if where == "all":
        return list(range(num_blocks))
    match = re.fullmatch(r"(-?\d+)|(\d+)-(\d+)", where)
    if match is None:
        raise InputError(f"{FLAG}: blocks in '{item}' must be all, an index (-1 is the last) or a range A-B; "
                         f"got '{where}'")
    if match.group(1) is not None:
        block = int(match.group(1))
        if not -num_blocks <= block < num_blocks:
            raise InputError(f"{FLAG}: block in '{item}' must be in {-num_blocks}..{num_blocks - 1} "
                             f"for the model's {num_blocks} blocks; got {block}")
        return [block % num_blocks]
    start, stop = int(match.group(2)), int(match.group(3))
    if start > stop or stop >= num_blocks:
        raise InputError(f"{FLAG}: range in '{item}' must be A-B with A <= B <= {num_blocks - 1} "
                         f"for the model's {num_blocks} blocks; got {start}-{stop}")
    return list(range(start, stop + 1))


def _locate(name: str, model: torch.nn.Module, names: dict[str, torch.nn.Module]) -> tuple[str, Templates]:
    """(path of the model's block list, the site's read templates) for a block site name."""
    family = family_of(model.config)
    if family is not None:
        return _join(_base_prefix(model), family.blocks), family.sites[name]
    blocks = _find_blocks(model, names)
    if name in RESIDUAL and blocks is not None:
        return blocks, RESIDUAL[name]
    raise InputError(_unmapped(name, model.config.model_type, blocks, names))


def _unmapped(name: str, model_type: str, blocks: str | None, names: dict[str, torch.nn.Module]) -> str:
    """One line for a site name an unknown family cannot map, listing modules that could be meant."""
    where = f"{blocks}.0." if blocks is not None else ""
    inside = [n for n in names if n.startswith(where) and n != where.rstrip(".")]
    hinted = [n for n in inside if any(h in n[len(where):].lower() for h in HINTS.get(name, ()))]
    children = [n for n in inside if "." not in n[len(where):]]
    listed = (hinted or children)[:MAX_NAMES]
    return (f"{FLAG}: memscan has no table for model type '{model_type}' to find '{name}' "
            f"(tables: {', '.join(sorted(FAMILIES))}); name a module instead, e.g. "
            + ", ".join(f"module:{n}" for n in listed))


def _base_prefix(model: torch.nn.Module) -> str:
    """The path of `model.base_model` inside `model` ('' when the model is its own base)."""
    base = getattr(model, "base_model", model)
    return next(n for n, m in model.named_modules() if m is base)


def _find_blocks(model: torch.nn.Module, names: dict[str, torch.nn.Module]) -> str | None:
    """The path of the shortest-named ModuleList holding config.num_hidden_layers modules, if any."""
    count = getattr(model.config, "num_hidden_layers", None)
    lists = [n for n, m in names.items() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return min(lists, key=len) if lists else None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


# ---------------------------------------------------------------- capture


@dataclass
class Captured:
    """What one forward pass left at the hooked sites; `values()` reads it after the pass."""

    sites: Sequence[Site]
    positions: torch.Tensor | None
    parts: dict[Read, torch.Tensor] = field(default_factory=dict)
    batch_shape: tuple[int, int] | None = None

    def values(self) -> list[torch.Tensor]:
        """One (B, P, n_site) tensor per site, in `sites` order, in the model's dtype.

        P is len(positions) (T when positions is None). A summed site is added on the
        device of its first part. Raises ModelError for a site whose module did not run.
        """
        return [self._value(site) for site in self.sites]

    def _value(self, site: Site) -> torch.Tensor:
        missing = [read.path for read in site.reads if read not in self.parts]
        if missing:
            raise ModelError(f"{FLAG}: {site.label} was not computed: module {missing[0]} did not run "
                             "in the forward pass (run one forward pass of the model inside the capture)")
        first, *rest = (self.parts[read] for read in site.reads)
        for part in rest:
            first = first + part.to(first.device)
        return first

    def keep(self, read: Read, value: torch.Tensor) -> None:
        """Store the kept positions of one hooked value (B, T, n) or flattened (B*T, n)."""
        if read in self.parts:
            raise ModelError(f"{FLAG}: module {read.path} ran twice in one forward pass; "
                             "capture one forward pass per `with sites.capture(...)`")
        value = self._unflatten(read, value.detach())
        self.parts[read] = value.clone() if self.positions is None else value[:, self.positions.to(value.device)]

    def _unflatten(self, read: Read, value: torch.Tensor) -> torch.Tensor:
        """(B*T, n) rows, as OPT's MLP half makes them, back to (B, T, n)."""
        if value.dim() != 2:
            return value
        if self.batch_shape is None:
            raise ModelError(f"{FLAG}: module {read.path} gave a 2-D value, and the batch shape is unknown: "
                             "run the model on input_ids, not inputs_embeds")
        return value.reshape(*self.batch_shape, value.shape[-1])


@contextlib.contextmanager
def capture(model: torch.nn.Module, sites: Sequence[Site],
            positions: torch.Tensor | None = None) -> Iterator[Captured]:
    """Hooks for all `sites` (from `parse` on this model) for the one forward pass run inside the block.

    positions: (P,) int64 indices along T, applied inside each hook so only P positions
    are kept per site; None keeps all T. Run `model(...)` or `model.base_model(...)` once
    inside the `with`, then call `.values()` on what it yields. Every hook is removed on
    exit, also when the forward pass raises.
    """
    captured = Captured(sites, positions)
    reads = list(dict.fromkeys(read for site in sites for read in site.reads))
    handles = []
    try:
        handles.append(model.get_input_embeddings().register_forward_pre_hook(_shape_hook(captured)))
        for read in reads:
            module = model.get_submodule(read.path)
            if read.kind == OUTPUT:
                handles.append(module.register_forward_hook(_output_hook(captured, read)))
            else:
                handles.append(module.register_forward_pre_hook(_input_hook(captured, read), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _shape_hook(captured: Captured):
    """Records (B, T) from the token ids the input embedding sees, to fold flattened values back.

    The embedding, not the base model: OPTForCausalLM calls its decoder without its base model.
    """
    def hook(module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            captured.batch_shape = (int(args[0].shape[0]), int(args[0].shape[1]))
    return hook


def _output_hook(captured: Captured, read: Read):
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        captured.keep(read, _first_tensor(output, read))
    return hook


def _input_hook(captured: Captured, read: Read):
    """The module's first positional tensor, or its `hidden_states` keyword (how HF calls blocks)."""
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        value = args[0] if args else kwargs.get("hidden_states")
        captured.keep(read, _first_tensor(value, read))
    return hook


def _first_tensor(value: Any, read: Read) -> torch.Tensor:
    """A hooked value itself, or the first element of a tuple (attention returns (output, weights))."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"{FLAG}: module {read.path} gave its {read.kind} as {type(value).__name__}, not a tensor; "
                         "hook a module that returns one")
    return value
