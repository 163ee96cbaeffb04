"""The query stage at scale (issue 12): `memscan index` and `memscan query` as the user runs them.

Data: clustered float16 vectors (1,000 clusters, or one per --patterns-per-cluster patterns;
noise half the centre spread), n = 256,
d patterns (the `train` split) for each of --sizes, and 10,000 queries (the `test` split)
of the same distribution. Each command runs as its own process (`python -m memscan ...`),
timed by wall clock, its peak RSS polled (psutil, the process and its children, every
50 ms). Per size it reports the index's factory and tuned search parameters, every
recall the query's summary writes beside an approximate statistic, and the ratios the
issue sets targets for: time at 10x the patterns over time at 1x (at most 13x), and the
query's peak RSS at the largest size over the next (at most 1.2x, apart from the index).
At --exact-at (100,000 by default; else the smallest size with an approximate index, at least
50,000) the query runs again with --exact, and every number of the two summaries is compared.

    python benchmarks/bench_query.py                                  # 100k, 300k, 1M: long
    python benchmarks/bench_query.py --sizes 20000,60000 --queries 2000   # a smoke run, a minute or two
    python benchmarks/bench_query.py --sizes 1000000,10000000 --device gpu --memory 16GB --json out.json
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

from memscan import store
from memscan.knn.tuning import FLAT_MAX

CLUSTERS = 1000
POLL_SECONDS = 0.05


def write_dataset(directory: Path, patterns: int, queries: int, n: int, seed: int, clusters: int = CLUSTERS) -> None:
    """`patterns` train rows and `queries` test rows of clustered float16 vectors, written in blocks of rows."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, n)).astype(np.float32)
    count = patterns + queries
    X = np.empty((count, n), np.float16)
    for start in range(0, count, 262_144):   # float32 only one block at a time
        rows = min(262_144, count - start)
        block = centers[rng.integers(0, clusters, rows)] + 0.5 * rng.normal(size=(rows, n)).astype(np.float32)
        X[start:start + rows] = block
    store.write_vectors(directory, X, np.array(["train"] * patterns + ["test"] * queries), model="synthetic",
                        vec_dtype="float16")


def run(args: list[str]) -> dict[str, Any]:
    """One memscan command as its own process: wall seconds, peak RSS (bytes, with children), exit code, output."""
    started = time.perf_counter()
    process = psutil.Popen([sys.executable, "-m", "memscan", *args], stdout=-1, stderr=-1, text=True,
                           env={**os.environ, "TQDM_DISABLE": "1"})
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
        raise SystemExit(f"`memscan {' '.join(args)}` failed ({process.returncode}):\n{err[-3000:]}")
    return result


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


