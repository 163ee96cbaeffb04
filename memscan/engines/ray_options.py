"""Ray's side of every engine job: where and how wide to run (`RayOptions`), connecting, and reading results.

`ray` is an optional dependency: it is imported only inside the functions that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

from memscan.errors import InputError, MemscanError

if TYPE_CHECKING:
    from ray import ObjectRef

T = TypeVar("T")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: `address` None starts a local instance of num_workers x cpus_per_worker CPUs.

    gpus_per_worker is 0, a whole number, or 1/m (0.5, 0.25, ...): Ray packs fractions of
    one GPU, so only those shares fill every GPU without waiting forever for a place.
    """

    address: str | None = None
    num_workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: int = 1         # CPUs Ray reserves per task or extraction actor; FAISS threads of a shard actor

    def __post_init__(self) -> None:
        g = self.gpus_per_worker
        if g < 0 or (g > 0 and not (_whole(g) or _whole(1 / g))):
            raise InputError(f"--gpus-per-worker must be 0, a whole number or 1/m (0.5, 0.25, ...); got {g:g}")
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise InputError(f"--num-workers and --cpus-per-worker must be at least 1; got {self.num_workers} and "
                             f"{self.cpus_per_worker}")

    def task_resources(self) -> dict[str, float | None]:
        """Ray's num_cpus and num_gpus for one task or extraction actor."""
        return {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker or None}

    def worker_device(self, device: str) -> str:
        """The search device on a worker: without GPUs of its own, the CPU (Ray leaves unrequested GPUs visible)."""
        if self.gpus_per_worker:
            return device
        if device == "gpu":
            raise InputError("--device gpu with --engine ray needs --gpus-per-worker")
        return "cpu"


def _whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def gpu_slots(options: RayOptions) -> int:
    """How many workers of `gpus_per_worker` GPUs the live nodes hold at once (0 without GPUs asked for)."""
    import ray

    if not options.gpus_per_worker:
        return 0
    return sum(int(node["Resources"].get("GPU", 0) / options.gpus_per_worker + 1e-9)
               for node in ray.nodes() if node["Alive"])


def connect(options: RayOptions) -> ModuleType:
    """Ray, connected to `options.address` or to a new local instance; refuses GPUs no node has."""
    import ray

    if not ray.is_initialized():
        ray.init(address=options.address or "local", include_dashboard=False, log_to_driver=False,
                 num_cpus=None if options.address else options.num_workers * options.cpus_per_worker)
    if options.gpus_per_worker and not gpu_slots(options):
        raise InputError(f"--gpus-per-worker {options.gpus_per_worker:g}: no node of the Ray cluster has that many GPUs")
    return ray


def ray_get(refs: ObjectRef[T]) -> T:
    """ray.get of one result; a MemscanError raised on a worker comes back as itself (one line, not a remote
    traceback)."""
    return ray_get_all([refs])[0]


def ray_get_all(refs: list[ObjectRef[T]]) -> list[T]:
    """ray.get of a list of results, as `ray_get`."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MemscanError):
            raise exc.cause from None
        raise
