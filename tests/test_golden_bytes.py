"""A fixed small run writes the same bytes and prints the same demo lines after a refactor.

The demo experiment at the test suite's size, pinned where bytes could differ between machines: fp32 training
and extraction on the CPU, one torch and FAISS thread, every stage seeded. The SHA-256 of every Parquet, FAISS
and NumPy file it writes (but the training log's wall-clock column) and the demo's summary lines are compared with `fixtures/golden-bytes.json`, which
`python tests/test_golden_bytes.py` rewrites when a format changes on purpose (say which in the commit).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import faiss
import torch

from memscan import demo, experiments
from memscan.cli.demo import summary_lines

GOLDEN = Path(__file__).parent / "fixtures" / "golden-bytes.json"
PINNED = (*demo.settings(quick=True), "train={tokens=3000, test_fraction=0.5, dtype='fp32', device='cpu'}",
          "extract={dtype='fp32', device='cpu'}")
DATA_FILES = ("*.parquet", "*.faiss", "*.npy")
WALL_CLOCK = ("train/log.parquet",)   # holds each step's seconds; its losses are in the lines


def fixed_run(out: Path) -> dict[str, object]:
    """Run the pinned demo into `out`; the sha256 of each data file it wrote and the demo's summary lines."""
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        outcome, = experiments.run(experiments.load(demo.EXPERIMENT, PINNED), out)
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    digests = {path.relative_to(out).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
               for pattern in DATA_FILES for path in out.rglob(pattern)
               if path.relative_to(out).as_posix() not in WALL_CLOCK}
    lines = summary_lines(demo.result_of(outcome))
    return {"files": dict(sorted(digests.items())),
            "lines": [line.replace(str(out), "OUT") for line in lines]}


def test_a_fixed_run_writes_the_same_bytes_and_lines(tmp_path):
    expected = json.loads(GOLDEN.read_text())
    got = fixed_run(tmp_path / "demo")
    assert got["lines"] == expected["lines"]
    assert got["files"] == expected["files"]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        GOLDEN.write_text(json.dumps(fixed_run(Path(folder) / "demo"), indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
