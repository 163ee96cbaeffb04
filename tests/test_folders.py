"""Issue 20: one model of a memscan folder. Every kind, healthy and damaged, through verify, info and load;
the hostile cases of links and of a user's files where memscan writes, as a table."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import memscan
from memscan import files, folders
from memscan.cli import main
from tests.fixtures import make_fixtures
from tests.test_trust_data import one_line_error, run_cli

KINDS = {"dataset": "dataset", "index": "index", "run": "query run", "scores": "scores", "verbatim": "verbatim",
         "training": "training run", "saturation": "saturation", "assoc": "assoc sweep", "experiment": "experiment"}
FIXTURES = Path(__file__).parent / "fixtures" / "formats-2026-12"


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory) -> Path:
    """One small folder of every kind, written by this memscan (the same calls as the fixtures of older formats)."""
    root = tmp_path_factory.mktemp("kinds") / "kinds"
    make_fixtures.main(root)
    return root


def sha256_tree(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (the lock aside): what must not change."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != files.LOCK_FILE}


def owned_files(folder: Path) -> list[str]:
    """Every file the records in `folder` list, the records themselves included (subfolders' files for a
    training run's checkpoints; an experiment's stage folders are their own kinds)."""
    names = set()
    for kind, record in folders.records(folder).items():
        names |= {kind.record, *(entry["name"] for entry in folders.entries(kind, record))}
    return sorted(name for name in names if (folder / name).is_file())


def flip_a_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- every kind: verify, info, load


@pytest.mark.parametrize("name", list(KINDS))
def test_verify_info_and_load_know_every_kind(every_kind, capsys, name):
    folder = every_kind / name
    code, err = run_cli(capsys, "verify", str(folder))
    capsys.readouterr()
    assert code == 0, err
    code, _ = run_cli(capsys, "info", str(folder))
    assert code == 0
    loaded = memscan.load(folder)
    assert loaded.kind.name == KINDS[name] and isinstance(loaded.record, dict)
    tables = loaded.tables
    assert tables and all(isinstance(table, pd.DataFrame) for table in tables.values())


def test_verify_says_which_kind_it_found(every_kind, capsys):
    for name, kind in KINDS.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["verify", str(every_kind / name)])
        assert exit_info.value.code == 0 and f": {kind}: " in capsys.readouterr().out


@pytest.mark.parametrize("name", list(KINDS))
def test_one_flipped_bit_in_any_owned_file_fails_verify_naming_it(every_kind, tmp_path, capsys, name):
    source = every_kind / name
    for owned in owned_files(source):
        copy = tmp_path / f"{name}-{owned}"
        shutil.copytree(source, copy, symlinks=True)
        flip_a_bit(copy / owned)
        message = one_line_error(capsys, "verify", str(copy))
        assert "failed verification" in message or owned in message, (owned, message)
        assert owned in capsys.readouterr().err + message, owned


@pytest.mark.parametrize("name", [name for name in KINDS if name != "experiment"])
def test_a_signed_record_that_lies_about_its_files_fails_verify(every_kind, tmp_path, capsys, name):
    copy = tmp_path / name
    shutil.copytree(every_kind / name, copy, symlinks=True)
    kind, record = folders.detect(copy)
    entry = folders.entries(kind, record)[0]
    entry["bytes"] += 1   # the record now lies about this file, and is signed again as memscan would sign it
    files.write_json_atomic(copy / kind.record, files.signed(record))
    code, err = run_cli(capsys, "verify", str(copy))
    assert code == 1 and entry["name"] in err


# ---------------------------------------------------------------- a user's file where a stage writes


def _stage_commands(kinds: Path, out: Path) -> dict[str, list[str]]:
    """The command that writes each kind into `out`, from the inputs of `kinds`."""
    model = json.loads((kinds / "dataset" / "manifest.json").read_text())["model"]["path"]
    return {
        "dataset": ["extract", "--model", model, "--source", "qf:documents=6,lines=16", "--chunk-tokens", "32",
                    "--dtype", "fp32", "--out", str(out)],
        "index": ["index", str(kinds / "dataset"), "--out", str(out)],
        "run": ["query", str(kinds / "index"), "--queries", str(kinds / "dataset"), "--k", "3", "--out", str(out)],
        "scores": ["score", str(kinds / "dataset"), "--resamples", "20", "--out", str(out)],
        "verbatim": ["verbatim", str(kinds / "dataset"), "--num-chunks", "2", "--prompt-tokens", "8",
                     "--suffix-tokens", "8", "--out", str(out)],
        "training": ["train", "--source", "qf:documents=40,lines=16", "--tokens", "2000", "--n-layer", "1",
                     "--n-embd", "16", "--n-head", "4", "--context", "32", "--steps", "2", "--test-fraction", "0.3",
                     "--out", str(out)],
        "saturation": ["saturation", str(kinds / "training"), "--chunks", "2", "--out", str(out)],
        "assoc": ["assoc", "sweep", "--dims", "10", "--samples", "10", "--seeds", "1", "--schemes", "p",
                  "--out", str(out)],
        "experiment": ["run", "demo", "--out", str(out)],
    }


@pytest.mark.parametrize("name", list(KINDS))
def test_a_users_file_where_a_stage_writes_is_refused_and_never_changed(every_kind, tmp_path, capsys, name):
    kind, record = folders.detect(every_kind / name)
    for written in [kind.record, *(e["name"] for e in folders.entries(kind, record))][:2]:
        out = tmp_path / f"{name}-{written.replace('/', '-')}"
        (out / written).parent.mkdir(parents=True)   # a dataset's shards lie in vectors/
        (out / written).write_text("a user's own file\n")
        before = sha256_tree(out)
        command = _stage_commands(every_kind, out)[name]
        for extra in ([], ["--allow-other-files"]):
            message = one_line_error(capsys, *command, *extra)
            assert written in message, message
        assert sha256_tree(out) == before


# ---------------------------------------------------------------- the hostile cases of issue 20, causes 1, 2 and 4


def _link_lock(kinds: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A .memscan.lock that is a link: any job would have truncated the file it points to."""
    out = tmp / "index"
    out.mkdir()
    (out / files.LOCK_FILE).symlink_to(tmp / "outside.txt")
    return out, ["index", str(kinds / "dataset"), "--out", str(out)]


