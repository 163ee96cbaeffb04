"""The query stage at scale (issues 12 and 23): `memscan index` and `memscan query` as the user runs them,
beside a bare-FAISS baseline of the same index.

Data: clustered float16 vectors (--clusters, 5,000 by default, or one per --patterns-per-cluster
patterns; noise half the centre spread), n = 256, d patterns (the `train` split) for each of
--sizes (up to 10,000,000: written in blocks of 262,144 rows, so memory stays bounded; 10M x 256
float16 is 5 GB on disk) and --queries queries (the `test` split) of the same distribution.
Each command runs as its own process (`python -m memscan ...`), timed by wall clock, its peak
RSS polled (psutil, the process and its children, every 50 ms). Per size it reports the
index's factory and tuned search parameters, every recall the query's summary writes beside
an approximate statistic (the lowest over layers), and the targets issue 23 sets: time at 10x
the patterns over time at 1x (index and query together, at most 12x), and each command's peak
RSS at most the index's size plus 4 GB (the query's growth apart from the index is printed too).

The baseline (issue 23), per size, in the same invocation: the factory, training-sample size
and search parameters memscan's index.json records, built by FAISS alone in its own process
(`--baseline-only DATA`): the train split read from the dataset's Parquet shards, the factory
trained by FAISS's default k-means on a seeded sample of that size and filled, then the
self-join: every pattern's --k + 1 nearest at the recorded nprobe (efSearch), its own row
dropped, without memscan's exact re-ranking. The table gives memscan's query over that
self-join and memscan's index over the bare build (training and adding, reading aside).
At --exact-at (100,000 by default; else the smallest size with an approximate index, at least
50,000) the query runs again with --exact, and every number of the two summaries is compared.

    python benchmarks/bench_query.py                                  # 100k, 300k, 1M: long
    python benchmarks/bench_query.py --sizes 20000,60000 --queries 2000   # a smoke run, a few minutes
    python benchmarks/bench_query.py --sizes 1000000,10000000 --index-memory 12GB --baseline-at 1000000 --json out.json
    python benchmarks/bench_query.py --quantizers 1024,4096,16384,65536   # flat vs HNSW32 coarse quantizer
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from memscan.knn.tuning import FLAT_MAX

CLUSTERS = 5000          # the 1M x 256 measurement
POLL_SECONDS = 0.05
BLOCK_ROWS = 262_144     # rows generated (float32) and written at once
SHARD_ROWS = 65_536      # rows a Parquet shard holds (store.write_vectors' default)
TIME_GROWTH = 1.2        # issue 23: 1M -> 10M patterns at most 12x the time
RSS_ABOVE_INDEX = 4e9    # issue 23: each command's peak RSS at most the index's size plus 4 GB


def write_dataset(directory: Path, patterns: int, queries: int, n: int, seed: int, clusters: int = CLUSTERS) -> None:
    """`patterns` train rows and `queries` test rows of clustered float16 vectors: what `store.write_vectors`
    writes (the same shards, byte for byte), generated and written BLOCK_ROWS at a time, so a 10M-row
    dataset never sits in memory."""
    from memscan.store.formats import DEFAULT_SITE, rows_table, schema
    from memscan.store.manifest import new_manifest, write_manifest
    from memscan.store.writers import ShardWriter

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, n)).astype(np.float32)
    count = patterns + queries
    manifest = new_manifest(
        fingerprint=None, settings={"source": "vectors", "imported": True},
        model={"id": "synthetic", "class": None, "num_parameters": 0}, source={"kind": "vectors"}, n=n, layers=[0],
        positions="n/a", chunk_tokens=0, dtype="n/a", vec_dtype="float16", seed=None, rows_per_chunk=1)
    writer = ShardWriter(directory, schema(n, "float16"), SHARD_ROWS, 0,
                         lambda info: manifest["shards"].append(info.to_dict()))
    for start in range(0, count, BLOCK_ROWS):   # float32 only one block at a time
        rows = np.arange(start, min(count, start + BLOCK_ROWS), dtype=np.int64)
        block = centers[rng.integers(0, clusters, len(rows))] + 0.5 * rng.normal(size=(len(rows), n)).astype(np.float32)
        m = len(rows)
        columns = {"row_id": rows, "doc_id": rows, "chunk_id": np.zeros(m, np.int64), "position": np.zeros(m, np.int32),
                   "token_id": np.full(m, -1, np.int32), "next_token_id": np.full(m, -1, np.int32),
                   "nll": np.full(m, np.nan, np.float32),
                   "split": np.where(rows < patterns, "train", "test").astype(object),
                   "layer": np.zeros(m, np.int16), "site": np.full(m, DEFAULT_SITE, object)}
        writer.write(rows_table(columns, block.astype(np.float16), writer.schema))
    writer.close()
    counts = {split: rows for split, rows in (("test", queries), ("train", patterns)) if rows}
    manifest["counts"] = {"chunks": dict(counts), "rows": dict(counts)}
    manifest["complete"] = True
    write_manifest(directory, manifest)


def dataset(args: argparse.Namespace, work: Path, patterns: int, clusters: int) -> tuple[Path, float]:
    """The dataset of one size and its writing seconds: under --keep DIR one named by everything it is drawn
    from, reused when a whole one is there (0 s), else written under a temporary name and renamed."""
    if not isinstance(args.keep, str):
        data = work / f"data-{patterns}"
        started = time.perf_counter()
        write_dataset(data, patterns, args.queries, args.n, args.seed, clusters)
        return data, round(time.perf_counter() - started, 2)
    keep = Path(args.keep)
    data = keep / f"data-{patterns}-q{args.queries}-n{args.n}-c{clusters}-s{args.seed}"
    if (data / "manifest.json").is_file() and json.loads((data / "manifest.json").read_text()).get("complete"):
        return data, 0.0
    partial = data.with_name(data.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    write_dataset(partial, patterns, args.queries, args.n, args.seed, clusters)
    partial.rename(data)
    return data, round(time.perf_counter() - started, 2)


def run_process(argv: list[str], what: str) -> dict[str, Any]:
    """A command as its own process: wall seconds, peak RSS (bytes, with children), exit code, output."""
    started = time.perf_counter()
    process = psutil.Popen(argv, stdout=-1, stderr=-1, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    peak = 0
    while process.poll() is None:
        try:
            members = [process, *process.children(recursive=True)]
            peak = max(peak, sum(member.memory_info().rss for member in members))
        except psutil.NoSuchProcess:
            pass
        time.sleep(POLL_SECONDS)
    out, err = process.communicate()
    result = {"seconds": round(time.perf_counter() - started, 2), "peak_rss_bytes": peak, "code": process.returncode,
              "stdout": out.strip().splitlines()}
    if process.returncode != 0:
        raise SystemExit(f"`{what}` failed ({process.returncode}):\n{err[-3000:]}")
    return result


def run(args: list[str]) -> dict[str, Any]:
    """One memscan command as its own process (`run_process`)."""
    return run_process([sys.executable, "-m", "memscan", *args], f"memscan {' '.join(args)}")


def numbers(document: Any, path: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON document by its path (a.b[2].c)."""
    if isinstance(document, dict):
        return {key: value for name, child in document.items()
                for key, value in numbers(child, f"{path}.{name}" if path else name).items()}
    if isinstance(document, list):
        return {key: value for i, child in enumerate(document) for key, value in numbers(child, f"{path}[{i}]").items()}
    if isinstance(document, (int, float)) and not isinstance(document, bool):
        return {path: float(document)}
    return {}


