"""What reading sites inside the blocks costs: residual stream only against all six sites at every block.

Model: GPT-2-small-sized (12 blocks, n = 768, random weights, bench_extract's) over the
built-in Question-Formation text; 256-token chunks, with loss, positions every:K. Each
configuration runs `memscan extract` in a fresh process (so its peak RSS is its own),
in one run on one machine:

- `last`: the final hidden state only (the paper's vector);
- `layers all`: the residual stream after every block (output_hidden_states);
- `six sites`: resid_pre, resid_mid, resid_post, attn_out, mlp_out and mlp_hidden at
  every block, by forward hooks in the same forward pass.

It reports tokens/s (end to end, the model's loading included; the best of --repeats runs,
taken in turns so that drift on a shared machine hits every configuration alike), peak RSS
and bytes stored, and each configuration's time over `last`'s next to its bytes over
`last`'s: one forward pass plus the copies of what is stored.

    python benchmarks/bench_sites.py [--documents 24] [--positions every:16] [--repeats 2] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import CHUNK_TOKENS, build_model  # noqa: E402

SIX_SITES = ",".join(f"{name}:all" for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                                                 "mlp_hidden"))
CONFIGURATIONS = {"last": {"layers": "last"}, "layers all": {"layers": "all"}, "six sites": {"sites": SIX_SITES}}


def run_child(model_dir: Path, out: Path, choice: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """One extraction in a fresh process: tokens, seconds, bytes written, peak RSS (MB)."""
    code = (
        "import json, resource, time\n"
        "from memscan.extract import ExtractSettings, extract\n"
        f"s = ExtractSettings(model={str(model_dir)!r}, source='qf:documents={args.documents}', "
        f"chunk_tokens={CHUNK_TOKENS}, positions={args.positions!r}, batch_size={args.batch_size}, test_fraction=0.0, "
        f"device={args.device!r}, **{choice!r})\n"
        f"t = time.perf_counter(); m = extract(s, {str(out)!r}); t = time.perf_counter() - t\n"
        "chunks = sum(m['counts']['chunks'].values())\n"
        "print(json.dumps({'tokens': chunks * %d, 'seconds': t, 'rows': sum(m['counts']['rows'].values()),\n"
        "  'bytes': sum(s['bytes'] for s in m['shards']), 'sites': len(m['sites']),\n"
        "  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n" % CHUNK_TOKENS
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=24, help="QF documents (about 2 chunks of 256 tokens each)")
    parser.add_argument("--positions", default="every:16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="Write the numbers here as well.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_sites-"))
    model_dir = build_model(work / "model")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGURATIONS}
    for repeat in range(args.repeats):
        for name, choice in CONFIGURATIONS.items():
            out = work / f"{name.replace(' ', '-')}-{repeat}"
            runs[name].append(run_child(model_dir, out, choice, args))
            shutil.rmtree(out)
    results = {name: {**min(found, key=lambda r: r["seconds"]),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in found)} for name, found in runs.items()}
    base = results["last"]
    print("| configuration | tokens/s | time / last | bytes stored | bytes / last | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        r["tokens_per_second"] = r["tokens"] / r["seconds"]
        print(f"| {name} | {r['tokens_per_second']:,.0f} | {r['seconds'] / base['seconds']:.2f}x | "
              f"{r['bytes'] / 1e6:,.1f} MB | {r['bytes'] / base['bytes']:.0f}x | {r['peak_rss_mb']:,.0f} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
