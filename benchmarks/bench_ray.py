"""The Ray runners against the local runner on one machine: Ray's own overhead, in one run.

Exact self-join of clustered vectors (N x n); an IVF index built and self-joined as one
local index and as `--workers` shards in Ray actors; and an extraction with the
GPT-2-small-sized model of bench_extract (256-token chunks, every position, with loss);
each with the local runner and with `--engine ray` on a local Ray instance of `--workers` CPUs.

The query stage's scaling table (issue 23, `--parts query`): one dataset of --query-patterns
clustered patterns (above tuning.FLAT_MAX, so the self-join, the inner-product statistics and
the query blocks all go through the index) and --queries queries; an index built with
--shards W for each W of --scaling-workers (the same trained IVF, split W ways), and
`memscan query` over it with `--engine ray --num-workers W` (each shard in its own actor,
the inner-product scans in the actors over the shard's own lists) against `memscan query`
with the local engine over the one-shard index, each its own process, timed by wall clock
(Ray's start included, and measured apart). Every number of each Ray run's summary is checked
against the local engine's run over the same W-shard index (a W-shard index's approximate
searches probe W shards' lists, so its numbers are its own, not the one-shard index's).

    python benchmarks/bench_ray.py [--n-vectors 20000] [--dim 256] [--chunks 24] [--workers 2]
    python benchmarks/bench_ray.py --parts query --query-patterns 60000 --json ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
from bench_query import numbers, run, write_dataset  # noqa: E402

CLUSTER_NOTE = (
    "On one machine every Ray worker shares its cores and memory with the others and with the driver, so this "
    "table measures Ray's overhead (starting the instance and the actors, loading each shard in its actor, "
    "shipping queries and top-k lists through the object store, the driver's merge), not a speed-up: {cpus} "
    "cores here. On a cluster each worker's shard sits in its own node's memory and cores: the self-join and the "
    "inner-product scans (Delta, the MCHN top k, the query blocks' searches) divide by the workers, and an index "
    "too large for one machine fits in W machines' memory; the driver's merge of the W top-k lists, the exact "
    "re-ranking and the statistics on the driver stay as they are, and the network adds a round trip per block.")


def timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def summary_numbers(run_dir: Path) -> dict[str, float]:
    """Every number of a run's layers (timings left out): what two runs of one query must share."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {path: value for path, value in numbers(summary["layers"]).items() if not path.endswith("seconds")}


