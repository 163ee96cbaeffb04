"""What a stored vector is: a site, a layer of that site, a position of a chunk.

The vocabulary every stage shares, below all of them: the residual stream's site name, the
layer and position specs of `extract`, and `SiteKey`, one stored set of vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memscan.errors import InputError

RESIDUAL = "hidden"   # the residual stream as output_hidden_states numbers it (--layers); also the site of every
                      # record written before sites existed
MODULE_LAYER = -1     # the layer of a module site (--sites module:PATH): it has no block


@dataclass(frozen=True, order=True)
class SiteKey:
    """One stored set of vectors: a site and its layer there. The residual stream (`RESIDUAL`) numbers layers as
    output_hidden_states does (0 = embeddings); a block site by block index; a module site has MODULE_LAYER."""

    site: str
    layer: int

    @property
    def is_residual(self) -> bool:
        return self.site == RESIDUAL

    def label(self) -> str:
        """`layer 3` on the residual stream, `attn_out 3` at a block site, the module's name for a module site."""
        if self.is_residual:
            return f"layer {self.layer}"
        return self.site if self.layer == MODULE_LAYER else f"{self.site} {self.layer}"


def site_of(record: Mapping[str, Any]) -> str:
    """The site a record (a summary, a layer entry, a manifest's site) names; records from before sites: RESIDUAL."""
    return str(record.get("site", RESIDUAL))


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """`last`, `all` or indices such as `0,6,-1` (-1 is the last) -> sorted layers in [0, num_layers]."""
    if spec == "last":
        return [num_layers]
    if spec == "all":
        return list(range(num_layers + 1))
    try:
        raw = [int(part) for part in spec.split(",")]
    except ValueError:
        raise InputError(f"--layers must be last, all, none (with --sites) or comma-separated integers; "
                         f"got '{spec}'") from None
    layers = sorted({layer + num_layers + 1 if layer < 0 else layer for layer in raw})
    if layers[0] < 0 or layers[-1] > num_layers:
        raise InputError(f"--layers {spec} is out of range: this model has layers 0-{num_layers} "
                         f"(0 = embeddings, {num_layers} = final hidden state)")
    return layers


def parse_positions(spec: str, chunk_tokens: int) -> list[int]:
    """`last` (the vector that predicts the next token), `all`, or `every:K` (K-1, 2K-1, ...)."""
    if spec == "last":
        return [chunk_tokens - 1]
    if spec == "all":
        return list(range(chunk_tokens))
    if spec.startswith("every:"):
        try:
            step = int(spec[6:])
        except ValueError:
            step = 0
        if 1 <= step <= chunk_tokens:
            return list(range(step - 1, chunk_tokens, step))
    raise InputError(f"--positions must be last, all or every:K with 1 <= K <= {chunk_tokens}; got '{spec}'")