def recalls(summary: dict[str, Any]) -> dict[str, float]:
    """Every recall the summary writes beside an approximate statistic (recall_1_at_1, recall_k_at_k, ...),
    not its settings (a target) nor the curves a parameter was tuned on."""
    return {path: value for path, value in numbers(summary).items()
            if path.rsplit(".", 1)[-1].startswith("recall") and "[" not in path.rsplit(".", 1)[-1]
            and not any(word in path for word in ("tuning", "curve"))}


def compare(approximate: dict[str, Any], exact: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every statistic the two summaries share: {path: {approximate, exact, relative difference}}
    (recalls, timings, sizes and file records left out)."""
    a, b = numbers(approximate), numbers(exact)
    skip = ("recall", "seconds", "time", "rss", "memory", "bytes", "blocks", "index_info", "tables", "format")
    return {path: {"approximate": a[path], "exact": b[path],
                   "relative": abs(a[path] - b[path]) / max(abs(b[path]), 1e-12)}
            for path in sorted(a.keys() & b.keys()) if not any(word in path.lower() for word in skip)}


def index_bytes(index_dir: Path) -> int:
    info = json.loads((index_dir / "index.json").read_text())
    return sum(entry[key]["bytes"] for entry in info["shards"] for key in ("index", "row_ids"))


def lowest_recalls(summary: dict[str, Any]) -> dict[str, float]:
    """`recalls`, each the lowest over the summary's layers (layers[i]. left out of its name)."""
    out: dict[str, float] = {}
    for path, value in recalls(summary).items():
        name = path.split(".", 1)[1] if path.startswith("layers[") and "." in path else path
        out[name] = min(value, out.get(name, math.inf))
    return out


def one_size(work: Path, patterns: int, args: argparse.Namespace, exact: bool) -> dict[str, Any]:
    """Dataset, index, query, the bare-FAISS baseline (and the --exact query) at one size: one table row."""
    index_dir = work / f"index-{patterns}"
    clusters = patterns // args.patterns_per_cluster if args.patterns_per_cluster else args.clusters
    data, write_seconds = dataset(args, work, patterns, clusters)
    row: dict[str, Any] = {"patterns": patterns, "queries": args.queries, "n": args.n, "clusters": clusters,
                           "data": str(data), "write_seconds": write_seconds}
    common = ["--device", args.device, "--seed", str(args.seed)]
    index_memory = args.index_memory or args.memory
    row["index"] = run(["index", str(data), "--out", str(index_dir), *common,
                        *(["--index-memory", index_memory] if index_memory else [])])
    common += ["--memory", args.memory] if args.memory else []
    info = json.loads((index_dir / "index.json").read_text())
    row.update(factory=info["factory"], factory_reason=info["factory_reason"], search=info["search"],
               train_size=info["build"]["train_size"], tuning=info.get("tuning"), index_bytes=index_bytes(index_dir))
    query = ["query", str(index_dir), "--queries", str(data), "--split", "test", "--k", str(args.k), *common]
    row["query"] = run([*query, "--out", str(work / f"run-{patterns}")])
    summary = json.loads((work / f"run-{patterns}" / "summary.json").read_text())
    row["recalls"] = recalls(summary)
    row["lowest_recalls"] = lowest_recalls(summary)
    if not args.skip_baseline and (args.baseline_at is None or patterns in args.baseline_at):
        out = work / f"baseline-{patterns}.json"
        row["baseline"] = run_process(
            [sys.executable, str(Path(__file__).resolve()), "--baseline-only", str(data), "--factory", info["factory"],
             "--search", json.dumps(info["search"]), "--train-size", str(info["build"]["train_size"]),
             "--k", str(args.k), "--seed", str(args.seed), "--device", args.device, "--json", str(out)],
            f"bare FAISS {info['factory']} at {patterns:,}")
        row["baseline"].update(json.loads(out.read_text()))
        out.unlink()
    if exact:
        row["query_exact"] = run([*query, "--exact", "--out", str(work / f"exact-{patterns}")])
        exact_summary = json.loads((work / f"exact-{patterns}" / "summary.json").read_text())
        row["approximate_vs_exact"] = compare(summary, exact_summary)
    if args.keep is not True:   # --keep DIR keeps the datasets there, not the indexes and runs
        kept = isinstance(args.keep, str)
        for folder in ((() if kept else (data,)) + (index_dir, work / f"run-{patterns}", work / f"exact-{patterns}")):
            shutil.rmtree(folder, ignore_errors=True)
    return row


# ---------------------------------------------------------------- the bare-FAISS baseline (its own process)


def train_blocks(data: Path, timer: dict[str, float]) -> Any:
    """The train split of a dataset as float32 blocks (one per Parquet shard, in row order), read with pyarrow
    alone; the seconds spent reading and converting are added to timer["read"]."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["shards"]:
        started = time.perf_counter()
        table = pq.read_table(data / shard["name"], columns=["split", "vec"])
        split = table.column("split")
        if pa.types.is_dictionary(split.type):
            split = split.cast(pa.string())
        keep = pc.equal(split, "train").to_numpy(zero_copy_only=False)
        vec = table.column("vec").combine_chunks()
        X = vec.flatten().to_numpy().reshape(len(vec), -1)[keep].astype(np.float32)
        timer["read"] += time.perf_counter() - started
        if len(X):
            yield X


def baseline(data: Path, factory: str, search: dict[str, int], train_size: int, k: int, seed: int,
             device: str) -> dict[str, Any]:
    """FAISS alone: `factory` trained (FAISS's default k-means) on a seeded sample of `train_size` train rows,
    filled with every train row, then every row's k + 1 nearest at the `search` parameters (nprobe, efSearch;
    k_factor, memscan's re-ranking, has no bare counterpart), its own row dropped. Seconds of each step,
    reading aside (timer["read"])."""
    import faiss

    manifest = json.loads((data / "manifest.json").read_text())
    n, count = manifest["n"], manifest["counts"]["rows"]["train"]
    timer = {"read": 0.0}
    index = faiss.index_factory(n, factory)
    gpu = device == "gpu" or (device == "auto" and faiss.get_num_gpus() > 0)
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    chosen = np.sort(np.random.default_rng(seed).choice(count, size=min(train_size, count), replace=False))
    sample, seen = [], 0
    for X in train_blocks(data, timer):
        lo, hi = np.searchsorted(chosen, [seen, seen + len(X)])
        sample.append(X[chosen[lo:hi] - seen])
        seen += len(X)
    started = time.perf_counter()
    if not index.is_trained:
        index.train(np.concatenate(sample))
    train_seconds = time.perf_counter() - started
    del sample
    add_seconds = 0.0
    for X in train_blocks(data, timer):
        started = time.perf_counter()
        index.add(X)
        add_seconds += time.perf_counter() - started
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value in search.items():
        if name in ("nprobe", "efSearch"):
            space.set_index_parameter(index, name, value)
    join_seconds, first, self_found, missing = 0.0, 0, 0, 0
    for X in train_blocks(data, timer):
        started = time.perf_counter()
        _, I = index.search(X, k + 1)
        own = np.arange(first, first + len(X))[:, None]
        self_found += int((I == own).any(axis=1).sum())
        kept = np.where(I == own, -1, I)
        missing += int(((kept >= 0).sum(axis=1) < k).sum())
        join_seconds += time.perf_counter() - started
        first += len(X)
    return {"factory": factory, "search": {name: value for name, value in search.items() if name != "k_factor"},
            "train_size": len(chosen), "device": "gpu" if gpu else "cpu", "patterns": count, "k": k,
            "read_seconds": round(timer["read"], 2), "train_seconds": round(train_seconds, 2),
            "add_seconds": round(add_seconds, 2), "build_seconds": round(train_seconds + add_seconds, 2),
            "self_join_seconds": round(join_seconds, 2), "self_found": round(self_found / count, 4),
            "short_of_k": missing}


# ---------------------------------------------------------------- the coarse quantizer: flat vs HNSW32


def quantizers(lists: list[int], vectors: int, n: int, seed: int) -> list[dict[str, Any]]:
    """Time to assign a vector to its nearest of `nlist` centroids: a flat scan against an HNSW32 graph
    (efSearch 16 and 32, with its agreement with the flat scan and its build), centroids and vectors drawn
    from the benchmark's clustered distribution (memscan.knn.tuning.HNSW_QUANTIZER_MIN cites this)."""
    import faiss

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(CLUSTERS, n)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        return centers[rng.integers(0, CLUSTERS, m)] + 0.5 * rng.normal(size=(m, n)).astype(np.float32)

    rows = []
    for nlist in lists:
        C, X = draw(nlist), draw(min(vectors, max(20_000, vectors * 4096 // nlist)))
        flat = faiss.IndexFlatL2(n)
        flat.add(C)
        started = time.perf_counter()
        _, nearest = flat.search(X, 1)
        row = {"nlist": nlist, "vectors": len(X), "flat_us": 1e6 * (time.perf_counter() - started) / len(X)}
        graph = faiss.IndexHNSWFlat(n, 32)
        started = time.perf_counter()
        graph.add(C)
        row["hnsw_build_s"] = time.perf_counter() - started
        for ef in (16, 32):
            graph.hnsw.efSearch = ef
            started = time.perf_counter()
            _, found = graph.search(X, 1)
            row[f"hnsw_ef{ef}_us"] = 1e6 * (time.perf_counter() - started) / len(X)
            row[f"hnsw_ef{ef}_agree"] = float((found[:, 0] == nearest[:, 0]).mean())
        rows.append({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Time growth between every two sizes (target: at most TIME_GROWTH times the growth of d); query RSS between
    the largest two."""
    out: dict[str, Any] = {"time": []}
    for small, large in itertools.combinations(rows, 2):
        growth = large["patterns"] / small["patterns"]
        entry = {"from": small["patterns"], "to": large["patterns"], "d_ratio": round(growth, 2)}
        for stage in ("index", "query"):
            entry[f"{stage}_ratio"] = round(large[stage]["seconds"] / small[stage]["seconds"], 2)
        total = ((large["index"]["seconds"] + large["query"]["seconds"])
                 / (small["index"]["seconds"] + small["query"]["seconds"]))
        entry.update(total_ratio=round(total, 2), exponent=round(math.log(total) / math.log(growth), 2),
                     within_target=total <= TIME_GROWTH * growth)
        out["time"].append(entry)
    if len(rows) >= 2:
        small, large = rows[-2], rows[-1]
        rss = large["query"]["peak_rss_bytes"] / small["query"]["peak_rss_bytes"]
        apart = ((large["query"]["peak_rss_bytes"] - large["index_bytes"])
                 / max(1, small["query"]["peak_rss_bytes"] - small["index_bytes"]))
        out["query_rss"] = {"from": small["patterns"], "to": large["patterns"], "ratio": round(rss, 2),
                            "ratio_apart_from_index": round(apart, 2)}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """One line per size: memscan's index and query (time, peak RSS), every recall (the lowest over layers),
    the bare-FAISS baseline and the ratios to it."""
    gb = 1e9
    names = list(dict.fromkeys(name for row in rows for name in row["lowest_recalls"]))
    head = (["patterns", "factory, search", "index s", "index peak RSS", "query s", "query peak RSS", *names,
             "bare read s", "bare build s", "bare self-join s", "bare peak RSS", "query / bare self-join",
             "index / bare build", "--exact query"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        bare = row.get("baseline")
        cells = [f"{row['patterns']:,}", f"{row['factory']} {row['search']}",
                 f"{row['index']['seconds']:.1f}", f"{row['index']['peak_rss_bytes'] / gb:.2f} GB",
                 f"{row['query']['seconds']:.1f}", f"{row['query']['peak_rss_bytes'] / gb:.2f} GB",
                 *(f"{row['lowest_recalls'][name]:.3f}" if name in row["lowest_recalls"] else "" for name in names)]
        if bare:
            cells += [f"{bare['read_seconds']:.1f}", f"{bare['build_seconds']:.1f}", f"{bare['self_join_seconds']:.1f}",
                      f"{bare['peak_rss_bytes'] / gb:.2f} GB",
                      f"{row['query']['seconds'] / max(bare['self_join_seconds'], 1e-3):.1f}x",
                      f"{row['index']['seconds'] / bare['build_seconds']:.1f}x" if bare["build_seconds"] >= 0.05 else "-"]
        else:
            cells += [""] * 6
        cells.append(f"{row['query_exact']['seconds']:.1f} s, {row['query_exact']['peak_rss_bytes'] / gb:.2f} GB"
                     if "query_exact" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,300000,1000000", help="Pattern counts d, comma-separated.")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=CLUSTERS, help="Clusters the data is drawn from.")
    parser.add_argument("--exact-at", type=int, default=100_000,
                        help="The size also queried with --exact (0: none).")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--memory", default=None,
                        help="--index-memory for the index, --memory for the query [default: theirs].")
    parser.add_argument("--index-memory", default=None,
                        help="--index-memory for the index alone (the index's size), overriding --memory's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patterns-per-cluster", type=int, default=0,
                        help="Clusters grow with d, one per this many patterns [default: --clusters at every d].")
    parser.add_argument("--work", default=None, help="Folder for datasets, indexes and runs [default: temporary].")
    parser.add_argument("--keep", nargs="?", const=True, default=None, metavar="DIR",
                        help="Keep each size's files; with DIR, keep the generated datasets there, named by "
                             "size, queries, n, clusters and seed, and reuse them in later invocations.")
    parser.add_argument("--skip-baseline", action="store_true", help="No bare-FAISS baseline.")
    parser.add_argument("--baseline-at", default=None, type=lambda text: {int(v) for v in text.split(",")},
                        metavar="SIZES", help="The bare-FAISS baseline at these sizes only [default: every size].")
    parser.add_argument("--json", default=None, help="Write every number here as well.")
    parser.add_argument("--baseline-only", default=None, metavar="DATA",
                        help="Only the bare-FAISS baseline over dataset DATA (--factory, --search, --train-size, "
                             "--k, --seed, --device), its numbers to --json: what a size's baseline process runs.")
    parser.add_argument("--factory", default=None, help="With --baseline-only: the FAISS factory string.")
    parser.add_argument("--search", default="{}", help="With --baseline-only: search parameters as JSON.")
    parser.add_argument("--train-size", type=int, default=None, help="With --baseline-only: the k-means sample.")
    parser.add_argument("--quantizers", default=None, metavar="NLISTS",
                        help="Only time a flat against an HNSW32 coarse quantizer at these nlist, comma-separated.")
    parser.add_argument("--quantizer-vectors", type=int, default=100_000,
                        help="Vectors assigned per nlist with --quantizers (fewer above 4,096 lists).")
    args = parser.parse_args()
    if args.baseline_only:
        if not args.factory or args.train_size is None:
            parser.error("--baseline-only needs --factory and --train-size")
        result = baseline(Path(args.baseline_only), args.factory, json.loads(args.search), args.train_size, args.k,
                          args.seed, args.device)
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    if args.quantizers:
        rows = quantizers([int(v) for v in args.quantizers.split(",")], args.quantizer_vectors, args.n, args.seed)
        print("| nlist | vectors | flat | HNSW32 ef16 (agree) | HNSW32 ef32 (agree) | graph build |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['nlist']:,} | {r['vectors']:,} | {r['flat_us']:.1f} us | {r['hnsw_ef16_us']:.1f} us "
                  f"({r['hnsw_ef16_agree']:.2f}) | {r['hnsw_ef32_us']:.1f} us ({r['hnsw_ef32_agree']:.2f}) | "
                  f"{r['hnsw_build_s']:.1f} s |")
        if args.json:
            Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "quantizers": rows}, indent=2))
        return
    sizes = sorted(int(size) for size in args.sizes.split(","))
    exact_at = args.exact_at if args.exact_at in sizes or args.exact_at == 0 else next(
        (s for s in sizes if s >= FLAT_MAX), sizes[0])
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_query-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for patterns in sizes:
        rows.append(one_size(work, patterns, args, exact=(patterns == exact_at)))
        print(f"d={patterns:,}: index {rows[-1]['index']['seconds']} s, query {rows[-1]['query']['seconds']} s",
              file=sys.stderr, flush=True)
    results = {"cpus": os.cpu_count(), "device": args.device, "exact_at": exact_at, "rows": rows,
               "ratios": ratios(rows)}
    print(table(rows))
    for entry in results["ratios"]["time"]:
        print(f"time {entry['from']:,} -> {entry['to']:,} (d x{entry['d_ratio']}): index x{entry['index_ratio']}, "
              f"query x{entry['query_ratio']}, total x{entry['total_ratio']} (d^{entry['exponent']}; "
              f"target at most x{TIME_GROWTH * entry['d_ratio']:.1f}: {'met' if entry['within_target'] else 'MISSED'})")
    if "query_rss" in results["ratios"]:
        r = results["ratios"]["query_rss"]
        print(f"query peak RSS {r['from']:,} -> {r['to']:,}: x{r['ratio']}, "
              f"apart from the index x{r['ratio_apart_from_index']}")
    for row in rows:
        for stage in ("index", "query"):
            over = row[stage]["peak_rss_bytes"] - row["index_bytes"]
            print(f"{stage} peak RSS at d={row['patterns']:,}: the index's {row['index_bytes'] / 1e9:.2f} GB + "
                  f"{over / 1e9:.2f} GB (target at most + {RSS_ABOVE_INDEX / 1e9:.0f} GB: "
                  f"{'met' if over <= RSS_ABOVE_INDEX else 'MISSED'})")
    for row in rows:
        if "baseline" in row:
            b = row["baseline"]
            print(f"bare FAISS at d={row['patterns']:,}: {b['factory']} {b['search']} on {b['device']}, "
                  f"k-means on {b['train_size']:,}: read {b['read_seconds']} s, train {b['train_seconds']} s, "
                  f"add {b['add_seconds']} s, self-join (k {b['k']} + 1) {b['self_join_seconds']} s, "
                  f"peak {b['peak_rss_bytes'] / 1e9:.2f} GB; own row found for {b['self_found']:.3f}")
        found = ", ".join(f"{path} {value:.3f}" for path, value in row["recalls"].items())
        print(f"recalls at d={row['patterns']:,}: {found or 'none (exact search)'}")
        if "approximate_vs_exact" in row:
            worst = sorted(row["approximate_vs_exact"].items(), key=lambda item: -item[1]["relative"])[:8]
            print(f"approximate vs --exact at d={row['patterns']:,}, largest relative differences: "
                  + ", ".join(f"{path} {d['approximate']:.4g} vs {d['exact']:.4g} ({d['relative']:.1e})"
                              for path, d in worst))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.keep is not True and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