def one_size(work: Path, patterns: int, args: argparse.Namespace, exact: bool) -> dict[str, Any]:
    """Dataset, index and query (and the --exact query) at one size: the numbers of one table row."""
    data, index_dir = work / f"data-{patterns}", work / f"index-{patterns}"
    started = time.perf_counter()
    clusters = patterns // args.patterns_per_cluster if args.patterns_per_cluster else CLUSTERS
    write_dataset(data, patterns, args.queries, args.n, args.seed, clusters)
    row: dict[str, Any] = {"patterns": patterns, "queries": args.queries, "n": args.n,
                           "write_seconds": round(time.perf_counter() - started, 2)}
    common = ["--device", args.device, "--seed", str(args.seed)] + (["--memory", args.memory] if args.memory else [])
    row["index"] = run(["index", str(data), "--out", str(index_dir), *common])
    info = json.loads((index_dir / "index.json").read_text())
    row.update(factory=info["factory"], factory_reason=info["factory_reason"], search=info["search"],
               tuning=info.get("tuning"), index_bytes=index_bytes(index_dir))
    query = ["query", str(index_dir), "--queries", str(data), "--split", "test", "--k", str(args.k), *common]
    row["query"] = run([*query, "--out", str(work / f"run-{patterns}")])
    summary = json.loads((work / f"run-{patterns}" / "summary.json").read_text())
    row["recalls"] = recalls(summary)
    if exact:
        row["query_exact"] = run([*query, "--exact", "--out", str(work / f"exact-{patterns}")])
        exact_summary = json.loads((work / f"exact-{patterns}" / "summary.json").read_text())
        row["approximate_vs_exact"] = compare(summary, exact_summary)
    if not args.keep:
        for folder in (data, index_dir, work / f"run-{patterns}", work / f"exact-{patterns}"):
            shutil.rmtree(folder, ignore_errors=True)
    return row


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Time growth between every two sizes (target: at most 1.3x the growth of d); query RSS between the largest two."""
    out: dict[str, Any] = {"time": []}
    for small, large in itertools.combinations(rows, 2):
        growth = large["patterns"] / small["patterns"]
        entry = {"from": small["patterns"], "to": large["patterns"], "d_ratio": round(growth, 2)}
        for stage in ("index", "query"):
            entry[f"{stage}_ratio"] = round(large[stage]["seconds"] / small[stage]["seconds"], 2)
        total = ((large["index"]["seconds"] + large["query"]["seconds"])
                 / (small["index"]["seconds"] + small["query"]["seconds"]))
        entry.update(total_ratio=round(total, 2), exponent=round(math.log(total) / math.log(growth), 2),
                     within_target=total <= 1.3 * growth)
        out["time"].append(entry)
    if len(rows) >= 2:
        small, large = rows[-2], rows[-1]
        rss = large["query"]["peak_rss_bytes"] / small["query"]["peak_rss_bytes"]
        apart = ((large["query"]["peak_rss_bytes"] - large["index_bytes"])
                 / max(1, small["query"]["peak_rss_bytes"] - small["index_bytes"]))
        out["query_rss"] = {"from": small["patterns"], "to": large["patterns"], "ratio": round(rss, 2),
                            "ratio_apart_from_index": round(apart, 2), "within_target": apart <= 1.2}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    gb = 1e9
    lines = ["| d | index | query | query peak RSS | index size | factory, search | lowest recall | --exact query |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lowest = min(row["recalls"].items(), key=lambda item: item[1], default=("", math.nan))
        exact = (f"{row['query_exact']['seconds']:.1f} s, {row['query_exact']['peak_rss_bytes'] / gb:.2f} GB"
                 if "query_exact" in row else "")
        lines.append(f"| {row['patterns']:,} | {row['index']['seconds']:.1f} s | {row['query']['seconds']:.1f} s | "
                     f"{row['query']['peak_rss_bytes'] / gb:.2f} GB | {row['index_bytes'] / gb:.3f} GB | "
                     f"{row['factory']} {row['search']} | {lowest[1]:.3f} ({lowest[0]}) | {exact} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,300000,1000000", help="Pattern counts d, comma-separated.")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exact-at", type=int, default=100_000,
                        help="The size also queried with --exact (0: none).")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--memory", default=None, help="--memory for index and query [default: theirs].")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patterns-per-cluster", type=int, default=0,
                        help="Clusters grow with d, one per this many patterns [default: 1,000 clusters at every d].")
    parser.add_argument("--work", default=None, help="Folder for datasets, indexes and runs [default: temporary].")
    parser.add_argument("--keep", action="store_true", help="Keep each size's files.")
    parser.add_argument("--json", default=None, help="Write every number here as well.")
    args = parser.parse_args()
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
              f"target at most x{1.3 * entry['d_ratio']:.1f}: {'met' if entry['within_target'] else 'MISSED'})")
    if "query_rss" in results["ratios"]:
        r = results["ratios"]["query_rss"]
        print(f"query peak RSS {r['from']:,} -> {r['to']:,}: x{r['ratio']}, "
              f"apart from the index x{r['ratio_apart_from_index']} "
              f"(target at most x1.2: {'met' if r['within_target'] else 'MISSED'})")
    for row in rows:
        found = ", ".join(f"{path} {value:.3f}" for path, value in row["recalls"].items())
        print(f"recalls at d={row['patterns']:,}: {found or 'none (exact search)'}")
        if "approximate_vs_exact" in row:
            worst = sorted(row["approximate_vs_exact"].items(), key=lambda item: -item[1]["relative"])[:8]
            print(f"approximate vs --exact at d={row['patterns']:,}, largest relative differences: "
                  + ", ".join(f"{path} {d['approximate']:.4g} vs {d['exact']:.4g} ({d['relative']:.1e})"
                              for path, d in worst))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