def ray_start_seconds(workers: int) -> float:
    """Seconds a fresh local Ray instance of `workers` CPUs takes to start, in its own process."""
    code = ("import time, ray; t = time.perf_counter(); "
            f"ray.init(address='local', num_cpus={workers}, include_dashboard=False, log_to_driver=False); "
            "print(time.perf_counter() - t); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 2)


def query_scaling(args: argparse.Namespace) -> dict:
    """The query stage with the local engine and on 1, 2, 4 ... local Ray workers (index with --shards W)."""
    work = Path(tempfile.mkdtemp(prefix="bench_ray-"))
    try:
        data = work / "data"
        write_dataset(data, args.query_patterns, args.queries, args.query_n, seed=0, clusters=args.clusters)
        common = ["--seed", "0", "--device", "cpu"]
        query = ["--queries", str(data), "--split", "test", "--k", str(args.k), *common]
        widths = sorted({1, *args.scaling_workers})
        builds = {w: run(["index", str(data), "--out", str(work / f"index-{w}"), "--shards", str(w), *common])
                  for w in widths}
        info = json.loads((work / "index-1" / "index.json").read_text())
        local = run(["query", str(work / "index-1"), *query, "--out", str(work / "local")])
        summary = json.loads((work / "local" / "summary.json").read_text())
        rows = [{"engine": "local", "workers": None, "shards": 1, "seconds": local["seconds"],
                 "ratio_to_local": 1.0, "peak_rss_gb": round(local["peak_rss_bytes"] / 1e9, 2),
                 "index_seconds": builds[1]["seconds"], "ray_start_seconds": None, "same_numbers": True}]
        print(f"local query: {local['seconds']} s", file=sys.stderr, flush=True)
        for w in args.scaling_workers:
            out = work / f"ray-{w}"
            remote = run(["query", str(work / f"index-{w}"), *query, "--out", str(out),
                          "--engine", "ray", "--num-workers", str(w)])
            if w != 1:   # the equality check: the local engine over the same W-shard index
                run(["query", str(work / f"index-{w}"), *query, "--out", str(work / f"local-{w}")])
            reference = summary_numbers(work / ("local" if w == 1 else f"local-{w}"))
            got = summary_numbers(out)
            differing = sorted(path for path in reference.keys() | got.keys() if reference.get(path) != got.get(path))
            rows.append({"engine": "ray", "workers": w, "shards": w, "seconds": remote["seconds"],
                         "ratio_to_local": round(remote["seconds"] / local["seconds"], 2),
                         "peak_rss_gb": round(remote["peak_rss_bytes"] / 1e9, 2),
                         "index_seconds": builds[w]["seconds"], "ray_start_seconds": ray_start_seconds(w),
                         "same_numbers": not differing, "differing": differing[:10]})
            print(f"ray query, {w} workers: {remote['seconds']} s", file=sys.stderr, flush=True)
        layer = summary["layers"][0]
        return {"patterns": args.query_patterns, "queries": args.queries, "n": args.query_n, "k": args.k,
                "cpus": os.cpu_count(), "factory": info["factory"], "search": info["search"],
                "inner_products": layer["A3"]["inner_products"]["search"], "rows": rows,
                "note": CLUSTER_NOTE.format(cpus=os.cpu_count())}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def scaling_table(result: dict) -> str:
    lines = [f"memscan query, {result['patterns']:,} patterns x n={result['n']}, {result['queries']:,} queries, "
             f"k={result['k']}, {result['cpus']} CPUs; index {result['factory']} {result['search']}; "
             f"inner products: {result['inner_products']}",
             "| engine | workers = shards | query s | / local | Ray start s | peak RSS GB | numbers = local, same index |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['engine']} | {r['workers'] or '-'} | {r['seconds']} | {r['ratio_to_local']} | "
                     f"{r['ray_start_seconds'] if r['ray_start_seconds'] is not None else '-'} | {r['peak_rss_gb']} | "
                     f"{'yes' if r['same_numbers'] else 'NO: ' + ', '.join(r['differing'])} |")
    return "\n".join(lines) + "\n\n" + result["note"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="self_join,index,extract,query",
                        help="Which parts to run, comma-separated: self_join, index, extract, query.")
    parser.add_argument("--n-vectors", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--query-patterns", type=int, default=60_000,
                        help="Patterns of the query scaling table (above 50,000: the inner products go through "
                             "the index).")
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--query-n", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=500)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--scaling-workers", type=lambda text: [int(w) for w in text.split(",")], default=[1, 2, 4],
                        help="Ray workers (= index shards) of the query scaling table, comma-separated.")
    parser.add_argument("--json", default=None, help="Write every number here as well.")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict = {}
    if parts & {"self_join", "index", "extract"}:
        results.update(in_process(args, parts))
    if "query" in parts:
        results["query_scaling"] = query_scaling(args)
        print(scaling_table(results["query_scaling"]))
    print(json.dumps({key: value for key, value in results.items() if key != "query_scaling"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def in_process(args: argparse.Namespace, parts: set[str]) -> dict:
    """The self-join, index and extraction parts, in this process beside a local Ray instance."""
    options = ray_runner.RayOptions(num_workers=args.workers)
    engine = ray_runner.RayEngine(options)
    results = {}
    start = time.perf_counter()
    ray_runner.connect(options)
    results["ray_start_s"] = round(time.perf_counter() - start, 2)

    X = clustered(args.n_vectors, args.dim, seed=0)
    blocks = exact.array_blocks(np.arange(len(X)), X, args.block_rows)
    if "self_join" in parts:
        pairs = (-(-len(X) // args.block_rows)) ** 2
        local = timed(exact.self_join, blocks, 10)
        remote = timed(engine.self_join, blocks, 10)
        results["self_join"] = {"n_vectors": args.n_vectors, "dim": args.dim, "block_pairs": pairs,
                                "local_s": round(local, 2), "ray_s": round(remote, 2),
                                "ray_over_local": round(remote / local, 2)}
        print(results, file=sys.stderr)

    if "index" in parts:
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
                                "ray_over_local_self_join": round(timings["ray_self_join_s"]
                                                                  / timings["local_self_join_s"], 2)}
        print(results, file=sys.stderr)

    if "extract" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            model = build_model(Path(tmp) / "model")
            settings = ExtractSettings(model=str(model), source="qf:documents=60", num_chunks=args.chunks,
                                       chunk_tokens=256, positions="all", batch_size=4, test_fraction=0.0)
            tokens = args.chunks * 256
            local = timed(extract, settings, Path(tmp) / "local")
            remote = timed(extract, settings, Path(tmp) / "ray", engine=engine)
            results["extract"] = {"tokens": tokens, "local_tokens_per_s": round(tokens / local, 1),
                                  "ray_tokens_per_s": round(tokens / remote, 1),
                                  "ray_over_local": round(remote / local, 2)}
    import ray
    ray.shutdown()
    return results


if __name__ == "__main__":
    main()