def _link_tmp(name: str) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    """A pre-existing index.json.tmp or index.faiss.tmp link: the index would have been written through it."""
    def setup(kinds: Path, tmp: Path) -> tuple[Path, list[str]]:
        out = tmp / "index"
        out.mkdir()
        (out / name).symlink_to(tmp / "outside.txt")
        return out, ["index", str(kinds / "dataset"), "--out", str(out), "--allow-other-files"]
    return setup


def _link_report_image(kinds: Path, tmp: Path) -> tuple[Path, list[str]]:
    """report.html, which `memscan report` writes, is a link out of the folder."""
    out = tmp / "run"
    shutil.copytree(kinds / "run", out, symlinks=True)
    (out / "report.html").unlink()
    (out / "report.html").symlink_to(tmp / "outside.txt")
    return out, ["report", str(out)]


def _users_file_in_query_out(name: str) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    """A user's summary.json or histograms.parquet in `memscan query --out`: it was overwritten."""
    def setup(kinds: Path, tmp: Path) -> tuple[Path, list[str]]:
        out = tmp / "run"
        out.mkdir()
        (out / name).write_text("mine\n")
        return out, ["query", str(kinds / "index"), "--queries", str(kinds / "dataset"), "--k", "3", "--out",
                     str(out), "--allow-other-files"]
    return setup


def _users_summary_in_verbatim_out(kinds: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A user's summary.json in `memscan verbatim --out`: it was deleted."""
    out = tmp / "verbatim"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}\n')
    return out, ["verbatim", str(kinds / "dataset"), "--num-chunks", "2", "--out", str(out), "--allow-other-files"]


def _users_file_in_run_out(name: str) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    """A user's stages.json (overwritten, then the job failed) or comparison.json (deleted) in `memscan run --out`."""
    def setup(kinds: Path, tmp: Path) -> tuple[Path, list[str]]:
        out = tmp / "experiment"
        out.mkdir()
        (out / name).write_text('{"mine": true}\n')
        return out, ["run", "demo", "--out", str(out), "--allow-other-files"]
    return setup


