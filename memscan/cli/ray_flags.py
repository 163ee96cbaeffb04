"""The Ray flags of `extract`, `index` and `query`, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from memscan.engines.knn import Engine, LocalEngine
from memscan.engines.ray_options import RayOptions
from memscan.engines.ray_runner import RayEngine
from memscan.errors import InputError

FLAGS = (
    click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
                 help="ray: run the work in Ray tasks and actors (the `ray` extra)."),
    click.option("--address", default=None, help="Ray cluster address [default: start a local instance]."),
    click.option("--num-workers", type=int, default=2, show_default=True, help="Ray workers (actors) to use."),
    click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="GPUs each Ray worker gets."),
    click.option("--cpus-per-worker", type=int, default=1, show_default=True,
                 help="CPUs (FAISS and torch threads) each Ray worker gets."),
)


def ray_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --engine, --address, --num-workers, --gpus-per-worker and --cpus-per-worker to a command."""
    for flag in reversed(FLAGS):
        command = flag(command)
    return command


def engine_of(engine: str, address: str | None, num_workers: int, gpus_per_worker: float,
              cpus_per_worker: int) -> Engine:
    """The engine the flags ask for, built here at the edge once and passed into the library:
    LocalEngine for --engine local, RayEngine (whose options check the numbers) for --engine ray;
    refuses --address without --engine ray."""
    if engine == "local":
        if address is not None:
            raise InputError(f"--address {address} needs --engine ray")
        return LocalEngine()
    return RayEngine(RayOptions(address, num_workers, gpus_per_worker, cpus_per_worker))
