"""The rules every output folder follows: checked records, owned files, one job at a time, one-line OS errors."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys

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


# A job in a subprocess: it holds `folder_lock(argv[1])` until its standard input closes. The prelude may
# take fcntl away first (as on Windows, which has none): memscan.files must import and lock all the same.
_NO_FCNTL = "import sys, warnings; sys.modules['fcntl'] = None; warnings.simplefilter('ignore')\n"
_HOLD = """
import sys
from memscan import files
with files.folder_lock(sys.argv[1]):
    print('held', flush=True)
    sys.stdin.readline()
"""
_TRY = """
import sys
from memscan import files
from memscan.errors import InputError
try:
    with files.folder_lock(sys.argv[1]):
        print('acquired')
except InputError as exc:
    print(exc)
"""


def _holding(folder, prelude: str = "") -> subprocess.Popen:
    job = subprocess.Popen([sys.executable, "-c", prelude + _HOLD, str(folder)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "held"
    return job


def _try_lock(folder, prelude: str = "") -> str:
    done = subprocess.run([sys.executable, "-c", prelude + _TRY, str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_memscan_files_imports_without_fcntl_and_two_jobs_still_exclude_each_other(tmp_path):
    probe = _NO_FCNTL + "import memscan.files, memscan.cli; print(sys.modules['fcntl'])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    first = _holding(tmp_path, _NO_FCNTL)
    try:
        refused = _try_lock(tmp_path, _NO_FCNTL)
        assert refused.startswith(f"--out '{tmp_path}' is in use by another memscan job (pid {first.pid}: ")
        assert refused.count("\n") == 0
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    assert _try_lock(tmp_path, _NO_FCNTL) == "acquired"   # released at the end of the first job


def test_the_holder_line_is_written_while_held_removed_on_release_and_counted_as_scratch(tmp_path):
    with files.folder_lock(tmp_path):
        holder = (tmp_path / files.HOLDER_FILE).read_text()
        assert holder.startswith(f"pid {os.getpid()}: ") and " since " in holder
        assert files.foreign_files(tmp_path, lambda name: False) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.LOCK_FILE]
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with files.job_folder(fresh):
            assert (fresh / files.HOLDER_FILE).exists()
            raise RuntimeError("boom")
    assert not fresh.exists()


def test_a_link_at_the_holder_name_is_refused_and_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("a user's file")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / files.HOLDER_FILE).symlink_to(outside)
    with pytest.raises(InputError, match="is a symbolic link"):
        with files.folder_lock(folder):
            pass
    assert outside.read_text() == "a user's file"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no kill -9 here")
def test_a_job_killed_with_sigkill_leaves_the_folder_free(tmp_path):
    job = _holding(tmp_path)
    assert _try_lock(tmp_path).startswith(f"--out '{tmp_path}' is in use by another memscan job (pid {job.pid}: ")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    with files.folder_lock(tmp_path):   # the kernel released the lock; the stale holder line is replaced
        assert (tmp_path / files.HOLDER_FILE).read_text().startswith(f"pid {os.getpid()}: ")


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


def test_the_verify_command_a_damaged_file_names_pastes_as_it_is(tmp_path):
    import shlex

    folder = tmp_path / "my data's folder"
    folder.mkdir()
    with pytest.raises(DataError) as raised:
        files.check_file(folder, {"name": "part-00000.parquet", "bytes": 1, "sha256": "0" * 64})
    command = str(raised.value).split("`")[1]
    assert shlex.split(command) == ["memscan", "verify", str(folder)]
