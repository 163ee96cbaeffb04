"""The commands end to end: extract, info, verify, demo."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

import memscan.cli.train as train_command
from memscan import models, store
from memscan.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.dtype
def test_demo_quick_runs_the_whole_pipeline_and_reuses_it(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path))
    assert code == 0 and "trained" in out and "typical" in out and "report" in out
    manifest = store.read_manifest(tmp_path / "activations")
    trained = json.loads((tmp_path / "train" / "run.json").read_text())
    assert manifest["complete"] and manifest["layers"] == [0, 1, 2]
    assert manifest["counts"]["chunks"]["train"] == trained["data"]["train_chunks"]
    assert manifest["counts"]["chunks"]["test"] == trained["data"]["heldout_chunks"]
    assert store.verify(tmp_path / "activations") == []
    for page in ("run/report.html", "run/saturation/report.html"):
        assert (tmp_path / page).stat().st_size > 0
    assert "Norm growth and saturation" in (tmp_path / "run" / "report.html").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "activations" / store.MANIFEST, tmp_path / "run" / "summary.json",
                                                tmp_path / "train" / "run.json")}
    assert run(capsys, "demo", "--quick", "--out", str(tmp_path))[0] == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    code, out, _ = run(capsys, "info", str(tmp_path / "activations"))
    vectors = "float16" if models.cpu_has_fast_bf16() else "float32"  # --dtype auto: bf16 where the CPU runs it
    assert code == 0 and f"n=32 {vectors}" in out and "train" in out
    assert (manifest["dtype"], trained["dtype"]) == (("bf16", "bf16") if vectors == "float16" else ("fp32", "fp32"))
    code, out, _ = run(capsys, "verify", str(tmp_path / "activations"))
    assert code == 0 and out.startswith("ok:")

    shard = tmp_path / "activations" / "vectors" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    code, _, err = run(capsys, "verify", str(tmp_path / "activations"))
    assert code == 1 and "part-00000.parquet" in err and "truncated" in err


def test_help_is_instant_and_lists_the_commands():
    probe = "import sys, memscan.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split() == ["False", "False"]
    out = subprocess.run([sys.executable, "-m", "memscan", "--help"], capture_output=True, text=True).stdout
    for command in ("extract", "verify", "info", "demo"):
        assert command in out


class _Captured(Exception):
    """Raised by a stand-in for the training run, carrying the settings the command built."""


def _train_settings(capsys, monkeypatch, tmp_path, *flags: str):
    """The TrainSettings `memscan train` builds from `flags`, without training."""
    def capture(settings, *args, **kwargs):
        raise _Captured(settings)

    monkeypatch.setattr(train_command, "run", capture)
    with pytest.raises(_Captured) as captured:
        main(["train", "--out", str(tmp_path / "run"), *flags])
    return captured.value.args[0]


def test_train_presets_apply_where_no_flag_is_given(capsys, monkeypatch, tmp_path):
    preset = _train_settings(capsys, monkeypatch, tmp_path, "--preset", "gpt2-small", "--source", "qf", "--tokens",
                             "1000", "--n-layer", "2", "--untied")
    assert (preset.n_layer, preset.n_embd, preset.warmup_steps, preset.lr) == (2, 768, 2000, 6e-4)
    assert (preset.seed, preset.device, preset.tie_embeddings) == (0, "auto", False)
    given = _train_settings(capsys, monkeypatch, tmp_path, "--preset", "qf-6", "--seed", "3", "--device", "cpu",
                            "--batch-size", "8", "--lr", "1e-3")
    assert (given.source, given.tokens, given.lr, given.seed, given.device) == ("qf", 1_600_000, 1e-3, 3, "cpu")
    assert given.tie_embeddings
    plain = _train_settings(capsys, monkeypatch, tmp_path, "--source", "qf", "--tokens", "500")
    assert (plain.n_layer, plain.lr, plain.warmup_steps, plain.batch_size) == (6, 6e-4, 100, 8)
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--source", "qf"])
    assert "--tokens is required" in capsys.readouterr().err


def test_the_extract_command_train_prints_pastes_as_it_is_and_extracts_the_runs_chunks(capsys, tmp_path):
    """`memscan train` prints the whole extract command, every value shell-quoted (a space and a quote in the
    run's path here): run as printed, it extracts exactly the training run's chunks, both splits."""
    out = tmp_path / "my runs" / "qf 'tiny'"
    code, printed, err = run(capsys, "train", "--out", str(out), "--source", "qf:documents=12,lines=16", "--tokens",
                             "3000", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--context", "32",
                             "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--eval-every", "3",
                             "--dtype", "fp32", "--device", "cpu", "--seed", "3", "--test-fraction", "0.25")
    assert code == 0, err
    line = next(line for line in printed.splitlines() if line.startswith("extract "))
    words = shlex.split(line.removeprefix("extract "))
    assert words[:2] == ["memscan", "extract"] and "..." not in words
    assert [words[words.index(flag) + 1] for flag in ("--seed", "--test-fraction", "--chunk-tokens")] == [
        "3", "0.25", "32"]
    code, _, err = run(capsys, *words[1:])
    assert code == 0, err
    acts = out.parent / f"{out.name}-activations"
    assert words[words.index("--out") + 1] == str(acts)
    trained = json.loads((out / "run.json").read_text())
    manifest = store.read_manifest(acts)
    assert manifest["complete"] and store.verify(acts) == []
    assert manifest["counts"]["chunks"]["train"] == trained["data"]["train_chunks"]
    assert manifest["counts"]["chunks"]["test"] == trained["data"]["heldout_chunks"]