def _users_image_in_report(kinds: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A user's report.html in a query run folder whose report never wrote one: it was overwritten."""
    out = tmp / "run"
    shutil.copytree(kinds / "run", out, symlinks=True)
    report = folders.read_record(out, folders.REPORT)
    kept = [entry for entry in report["files"] if entry["name"] != "report.html"]
    files.write_json_atomic(out / folders.REPORT.record, files.signed({**report, "files": kept}))
    (out / "report.html").write_bytes(b"my own page")
    return out, ["report", str(out), "--allow-other-files"]


HOSTILE = [  # (case, setup -> (folder, command), the line's fragment)
    ("lock is a link", _link_lock, "is a symbolic link"),
    ("index.json.tmp is a link", _link_tmp("index.json.tmp"), "index.json.tmp' is a symbolic link"),
    ("index.faiss.tmp is a link", _link_tmp("index.faiss.tmp"), "is a symbolic link"),
    ("report page is a link", _link_report_image, "report.html' is a symbolic link"),
    ("user's summary.json in query --out", _users_file_in_query_out("summary.json"), "holds summary.json, which"),
    ("user's histograms.parquet in query --out", _users_file_in_query_out("histograms.parquet"),
     "holds histograms.parquet, which"),
    ("user's summary.json in verbatim --out", _users_summary_in_verbatim_out, "holds summary.json, which"),
    ("user's stages.json in run --out", _users_file_in_run_out("stages.json"), "holds stages.json, which"),
    ("user's comparison.json in run --out", _users_file_in_run_out("comparison.json"), "holds comparison.json, which"),
    ("user's report.html where report draws", _users_image_in_report, "holds report.html, which"),
]


@pytest.mark.parametrize("case, setup, fragment", HOSTILE, ids=[case for case, _, _ in HOSTILE])
def test_hostile_folders_are_refused_in_one_line_and_nothing_changes(every_kind, tmp_path, capsys, case, setup,
                                                                     fragment):
    (tmp_path / "outside.txt").write_text("a file outside every memscan folder\n")
    folder, command = setup(every_kind, tmp_path)
    before = sha256_tree(tmp_path)
    assert fragment in one_line_error(capsys, *command)
    assert sha256_tree(tmp_path) == before   # the user's files, the folder and everything outside it


@pytest.mark.parametrize("name", ["scores", "verbatim", "saturation"])
def test_verify_passes_healthy_folders_it_used_to_call_damaged(every_kind, capsys, name):
    code, err = run_cli(capsys, "verify", str(every_kind / name))
    assert code == 0, err


def test_a_listed_file_replaced_by_a_link_is_refused_by_readers(every_kind, tmp_path):
    copy = tmp_path / "scores"
    shutil.copytree(every_kind / "scores", copy, symlinks=True)
    target = tmp_path / "elsewhere.parquet"
    shutil.copy(copy / "scores.parquet", target)
    (copy / "scores.parquet").unlink()
    os.symlink(target, copy / "scores.parquet")
    with pytest.raises(memscan.errors.DataError, match="scores.parquet is a symbolic link"):
        memscan.load(copy).scores


# ---------------------------------------------------------------- the same rule for --overwrite everywhere


def test_the_same_job_is_a_no_op_and_another_needs_overwrite(every_kind, tmp_path, capsys):
    out = tmp_path / "run"
    command = ["query", str(every_kind / "index"), "--queries", str(every_kind / "dataset"), "--out", str(out)]
    assert run_cli(capsys, *command, "--k", "3")[0] == 0
    stamp = (out / "summary.json").stat().st_mtime_ns
    assert run_cli(capsys, *command, "--k", "3")[0] == 0 and (out / "summary.json").stat().st_mtime_ns == stamp
    assert "pass --overwrite to replace it" in one_line_error(capsys, *command, "--k", "2")
    assert run_cli(capsys, *command, "--k", "2", "--overwrite")[0] == 0
    assert memscan.load(out).summary["settings"]["k"] == 2
    assert "holds a memscan query run" in one_line_error(
        capsys, "score", str(every_kind / "dataset"), "--out", str(out))


# ---------------------------------------------------------------- folders written by the memscan of 2026-12 still read


@pytest.mark.parametrize("name", list(KINDS))
def test_folders_written_in_todays_formats_still_read(tmp_path, capsys, name):
    if not (FIXTURES / name).is_dir():
        pytest.skip("no fixture of this kind")
    copy = tmp_path / FIXTURES.name
    shutil.copytree(FIXTURES, copy, symlinks=True)
    loaded = memscan.load(copy / name)
    assert loaded.kind.name == KINDS[name]
    assert all(isinstance(table, pd.DataFrame) for table in loaded.tables.values())
