"""The commands end to end: extract, info, verify, demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memscan import store
from memscan.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_demo_quick_builds_extracts_and_reuses(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path))
    assert code == 0 and "(complete)" in out and "rows" in out
    manifest = store.read_manifest(tmp_path / "activations")
    assert manifest["complete"] and manifest["layers"] == [0, 1, 2]
    assert sum(manifest["counts"]["chunks"].values()) == 256
    assert store.verify(tmp_path / "activations") == []
    stamp = (tmp_path / "activations" / store.MANIFEST).stat().st_mtime_ns
    assert run(capsys, "demo", "--quick", "--out", str(tmp_path))[0] == 0
    assert (tmp_path / "activations" / store.MANIFEST).stat().st_mtime_ns == stamp

    code, out, _ = run(capsys, "info", str(tmp_path / "activations"))
    assert code == 0 and "n=32 float16" in out and "train" in out
    code, out, _ = run(capsys, "verify", str(tmp_path / "activations"))
    assert code == 0 and out.startswith("ok:")

    shard = tmp_path / "activations" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    code, _, err = run(capsys, "verify", str(tmp_path / "activations"))
    assert code == 1 and "part-00000.parquet" in err and "truncated" in err


def test_help_is_instant_and_lists_the_commands():
    probe = "import sys, memscan.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split() == ["False", "False"]
    out = subprocess.run([sys.executable, "-m", "memscan", "--help"], capture_output=True, text=True).stdout
    for command in ("extract", "verify", "info", "demo"):
        assert command in out
