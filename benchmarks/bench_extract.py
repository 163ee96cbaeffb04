"""Extraction throughput against the plain Hugging Face loop, in one run on one machine.

Model: GPT-2-small-sized (12 layers, n=768, 50,257-word head, 124M parameters, random
weights) over the built-in Question-Formation text; 256-token chunks, every position,
with loss. Baseline: fp32, batch 1, `output_hidden_states=True`, full LM head, per-token
loss from the logits. Both are also given as a fraction of the measured matmul peak
(model FLOPs ~ 2 x parameters per token). Then peak RSS of a streaming extraction over a
corpus and over one 10x larger, each in a fresh process.

Everything runs on --device (auto: CUDA where torch sees it): the peaks, the plain loop
and memscan. --layers and --width shrink the model for a quick run on a small machine.

    python benchmarks/bench_extract.py [--documents 24] [--baseline-chunks 12] [--skip-memory]
    python benchmarks/bench_extract.py --device cuda --documents 400 --baseline-chunks 64 \
        --batch-sizes 16,64,128 --skip-memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memscan import corpus, models, qf
from memscan.extract import ExtractSettings, extract

CHUNK_TOKENS = 256


def build_model(directory: Path, layers: int = 12, width: int = 768, heads: int = 12) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = qf.tokenizer()
    GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=heads)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def matmul_peak(dtype: torch.dtype, device: torch.device, k: int = 768, n: int = 3072, repeats: int = 10,
                trials: int = 5) -> float:
    """Best GEMM rate in FLOP/s at GPT-2-small's MLP shape, over several trials (shared cores are noisy).

    Rows: 2048 tokens on a CPU, 16384 (a batch of 64 chunks) on a GPU, where 2048 would time launches.
    """
    m = 16384 if device.type == "cuda" else 2048
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n * repeats / best


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so wall-clock timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model_dir: Path) -> float:
    """2 x (parameters that multiply per token): all weights but the position table, head counted once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return 2.0 * (model.num_parameters() - model.transformer.wpe.weight.numel())


def qf_chunks(source: str, count: int) -> list[corpus.Chunk]:
    stats = corpus.CorpusStats()
    spec = corpus.open_source(source, seed=0)
    chunks = corpus.iter_chunks(spec.documents(), qf.tokenizer(), CHUNK_TOKENS, 0.0, 0, stats)
    return [chunk for chunk, _ in zip(chunks, range(count))]


@torch.inference_mode()
def plain_loop(model_dir: Path, chunks: list[corpus.Chunk], device: torch.device) -> float:
    """Tokens/s of the plain loop: fp32, batch 1, all hidden states, full LM head, loss from logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()

    def step(chunk: corpus.Chunk) -> None:
        ids = torch.from_numpy(chunk.tokens).long()[None].to(device)
        out = model(ids, output_hidden_states=True)
        log_probs = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        log_probs.gather(1, ids[0, 1:, None]).cpu().numpy()
        out.hidden_states[-1][0].cpu().numpy()

    step(chunks[0])  # warm-up: a GPU's first pass loads its kernels
    start = time.perf_counter()
    for chunk in chunks:
        step(chunk)
    return len(chunks) * CHUNK_TOKENS / (time.perf_counter() - start)


def memscan_extract(model_dir: Path, source: str, out: Path, batch_size: int, device: torch.device,
                    dtype: str = "auto") -> tuple[float, float]:
    """(tokens/s end to end, seconds) of `memscan extract` over every chunk and position, with loss."""
    settings = ExtractSettings(model=str(model_dir), source=source,
                               chunk_tokens=CHUNK_TOKENS, positions="all", dtype=dtype, device=str(device),
                               batch_size=batch_size, test_fraction=0.0)
    start = time.perf_counter()
    manifest = extract(settings, out)
    seconds = time.perf_counter() - start
    return sum(manifest["counts"]["chunks"].values()) * CHUNK_TOKENS / seconds, seconds


def peak_rss_child(model_dir: Path, documents: int, device: torch.device) -> dict[str, float]:
    """Run one streaming extraction in a fresh process; return its tokens and peak RSS."""
    code = (
        "import json, resource, sys, tempfile, time\n"
        "from memscan.extract import ExtractSettings, extract\n"
        "out = tempfile.mkdtemp()\n"
        f"s = ExtractSettings(model={str(model_dir)!r}, source='qf:documents={documents}', chunk_tokens={CHUNK_TOKENS},"
        f" positions='all', batch_size=8, test_fraction=0.0, shard_rows=16384, device={str(device)!r})\n"
        "t = time.perf_counter(); m = extract(s, out + '/d'); t = time.perf_counter() - t\n"
        "rows = sum(m['counts']['rows'].values())\n"
        "print(json.dumps({'documents': %d, 'rows': rows, 'seconds': t,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n" % documents
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=24,
                        help="Question-Formation documents (about 5.6 chunks each) through memscan extract")
    parser.add_argument("--baseline-chunks", type=int, default=12, help="chunks through the plain loop")
    parser.add_argument("--batch-sizes", default="4,8,16")
    parser.add_argument("--memory-documents", type=int, default=12, help="small corpus; the large one is 10x")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N], for everything measured")
    parser.add_argument("--layers", type=int, default=12, help="model blocks (12: GPT-2 small)")
    parser.add_argument("--width", type=int, default=768, help="model width, 64 per head (768: GPT-2 small)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    device = models.resolve_device(args.device)
    results: dict[str, object] = {"threads": torch.get_num_threads(), "chunk_tokens": CHUNK_TOKENS,
                                  "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                                           if device.type == "cuda" else ""),
                                  "model": {"layers": args.layers, "width": args.width}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = build_model(tmp_path / "gpt2-small", args.layers, args.width, max(1, args.width // 64))
        per_token = flops_per_token(model_dir)
        peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
        results["matmul_peak_gflops"] = {k: round(v / 1e9, 1) for k, v in peaks.items()}
        results["model_gflop_per_token"] = round(per_token / 1e9, 3)

        source = f"qf:documents={args.documents}"
        baseline = plain_loop(model_dir, qf_chunks(source, args.baseline_chunks), device)
        results["plain_loop"] = {"tokens_per_s": round(baseline, 1),
                                 "fraction_of_fp32_peak": round(baseline * per_token / peaks["fp32"], 3)}
        runs = {}
        for i, batch_size in enumerate(int(b) for b in args.batch_sizes.split(",")):
            rate, seconds = memscan_extract(model_dir, source, tmp_path / f"out{i}", batch_size, device)
            runs[batch_size] = {"tokens_per_s": round(rate, 1), "seconds": round(seconds, 2),
                                "speedup_vs_plain": round(rate / baseline, 2),
                                "fraction_of_bf16_peak": round(rate * per_token / peaks["bf16"], 3)}
            print(f"batch {batch_size}: {runs[batch_size]}", file=sys.stderr)
        fp32_rate, _ = memscan_extract(model_dir, source, tmp_path / "fp32", 8, device, dtype="fp32")
        runs["fp32, batch 8"] = {"tokens_per_s": round(fp32_rate, 1), "speedup_vs_plain": round(fp32_rate / baseline, 2),
                                 "fraction_of_fp32_peak": round(fp32_rate * per_token / peaks["fp32"], 3)}
        results["memscan_extract"] = runs

        if not args.skip_memory:
            small = peak_rss_child(model_dir, args.memory_documents, device)
            large = peak_rss_child(model_dir, 10 * args.memory_documents, device)
            results["peak_rss"] = {"small": small, "large_10x": large,
                                   "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
