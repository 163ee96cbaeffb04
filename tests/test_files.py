"""The rules every output folder follows: checked records, owned files, one job at a time, one-line OS errors."""

from __future__ import annotations

import errno
import json
import math

import pytest

from memscan import files
from memscan.cli import main
from memscan.errors import DataError, InputError


def test_a_second_job_on_a_folder_gets_one_line_naming_the_holder(tmp_path):
    with files.folder_lock(tmp_path):
        with pytest.raises(InputError, match=r"in use by another memscan job \(pid \d+"):
            with files.folder_lock(tmp_path):
                pass
    with files.folder_lock(tmp_path):  # released at the end of the first job
        pass


def test_a_failed_job_removes_only_a_folder_it_created_and_that_holds_only_scratch(tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with files.job_folder(fresh):
            (fresh / "table.parquet.tmp").write_text("half")
            raise RuntimeError("boom")
    assert not fresh.exists()

    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError):
        with files.job_folder(kept):
            (kept / "part-00000.parquet").write_text("a finished shard")
            raise RuntimeError("boom")
    assert (kept / "part-00000.parquet").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with files.job_folder(existing):
            raise RuntimeError("boom")
    assert existing.is_dir()


def test_job_folder_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "out").write_text("a user's file")
    with pytest.raises(InputError, match="exists and is not a folder"):
        with files.job_folder(tmp_path / "out"):
            pass
    assert (tmp_path / "out").read_text() == "a user's file"


def test_remove_owned_removes_exactly_the_listed_names_and_their_temporaries(tmp_path):
    for name in ("index.faiss", "index.faiss.tmp", "index.faiss.bak", "notes.txt"):
        (tmp_path / name).write_text(name)
    files.remove_owned(tmp_path, ["index.faiss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss.bak", "notes.txt"]


def test_refuse_foreign_names_the_files_memscan_did_not_write(tmp_path):
    (tmp_path / "part-00000.parquet").write_text("")
    (tmp_path / "thesis.tex").write_text("")
    (tmp_path / files.LOCK_FILE).write_text("")
    assert files.foreign_files(tmp_path, lambda name: name.startswith("part-")) == ["thesis.tex"]
    with pytest.raises(InputError, match="thesis.tex"):
        files.refuse_foreign(tmp_path, lambda name: name.startswith("part-"))


@pytest.mark.parametrize("name", ["../other/part.parquet", "/dev/zero", "..", "", 7, None, "a\\b"])
def test_names_read_from_a_record_must_be_plain_file_names(tmp_path, name):
    with pytest.raises(DataError, match="plain file names"):
        files.plain_name(name, tmp_path / "manifest.json")


def test_file_problem_names_missing_resized_altered_and_irregular_files(tmp_path):
    path = tmp_path / "table.parquet"
    path.write_bytes(b"0123456789")
    entry = files.file_entry(path)
    assert entry == {"name": "table.parquet", "bytes": 10, "sha256": files.sha256_of(path)}
    assert files.file_problem(tmp_path, entry) is None
    path.write_bytes(b"0123456788")
    assert "sha256" in files.file_problem(tmp_path, entry)
    path.write_bytes(b"012")
    assert "truncated" in files.file_problem(tmp_path, entry)
    path.unlink()
    assert "missing" in files.file_problem(tmp_path, entry)
    path.mkdir()
    assert "not a regular file" in files.file_problem(tmp_path, entry)
    with pytest.raises(DataError, match="table.parquet is not a regular file"):
        files.check_file(tmp_path, entry)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[]", "a JSON object was expected, got list"),
    ('{"n": -5}', "has no 'layers'"),
    ('{"n": "5", "layers": []}', "'n' must be int"),
    ('{"n": true, "layers": []}', "'n' must be int"),
])
def test_records_that_do_not_parse_or_lack_a_field_are_one_line(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=message):
        files.read_record(tmp_path / "manifest.json", "dataset", {"n": int, "layers": list})


def test_records_never_hold_non_standard_json(tmp_path):
    with pytest.raises(ValueError):
        files.write_json_atomic(tmp_path / "summary.json", {"beta": math.inf})
    files.write_json_atomic(tmp_path / "summary.json", {"beta": 1.0})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"beta": 1.0}
    assert not (tmp_path / "summary.json.tmp").exists()


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only file system")])
def test_a_full_disk_or_read_only_folder_is_one_line_and_exit_1(capsys, monkeypatch, tmp_path, code, hint):
    import memscan.assoc

    def fail(*args, **kwargs):
        raise OSError(code, "No room", str(tmp_path / "errors.parquet"))

    monkeypatch.setattr(memscan.assoc, "run_sweep", fail)
    with pytest.raises(SystemExit) as exit_info:
        main(["assoc", "sweep", "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.count("\n") == 1 and hint in err and "errors.parquet" in err and "Traceback" not in err
