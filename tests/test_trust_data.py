"""Issue 11, the dataset side: nothing a user owns is deleted, every record and file read is checked,
bad values are one line, and the suite holds on any CPU (extract, store, train, saturation, models)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from memscan import corpus, files, models, saturation, store
from memscan.cli import main
from memscan.errors import DataError, InputError, ModelError
from memscan.extract import ExtractSettings, extract
from memscan.train import TrainSettings, check_checkpoint, train
from tests.test_train import SMALL

TINY = replace(SMALL, steps=6, checkpoints=3, save_every=2, eval_every=3)


def tiny_extract(model: Path, **overrides) -> ExtractSettings:
    base = {"model": str(model), "source": "qf:documents=6,lines=16", "chunk_tokens": 32, "layers": "all",
            "positions": "last", "batch_size": 4, "shard_rows": 20, "seed": 3, "test_fraction": 0.3,
            "dtype": "fp32"}  # pinned: bytes are compared; --dtype auto depends on the CPU
    return ExtractSettings(**{**base, **overrides})


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def one_line_error(capsys, *args: str) -> str:
    """The CLI's error line, after checking it is the only line: exit 1, no traceback."""
    code, err = run_cli(capsys, *args)
    lines = [line for line in err.strip().splitlines() if line.startswith("memscan: error:") or "Traceback" in line]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("memscan: error: "), err
    return lines[0]


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` (None for folders) with its bytes: what a user would lose."""
    return {str(p.relative_to(directory)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.name != files.LOCK_FILE}


@pytest.fixture(scope="module")
def dataset(qf_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "data"
    extract(tiny_extract(qf_model), out)
    return out


def copy_of(directory: Path, tmp_path: Path) -> Path:
    copy = tmp_path / directory.name
    shutil.copytree(directory, copy)
    return copy


def edit_manifest(directory: Path, change, sign: bool = True) -> None:
    """Edit a dataset's manifest; `sign`: re-sign a signed one (files.signed), so only the checks after the
    signature see the edit; sign=False leaves the stale self_sha256 (a hostile edit, refused by the signature)."""
    manifest = json.loads((directory / store.MANIFEST).read_text())
    change(manifest)
    if sign and isinstance(manifest, dict) and files.SELF_SHA256 in manifest:
        manifest = files.signed(manifest)
    (directory / store.MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------- A. never delete what memscan did not write


def test_extract_refuses_a_folder_with_look_alike_files_and_never_deletes_them(qf_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-1-notes.txt").write_text("my notes")
    (out / "manifest.json.bak").write_text("my backup")
    (out / "part-00003.parquet.bak").write_text("another")
    mine = tree(out)
    with pytest.raises(InputError, match=r"holds files memscan did not write \(manifest.json.bak, part-00003"):
        extract(tiny_extract(qf_model), out)
    assert tree(out) == mine
    line = one_line_error(capsys, "extract", "--model", str(qf_model), "--source", "qf:documents=6,lines=16",
                          "--out", str(out), "--chunk-tokens", "32", "--overwrite")
    assert "part-1-notes.txt" in line and tree(out) == mine
    manifest = extract(tiny_extract(qf_model), out, allow_other_files=True)
    assert manifest["complete"] and store.verify(out) == []
    assert {k: v for k, v in tree(out).items() if k in mine} == mine


def test_overwrite_removes_the_old_dataset_but_keeps_a_users_folder(dataset, qf_model, tmp_path):
    out = copy_of(dataset, tmp_path)
    (out / "part-time-jobs").mkdir()
    (out / "part-time-jobs" / "cv.txt").write_text("mine")
    (out / "part-00099.parquet").mkdir()  # a folder with a shard's name is not memscan's either
    with pytest.raises(InputError, match="part-00099.parquet, part-time-jobs"):
        extract(tiny_extract(qf_model, seed=4), out, overwrite=True)
    assert (out / "part-time-jobs" / "cv.txt").read_text() == "mine"
    old = {s["sha256"] for s in json.loads((out / store.MANIFEST).read_text())["shards"]}
    manifest = extract(tiny_extract(qf_model, seed=4, shard_rows=50), out, overwrite=True, allow_other_files=True)
    assert (out / "part-time-jobs" / "cv.txt").read_text() == "mine" and (out / "part-00099.parquet").is_dir()
    shards = {p.relative_to(out).as_posix() for p in out.glob("vectors/part-*.parquet") if p.is_file()}
    assert shards == {s["name"] for s in manifest["shards"]} and len(shards) < len(old)
    assert not old & {s["sha256"] for s in manifest["shards"]} and store.verify(out) == []


def test_extract_removes_stale_files_of_its_own_and_nothing_else(qf_model, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_text("no manifest vouches for this one")   # a shard's name is not enough
    assert "holds part-00000.parquet, which memscan did not write" in one_line_error(
        capsys, "extract", "--model", str(qf_model), "--source", "qf:documents=6,lines=16", "--chunk-tokens", "32",
        "--out", str(out))
    assert (out / "part-00000.parquet").read_text() == "no manifest vouches for this one"
    # A killed run: its manifest records an extraction in progress, which owns the names it writes next.
    killed = copy_of(dataset, tmp_path)
    manifest = json.loads((killed / store.MANIFEST).read_text())
    store.write_manifest(killed, {**{k: v for k, v in manifest.items() if k not in ("counts", "corpus")},
                                  "complete": False, "shards": manifest["shards"][:1], "chunk_tables": []})
    for name in ("vectors/part-00077.parquet", "vectors/part-00078.parquet.tmp", "manifest.json.tmp"):
        (killed / name).write_text("left by a killed run")
    assert extract(tiny_extract(qf_model), killed)["complete"]
    assert not list(killed.rglob("*.tmp")) and not (killed / "vectors" / "part-00077.parquet").exists()
    assert store.verify(killed) == []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust_train") / "run"
    train(TINY, out)
    return out


def test_train_overwrite_removes_only_memscans_files(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    (out / "thesis.tex").write_text("\\section{mine}")
    (out / "data").mkdir()
    (out / "data" / "results.csv").write_text("1,2")
    (out / "checkpoints" / "notes.txt").write_text("mine too")
    mine = {k: v for k, v in tree(out).items() if k.startswith(("thesis", "data", "checkpoints/notes"))}
    with pytest.raises(InputError, match=r"holds files memscan did not write \(data, thesis.tex\)"):
        train(replace(TINY, lr=2e-3), out, overwrite=True)
    (out / "thesis.tex").rename(tmp_path / "thesis.tex")
    shutil.move(out / "data", tmp_path / "data")
    with pytest.raises(InputError, match=r"checkpoints' holds files memscan did not write \(notes.txt\)"):
        train(replace(TINY, lr=2e-3), out, overwrite=True)
    (tmp_path / "thesis.tex").rename(out / "thesis.tex")
    shutil.move(tmp_path / "data", out / "data")
    line = one_line_error(capsys, "train", "--out", str(out), "--source", TINY.source, "--tokens", str(TINY.tokens),
                          "--overwrite", "--lr", "0.002")
    assert "thesis.tex" in line
    info = train(replace(TINY, lr=2e-3), out, overwrite=True, allow_other_files=True)
    assert info["complete"] and info["settings"]["lr"] == 2e-3
    assert {k: v for k, v in tree(out).items() if k in mine} == mine
    fingerprints = {json.loads((p / "state.json").read_text())["fingerprint"] for p in (out / "checkpoints").glob("step-*")}
    assert fingerprints == {info["fingerprint"]}


def test_a_second_job_on_a_held_folder_gets_one_line(dataset, finished_run, qf_model, tmp_path, capsys):
    for folder in (tmp_path / "data", tmp_path / "run", tmp_path / "sat"):
        folder.mkdir()
    with files.folder_lock(tmp_path / "data"):
        with pytest.raises(InputError, match="in use by another memscan job"):
            extract(tiny_extract(qf_model), tmp_path / "data")
        line = one_line_error(capsys, "extract", "--model", str(qf_model), "--source", "qf:documents=6,lines=16",
                              "--out", str(tmp_path / "data"), "--chunk-tokens", "32")
        assert "in use by another memscan job" in line and "pid" in line
    with files.folder_lock(tmp_path / "run"), pytest.raises(InputError, match="in use by another memscan job"):
        train(TINY, tmp_path / "run")
    with files.folder_lock(tmp_path / "sat"), pytest.raises(InputError, match="in use by another memscan job"):
        saturation.analyse(str(finished_run), str(tmp_path / "sat"))
    assert not list((tmp_path / "data").glob("*.json")) and not list((tmp_path / "run").glob("*.json"))


def test_a_failed_job_removes_only_a_folder_it_created(qf_model, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        extract(tiny_extract(qf_model, source=str(tmp_path / "missing.txt")), tmp_path / "new" / "data")
    assert not (tmp_path / "new" / "data").exists()
    with pytest.raises(InputError, match="more than the"):
        train(replace(TINY, tokens=10_000_000), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(InputError, match="more than the"):
        train(replace(TINY, tokens=10_000_000), tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()


# ---------------------------------------------------------------- B. never accept a wrong or mixed result


@pytest.mark.parametrize("name", ["../x.parquet", "/tmp/x.parquet", "/dev/zero", "", ".."])
def test_shard_names_outside_the_folder_are_refused_by_every_reader(dataset, tmp_path, capsys, name):
    copy = copy_of(dataset, tmp_path)
    (tmp_path / "x.parquet").write_bytes((copy / "vectors" / "part-00000.parquet").read_bytes())
    edit_manifest(copy, lambda m: m["shards"][0].update(name=name))
    for read in (store.verify, store.read_manifest, store.ActivationDataset):
        with pytest.raises(DataError, match=r"manifest.json names the file .*only plain file names"):
            read(copy)
    assert "only plain file names" in one_line_error(capsys, "verify", str(copy))


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero", "folder"])
def test_a_shard_that_is_not_a_regular_file_is_a_problem_not_a_hang(dataset, tmp_path, kind):
    copy = copy_of(dataset, tmp_path)
    shard = copy / "vectors" / "part-00001.parquet"
    shard.unlink()
    {"fifo": lambda: os.mkfifo(shard), "symlink to /dev/zero": lambda: shard.symlink_to("/dev/zero"),
     "folder": shard.mkdir}[kind]()
    problem = ("is a symbolic link, not the file memscan wrote" if kind.startswith("symlink")
               else "is not a regular file")
    assert store.verify(copy) == [f"shard vectors/part-00001.parquet {problem}"]
    with pytest.raises(DataError, match=f"shard vectors/part-00001.parquet {problem}"):
        list(store.ActivationDataset(copy).iter_batches())


DAMAGE = {
    "not JSON": (lambda text: text[:-20], "is not valid JSON"),
    "a list": (lambda text: "[]", "a JSON object was expected, got list"),
    "no shards": (lambda m: m.pop("shards"), "has no 'shards'"),
    "layers all": (lambda m: m.update(layers="all"), "'layers' must be list"),
    "layers unsorted": (lambda m: m["sites"][0].update(layers=[2, 0]), "'layers' must be a non-empty ascending list"),
    "layers not the first site's": (lambda m: m.update(layers=[2, 0]), "'layers' must be the first site's"),
    "sites not a list": (lambda m: m.update(sites={"hidden": 1}), "'sites' must be list"),
    "site without a width": (lambda m: m["sites"][0].pop("n"), "has no 'n'"),
    "negative n": (lambda m: m.update(n=-5), "'n' must be at least 1; got -5"),
    "n as text": (lambda m: m.update(n="32"), "'n' must be int"),
    "float64 vectors": (lambda m: m.update(vec_dtype="float64"), "'vec_dtype' must be float16 or float32"),
    "complete as text": (lambda m: m.update(complete="yes"), "'complete' must be bool"),
    "no row range": (lambda m: m["shards"][1].pop("row_start"), "has no 'row_start'"),
    "gap in rows": (lambda m: m["shards"][1].update(row_start=m["shards"][1]["row_start"] + 1),
                    "'shards' must be consecutive row ranges"),
    "shard twice": (lambda m: m["shards"][1].update(name=m["shards"][0]["name"]), "a list of distinct files"),
    "shard not a record": (lambda m: m["shards"].__setitem__(0, "part-00000.parquet"), "a list of shard records"),
    "no counts": (lambda m: m.pop("counts"), "has no 'counts'"),
    "negative count": (lambda m: m["counts"]["rows"].update(train=-1), "'counts.rows' must be counts >= 0"),
    "no model id": (lambda m: m["model"].pop("id"), "has no 'id'"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_manifest_is_one_line_naming_the_file_and_key(dataset, tmp_path, capsys, damage):
    copy = copy_of(dataset, tmp_path)
    change, message = DAMAGE[damage]
    path = copy / store.MANIFEST
    if damage in ("not JSON", "a list"):
        path.write_text(change(path.read_text()))
    else:
        edit_manifest(copy, change)
    with pytest.raises(DataError, match="manifest.json") as error:
        store.read_manifest(copy)
    assert message in str(error.value) and "\n" not in str(error.value)
    for command in ("verify", "info"):
        assert message in one_line_error(capsys, command, str(copy))
    with pytest.raises(DataError, match="manifest.json"):
        store.ActivationDataset(copy)


def test_write_vectors_and_extract_build_the_same_manifest(dataset, tmp_path):
    store.write_vectors(tmp_path / "vectors", np.ones((5, 3), np.float32), ["train"] * 5)
    imported, extracted = store.read_manifest(tmp_path / "vectors"), store.read_manifest(dataset)
    assert set(imported) == set(extracted) - {"corpus"}  # vectors from elsewhere have no corpus statistics
    with pytest.raises(InputError, match="layer >= 0"):
        store.write_vectors(tmp_path / "bad", np.ones((5, 3), np.float32), ["train"] * 5, layer=-1)


def test_run_and_checkpoint_records_are_checked_when_read(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "steps": 6.5}))   # an edit: the signature no longer matches
    with pytest.raises(DataError, match=r"run.json fails its self_sha256 checksum"):
        train(TINY, out)
    (out / "run.json").write_text(json.dumps(files.signed({**run, "steps": "six"})))   # signed, of a bad shape
    with pytest.raises(DataError, match=r"run.json: 'steps' must be int"):
        train(TINY, out)
    (out / "run.json").write_text(json.dumps(files.signed({**run, "complete": False})))
    state_path = out / "checkpoints" / "step-0000006" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "step": 5}))
    with pytest.raises(DataError, match="records step 5, not the step its folder is named for"):
        train(TINY, out)
    state_path.write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))
    with pytest.raises(DataError, match="state.json has no 'files'"):
        train(TINY, out)


def test_a_finished_run_names_its_final_checkpoint_where_it_now_lies(finished_run, tmp_path):
    moved = copy_of(finished_run, tmp_path)
    info = train(TINY, moved)
    assert info["final"] == str(moved / "checkpoints" / "step-0000006")


def interrupted_run(tmp_path: Path, settings: TrainSettings = TINY, at: int = 5) -> Path:
    """A run stopped after step `at` (its resume point and log-spaced checkpoints so far are on disk)."""
    out = tmp_path / "interrupted"

    def stop(step: int, loss: float) -> None:
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(settings, out, on_step=stop)
    return out


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_is_refused_on_resume_and_by_saturation(tmp_path):
    out = interrupted_run(tmp_path)
    resume = out / "checkpoints" / "resume"
    assert json.loads((resume / "state.json").read_text())["step"] == 4
    flip_a_bit(resume / "model.safetensors")
    with pytest.raises(DataError, match=r"resume' is damaged: file model.safetensors fails its sha256"):
        train(TINY, out)
    shutil.rmtree(resume)
    flip_a_bit(out / "checkpoints" / "step-0000002" / "optimizer.pt")
    with pytest.raises(DataError, match=r"step-0000002' is damaged: file optimizer.pt fails its sha256"):
        saturation.analyse(str(out), str(tmp_path / "sat"), allow_incomplete=True)
    (out / "checkpoints" / "step-0000001" / "extra.bin").write_bytes(b"unlisted")
    with pytest.raises(DataError, match="extra.bin is not listed in its state.json"):
        check_checkpoint(out / "checkpoints" / "step-0000001")


class _Touch:
    """A pickle that would create a file when loaded without weights_only: it must never run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def plant_pickle(folder: Path, name: str, marker: Path) -> None:
    """Replace a checkpoint file by a pickle and update its state.json entry, as a forger would."""
    (folder / name).write_bytes(pickle.dumps({"state": _Touch(marker)}, protocol=2))
    state = json.loads((folder / "state.json").read_text())
    state["files"] = [files.file_entry(folder / e["name"]) if e["name"] == name else e for e in state["files"]]
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("name,reason", [("optimizer.pt", "pickle of objects other than tensors; it was refused"),
                                         ("model.safetensors", "header")])
def test_a_pickle_in_a_checkpoint_is_one_line_and_never_runs(tmp_path, name, reason):
    out = interrupted_run(tmp_path)
    marker = tmp_path / "pwned"
    plant_pickle(out / "checkpoints" / "resume", name, marker)
    with pytest.raises(DataError, match=rf"checkpoint '.*resume' cannot be loaded: .*{reason}") as error:
        train(TINY, out)
    assert "\n" not in str(error.value) and not marker.exists()


def test_a_pickled_model_given_to_extract_is_one_line(qf_model, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(qf_model, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Touch(marker)}, protocol=2))
    with pytest.raises(ModelError, match="could not load model .* a pickle of objects other than tensors"):
        models.load(str(folder), dtype=torch.float32, device=torch.device("cpu"))
    assert "could not load model" in one_line_error(capsys, "extract", "--model", str(folder), "--source",
                                                    "qf:documents=6,lines=16", "--out", str(tmp_path / "o"),
                                                    "--chunk-tokens", "32")
    assert not marker.exists()


def test_saturation_refuses_an_unfinished_run_unless_allowed(tmp_path, capsys):
    out = interrupted_run(tmp_path)
    message = f"training run '{out}' is incomplete: 4 of 6 steps; rerun `memscan train` to finish it, or pass --allow-incomplete"
    with pytest.raises(InputError) as error:
        saturation.analyse(str(out), str(tmp_path / "sat"))
    assert str(error.value) == message and not (tmp_path / "sat").exists()
    assert message in one_line_error(capsys, "saturation", str(out), "--out", str(tmp_path / "sat"))
    code, _ = run_cli(capsys, "saturation", str(out), "--out", str(tmp_path / "sat"), "--chunks", "2",
                      "--allow-incomplete")
    summary = saturation.read_summary(tmp_path / "sat")
    assert code == 0 and (summary["complete"], summary["steps_done"], summary["steps"]) == (False, 4, 6)
    assert summary["norm_growth"]["steps"] == [1, 2]


def test_saturation_summary_vouches_for_its_tables_and_a_rerun_never_mixes(finished_run, tmp_path):
    out = tmp_path / "sat"
    first = saturation.analyse(str(finished_run), str(out), saturation.SaturationSettings(chunks=2))
    assert first["complete"] and {e["name"] for e in first["files"]} == set(saturation.TABLES)
    flip_a_bit(out / "heads.parquet")
    with pytest.raises(DataError, match="table heads.parquet fails its sha256"):
        saturation.read_summary(out)
    with pytest.raises(InputError, match="no chunk of 4000 tokens"):
        saturation.analyse(str(finished_run), str(out), saturation.SaturationSettings(chunk_tokens=4000),
                           overwrite=True)
    with pytest.raises(DataError, match="incomplete run"):  # no record vouches for a half-written result
        saturation.read_summary(out)


def test_every_checkpoint_file_is_fsynced_before_the_state_that_vouches_for_it(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    train(replace(TINY, steps=2, checkpoints=2), tmp_path / "run")
    states = [i for i, path in enumerate(synced) if path.endswith("state.json.tmp")]
    assert len(states) == 2
    for i in states:
        folder = Path(synced[i]).parent
        before = {Path(p).name for p in synced[:i] if Path(p).parent == folder}
        assert {"model.safetensors", "optimizer.pt", "config.json"} <= before
        listed = {e["name"] for e in json.loads((tmp_path / "run" / "checkpoints" / folder.name.removesuffix(".tmp")
                                                 / "state.json").read_text())["files"]}
        assert listed == before


# ---------------------------------------------------------------- C. bad values: one line at the boundary


TRAIN_BASE = ["train", "--source", "qf:documents=12,lines=16", "--tokens", "3000", "--n-layer", "2", "--n-embd", "32",
              "--context", "32", "--steps", "2"]


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "-1", "--lr must be a finite number > 0; got -1.0"),
    ("--lr", "0", "--lr must be a finite number > 0; got 0.0"),
    ("--lr", "inf", "--lr must be a finite number > 0; got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0; got nan"),
    ("--epochs", "-1", "--epochs must be a finite number > 0; got -1.0"),
    ("--epochs", "0", "--epochs must be a finite number > 0; got 0.0"),
    ("--warmup-steps", "-1", "--warmup-steps must be at least 0; got -1"),
    ("--dropout", "1", "--dropout must be in [0, 1); got 1.0"),
    ("--dropout", "-0.1", "--dropout must be in [0, 1); got -0.1"),
    ("--seed", "-1", "--seed must be at least 0; got -1"),
    ("--test-fraction", "nan", "--test-fraction must be in [0, 1); got nan"),
    ("--steps", "0", "--steps must be at least 1; got 0"),
])
def test_bad_training_values_are_one_line(capsys, tmp_path, flag, value, message):
    line = one_line_error(capsys, *TRAIN_BASE, "--out", str(tmp_path / "run"), flag, value)
    assert line == f"memscan: error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    (["--seed", "-1"], "--seed must be at least 0; got -1"),
    (["--test-fraction", "nan"], "--test-fraction must be in [0, 1); got nan"),
    (["--test-fraction", "inf"], "--test-fraction must be in [0, 1); got inf"),
    (["--hf-split", "test"], "--hf-split applies to hf: sources only; --source 'qf:documents=6,lines=16' has no splits"),
])
def test_bad_extraction_values_are_one_line(capsys, qf_model, tmp_path, extra, message):
    line = one_line_error(capsys, "extract", "--model", str(qf_model), "--source", "qf:documents=6,lines=16",
                          "--out", str(tmp_path / "out"), "--chunk-tokens", "32", *extra)
    assert message in line and not (tmp_path / "out").exists()


def test_split_is_for_hf_sources_only(tmp_path):
    (tmp_path / "docs.txt").write_text("one document\n")
    with pytest.raises(InputError, match="--hf-split applies to hf: sources only"):
        corpus.open_source(str(tmp_path / "docs.txt"), seed=0, split="train")
    assert corpus.resolve_split("hf:owner/name", None) == "train"
    assert corpus.resolve_split("hf:owner/name", "validation") == "validation"
    assert corpus.resolve_split("qf", None) is None
    ExtractSettings(model="m", source="hf:owner/name", split="validation").check()
    with pytest.raises(InputError, match="--hf-split applies to hf: sources only"):
        TrainSettings(source="qf", tokens=10, split="test").check()


@pytest.mark.parametrize("settings,message", [
    (saturation.SaturationSettings(scale=float("nan")), "--scale must be a finite number > 0; got nan"),
    (saturation.SaturationSettings(chunks=0), "--chunks must be at least 1; got 0"),
    (saturation.SaturationSettings(seed=-1), "--seed must be at least 0; got -1"),
])
def test_bad_saturation_values_are_one_line(finished_run, tmp_path, settings, message):
    with pytest.raises(InputError) as error:
        saturation.analyse(str(finished_run), str(tmp_path / "sat"), settings)
    assert str(error.value) == message and not (tmp_path / "sat").exists()


# ---------------------------------------------------------------- D. any CPU: the bf16 probe can be forced


@pytest.mark.parametrize("forced,expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_dtype_follows_memscan_cpu_bf16(monkeypatch, forced, expected):
    monkeypatch.setenv("MEMSCAN_CPU_BF16", forced)
    assert models.cpu_has_fast_bf16() is (forced == "1")
    assert models.resolve_dtype("auto", torch.device("cpu")) == expected


def test_a_bad_memscan_cpu_bf16_is_one_line(monkeypatch):
    monkeypatch.setenv("MEMSCAN_CPU_BF16", "yes")
    with pytest.raises(InputError, match="MEMSCAN_CPU_BF16 must be 1 or 0 .*; got 'yes'"):
        models.resolve_dtype("auto", torch.device("cpu"))


def test_an_emulated_dtype_warns_once_per_process(monkeypatch, caplog):
    monkeypatch.setenv("MEMSCAN_CPU_BF16", "0")
    models._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="memscan.models"):
        for _ in range(3):
            assert models.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
        assert models.resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [("--dtype bf16 runs emulated on this CPU, often over 100x slower than fp32; "
                         "--dtype auto would pick fp32 here")]
    monkeypatch.setenv("MEMSCAN_CPU_BF16", "1")
    models._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="memscan.models"):
        models.resolve_dtype("bf16", torch.device("cpu"))
    assert len(caplog.records) == 1


@pytest.mark.dtype
def test_auto_extraction_and_training_follow_the_probe(qf_model, tmp_path):
    native = models.cpu_has_fast_bf16()
    manifest = extract(tiny_extract(qf_model, dtype="auto"), tmp_path / "data")
    assert (manifest["dtype"], manifest["vec_dtype"]) == (("bf16", "float16") if native else ("fp32", "float32"))
    info = train(replace(TINY, dtype="auto", steps=2), tmp_path / "run")
    assert info["dtype"] == ("bf16" if native else "fp32")


# ---------------------------------------------------------------- E. progress


def test_training_shows_a_bar_over_steps_with_the_loss(tmp_path, monkeypatch):
    import tqdm.auto

    bars: list[dict] = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = {"kwargs": kwargs, "updates": 0, "losses": []}
            bars.append(self.record)

        def update(self, n=1):
            self.record["updates"] += n
            return super().update(n)

        def set_postfix(self, *args, **kwargs):
            self.record["losses"].append(float(kwargs["loss"]))
            super().set_postfix(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    losses: list[float] = []
    train(replace(TINY, steps=3), tmp_path / "run", on_step=lambda step, loss: losses.append(loss))
    bar = next(b for b in bars if b["kwargs"].get("desc") == "train")
    assert bar["kwargs"]["total"] == 3 and bar["kwargs"]["unit"] == "step"
    assert bar["kwargs"]["disable"] is None  # quiet when not a terminal
    assert bar["updates"] == 3 and bar["losses"] == pytest.approx(losses, abs=5e-4)


def test_saturation_refuses_a_folder_with_files_memscan_did_not_write(finished_run, tmp_path):
    out = tmp_path / "sat"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(InputError, match=r"holds files memscan did not write \(thesis.tex\)"):
        saturation.analyse(str(finished_run), str(out), saturation.SaturationSettings(chunks=2))
    saturation.analyse(str(finished_run), str(out), saturation.SaturationSettings(chunks=2), allow_other_files=True)
    assert (out / "thesis.tex").read_text() == "mine" and saturation.read_summary(out)["complete"]
