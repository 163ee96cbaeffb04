"""Ray's side of extraction's forward passes: the model resolved and run on workers, in capture actors fed
as batches are produced (`RayCapturePool`); the driver holds a skeleton of the model, never its weights.
"""

from __future__ import annotations

import collections
import functools
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import torch

from memscan import models
from memscan.engines.capture import CaptureSpec, Deliver, ModelRequest, OpenedModel
from memscan.engines.ray_options import RayOptions, connect, ray_get
from memscan.errors import InputError

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.actor import ActorHandle

K = TypeVar("K")
IN_FLIGHT_PER_ACTOR = 2   # one batch running, one queued behind it: an actor never waits for the driver
ACTOR_RESTARTS = 4        # a capture actor whose process dies is restarted and its batches retried (they are pure)


def open_on_workers(request: ModelRequest, options: RayOptions) -> OpenedModel:
    """The model described here without weights (`models.describe`), on the device and dtype a worker with the
    capture actors' resources resolves: the model runs there, so a driver without a GPU can extract on
    workers with one."""
    ray = connect(options)
    probe = ray.remote(**options.task_resources())(_resolve_here)
    device, dtype = ray_get(probe.remote(request.device, request.dtype, bool(options.gpus_per_worker)))
    return OpenedModel(models.describe(request.model, request.revision, request.trust_remote_code), device, dtype)


def _resolve_here(device: str, dtype: str, given_gpus: bool) -> tuple[torch.device, torch.dtype]:
    """models.resolve_device and resolve_dtype on this worker, using no GPU that Ray did not give it."""
    if not given_gpus:  # Ray leaves GPUs it did not give a worker visible
        if device.startswith("cuda"):
            raise InputError(f"--device {device} with --engine ray needs --gpus-per-worker: "
                             "the Ray workers are given no GPU")
        device = "cpu" if device == "auto" else device
    resolved = models.resolve_device(device)
    return resolved, models.resolve_dtype(dtype, resolved)


class _CaptureActor:
    """Runs the capturing forward pass on whole batches; loads the model on its first batch, so a model that does
    not load on a worker is a one-line error there (Ray keeps only the text of an error in a constructor)."""

    def __init__(self, spec: CaptureSpec):
        self.spec = spec

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        request = self.spec.model
        return models.load(request.model, dtype=models.DTYPES[self.spec.dtype], device=self.device,
                           revision=request.revision, trust_remote_code=request.trust_remote_code).model

    @functools.cached_property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    def capture(self, tokens: np.ndarray, following: np.ndarray) -> models.BatchCapture:
        """What the local pool's capture returns for one batch of (B, T) token ids, on the CPU."""
        spec = self.spec
        positions = torch.tensor(spec.positions, device=self.device)
        return _on_cpu(models.capture_batch(self.model, tokens, following, spec.targets, positions, spec.with_loss,
                                            self.device))


def _on_cpu(captured: models.BatchCapture) -> models.BatchCapture:
    """`captured` with every tensor in it moved to the CPU, to travel to the driver."""
    vec, *rest = captured
    return ([v.cpu() for v in vec], *(None if t is None else t.cpu() for t in rest))  # type: ignore[return-value]


class RayCapturePool(Generic[K]):
    """Capture actors fed as batches are produced; results reach `deliver(key, result)` in submission order.

    At most IN_FLIGHT_PER_ACTOR x num_workers batches are in flight (`window`), so the driver
    holds those batches and their results, never the corpus. Actors start on the first
    batch; `close` ends them, freeing their slots.
    """

    def __init__(self, spec: CaptureSpec, options: RayOptions, deliver: Deliver[K]):
        self.spec, self.options, self.deliver = spec, options, deliver
        self.window = IN_FLIGHT_PER_ACTOR * options.num_workers
        self._actors: list[ActorHandle] = []
        self._in_flight: collections.deque[tuple[K, ObjectRef[models.BatchCapture]]] = collections.deque()
        self._submitted = 0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, key: K, tokens: np.ndarray, following: np.ndarray) -> None:
        """Hand one batch of (B, T) token ids to the next actor, first delivering the oldest result if the window
        is full. Actors take batches in turn, so each has at most IN_FLIGHT_PER_ACTOR."""
        if len(self._in_flight) == self.window:
            self._deliver_oldest()
        actor = self._next_actor()
        self._in_flight.append((key, actor.capture.remote(tokens, following)))

    def finish(self) -> None:
        """Deliver every result still in flight."""
        while self._in_flight:
            self._deliver_oldest()

    def close(self) -> None:
        """End the actors (also after an error: their slots are free for the next job)."""
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._in_flight.clear()

    def _deliver_oldest(self) -> None:
        key, ref = self._in_flight.popleft()
        self.deliver(key, ray_get(ref))

    def _next_actor(self) -> ActorHandle:
        if not self._actors:
            ray = connect(self.options)
            actor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
                               **self.options.task_resources())(_CaptureActor)
            self._actors = [actor.remote(self.spec) for _ in range(self.options.num_workers)]
        actor = self._actors[self._submitted % len(self._actors)]
        self._submitted += 1
        return actor
