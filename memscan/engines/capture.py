"""Where an extraction's model runs: the model as the driver holds it, and the pool that runs the capturing
forward passes.

`LocalCapturePool` captures each batch in this process when it is submitted (`models.capture_batch`);
the Ray engine's pool (`memscan.engines.ray_capture.RayCapturePool`) hands batches to actors. Every pool
delivers each batch's result in submission order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

from memscan import models, preflight

K = TypeVar("K")
Deliver = Callable[[K, models.BatchCapture], None]   # called with each batch's key and result, in submission order


@dataclass(frozen=True)
class ModelRequest:
    """Which model runs, and where: --model, --revision, --trust-remote-code, --device, --dtype, --device-map
    and --max-memory as given."""

    model: str
    revision: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None


@dataclass(frozen=True)
class OpenedModel:
    """The model as the driver holds it (its weights, or a skeleton of fake tensors where workers run it) and
    the device and dtype it runs in."""

    loaded: models.LoadedModel
    device: torch.device
    dtype: torch.dtype


def open_here(request: ModelRequest) -> OpenedModel:
    """The model loaded in this process on the device and dtype `request` resolves to here."""
    device = models.resolve_device(request.device)
    dtype = models.resolve_dtype(request.dtype, device)
    loaded = models.load(request.model, dtype=dtype, device=device, revision=request.revision,
                         trust_remote_code=request.trust_remote_code, device_map=request.device_map,
                         max_memory=models.parse_max_memory(request.max_memory))
    return OpenedModel(loaded, device, dtype)


@dataclass(frozen=True)
class CaptureSpec:
    """What every batch's capture runs: the model, the device and dtype it resolved to, and what to keep."""

    model: ModelRequest
    device: str                      # as OpenedModel.device: cpu, cuda, ...
    dtype: str                       # bf16 | fp16 | fp32, likewise
    targets: list[models.Target]
    positions: list[int]
    with_loss: bool


class CapturePool(Protocol[K]):
    """Runs the capturing forward pass of each submitted batch; delivers the results in submission order."""

    def submit(self, key: K, tokens: np.ndarray, following: np.ndarray) -> None:
        """Capture one batch of (B, T) token ids (`following`: the next ids, -1 where none)."""

    def finish(self) -> None:
        """Deliver every result still in flight."""

    def close(self) -> None:
        """Free what the pool holds (also after an error)."""


class LocalCapturePool(Generic[K]):
    """Captures each batch in this process when it is submitted and delivers it at once; `clock` times the first."""

    def __init__(self, spec: CaptureSpec, model: OpenedModel, deliver: Deliver[K], clock: preflight.FirstBatchClock):
        self.spec, self.model, self.deliver, self.clock = spec, model, deliver, clock
        self.positions = torch.tensor(spec.positions, device=model.device)

    def submit(self, key: K, tokens: np.ndarray, following: np.ndarray) -> None:
        """Capture and deliver one batch."""
        self.clock.start()
        self.deliver(key, models.capture_batch(self.model.loaded.model, tokens, following, self.spec.targets,
                                               self.positions, self.spec.with_loss, self.model.device))
        self.clock.stop()

    def finish(self) -> None:
        """Nothing is in flight: each batch was delivered when submitted."""

    def close(self) -> None:
        """Nothing to free: the model is the caller's."""
