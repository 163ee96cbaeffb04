"""The Ray runners against the local runner on one machine: Ray's own overhead, in one run.

Exact self-join of clustered vectors (N x n); an IVF index built and self-joined as one
local index and as `--workers` shards in Ray actors; and an extraction with the
GPT-2-small-sized model of bench_extract (256-token chunks, every position, with loss);
each with the local runner and with `--engine ray` on a local Ray instance of `--workers` CPUs.

    python benchmarks/bench_ray.py [--n-vectors 20000] [--dim 256] [--chunks 24] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from memscan import store
from memscan.engines import ray_runner
from memscan.extract import ExtractSettings, extract
from memscan.knn import exact
from memscan.knn.index import IndexSettings, KnnIndex, build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import build_model  # noqa: E402
from bench_knn import clustered  # noqa: E402


def timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-vectors", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    options = ray_runner.RayOptions(num_workers=args.workers)
    engine = ray_runner.RayEngine(options)
    results = {}
    start = time.perf_counter()
    ray_runner.connect(options)
    results["ray_start_s"] = round(time.perf_counter() - start, 2)

    X = clustered(args.n_vectors, args.dim, seed=0)
    blocks = exact.array_blocks(np.arange(len(X)), X, args.block_rows)
    pairs = (-(-len(X) // args.block_rows)) ** 2
    local = timed(exact.self_join, blocks, 10)
    remote = timed(engine.self_join, blocks, 10)
    results["self_join"] = {"n_vectors": args.n_vectors, "dim": args.dim, "block_pairs": pairs,
                            "local_s": round(local, 2), "ray_s": round(remote, 2), "ray_over_local": round(remote / local, 2)}
    print(results, file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        store.write_vectors(Path(tmp) / "vectors", X, ["train"] * len(X), shard_rows=8192)
        settings = IndexSettings(factory="IVF256,Flat", nprobe=16)
        sharded = replace(settings, shards=args.workers)
        timings = {
            "local_build_s": timed(build, Path(tmp) / "vectors", Path(tmp) / "one", settings),
            "ray_build_s": timed(build, Path(tmp) / "vectors", Path(tmp) / "sharded", sharded, engine=engine),
            "local_self_join_s": timed(KnnIndex.load(Path(tmp) / "one").self_join, 10),
            "ray_self_join_s": timed(KnnIndex.load(Path(tmp) / "sharded", engine=engine).self_join, 10),
        }
        results["index"] = {"factory": settings.factory, "nprobe": settings.nprobe, "shards": args.workers,
                            **{name: round(seconds, 2) for name, seconds in timings.items()},
                            "ray_over_local_self_join": round(timings["ray_self_join_s"] / timings["local_self_join_s"], 2)}
    print(results, file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        settings = ExtractSettings(model=str(model), source="qf:documents=60", num_chunks=args.chunks, chunk_tokens=256,
                                   positions="all", batch_size=4, test_fraction=0.0)
        tokens = args.chunks * 256
        local = timed(extract, settings, Path(tmp) / "local")
        remote = timed(extract, settings, Path(tmp) / "ray", engine=engine)
        results["extract"] = {"tokens": tokens, "local_tokens_per_s": round(tokens / local, 1),
                              "ray_tokens_per_s": round(tokens / remote, 1), "ray_over_local": round(remote / local, 2)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
