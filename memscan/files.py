"""The files memscan owns: atomic writes, checksums, JSON records checked on read, the folder lock.

Every output folder follows the same rules (docs/formats.md):
- a file is written under a temporary name, fsynced and renamed, then listed (with its
  sha256) by a marker record (manifest.json, index.json, summary.json, run.json), which
  is written last; readers check each listed file against its entry;
- names read from a record are plain file names inside the folder, nothing else;
- memscan removes or replaces only files that its own records list (or their exact
  temporary names); anything else in the folder stays;
- one job at a time holds a folder (`job_folder`), and a job that fails removes the
  folder it created.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shlex
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from memscan.errors import DataError, InputError

LOCK_FILE = ".memscan.lock"
HOLDER_FILE = LOCK_FILE + ".holder"   # who holds the lock: written once it is held, removed on release
LOCK_FILES = frozenset({LOCK_FILE, HOLDER_FILE})   # the lock's files: memscan's own scratch in every folder
TMP_SUFFIX = ".tmp"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)   # POSIX; Windows has no symbolic-link flag (refuse_link checks first)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name): for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def fingerprint(document: Any) -> str:
    """sha256 of a JSON document in canonical form: the identity of a job's settings."""
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- atomic writes, checksums


def fsync_directory(directory: Path) -> None:
    if os.name == "nt":  # a folder cannot be opened (nor fsynced) there; NTFS journals the rename itself
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_link(path: Path) -> None:
    """Refuse a symbolic link where memscan would write, remove or read a file of its own: it may point anywhere."""
    if os.path.islink(path):
        raise InputError(f"'{path}' is a symbolic link; memscan never writes, removes or reads its files through "
                         "links: remove the link or choose another folder")


def new_tmp(path: Path) -> Path:
    """The temporary name of `path`, created empty with O_EXCL | O_NOFOLLOW (a stale one of memscan's is
    removed first, a link there refused): the writer that fills it never writes through a link."""
    path = Path(path)
    tmp = tmp_path(path)
    refuse_link(path)
    refuse_link(tmp)
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644))
    return tmp


def commit_file(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it to `final`, fsync the folder: `final` is then whole on disk (never a link replaced)."""
    refuse_link(final)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_directory(final.parent)


def tmp_path(path: Path) -> Path:
    """The exact temporary name memscan writes `path` under."""
    return path.with_name(path.name + TMP_SUFFIX)


def write_json_atomic(path: Path, document: Mapping[str, Any]) -> None:
    """Write to a temporary name, fsync, rename: readers see the old or the new file, whole.

    Non-finite floats are refused (JSON has no Infinity or NaN): a record stays standard JSON.
    """
    write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """A text file written as `write_json_atomic` writes a record: whole or not at all, never through a link."""
    tmp = new_tmp(Path(path))
    tmp.write_text(text)
    commit_file(tmp, Path(path))


def sha256_of(path: Path, block_bytes: int = 1 << 22) -> str:
    return sha256_of_files([path], block_bytes)


def sha256_of_files(paths: Iterable[Path], block_bytes: int = 1 << 22, with_names: bool = False) -> str:
    """One sha256 over the bytes of several files in order (and their names, `with_names`)."""
    digest = hashlib.sha256()
    for path in paths:
        if with_names:
            digest.update(Path(path).name.encode())
        with open(path, "rb") as f:
            while block := f.read(block_bytes):
                digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """What a marker records of a file it vouches for: plain name, size and sha256."""
    path = Path(path)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def plain_name(name: Any, where: Path) -> str:
    """A name read from a record, refused unless it is a plain file name (no folder, no `..`)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name):
        raise DataError(f"{where} names the file {name!r}; only plain file names inside its folder are accepted")
    return name


def file_problem(directory: Path, entry: Mapping[str, Any], what: str = "file") -> str | None:
    """What is wrong with a file a record lists (missing, not a regular file, resized, altered), or None."""
    name = plain_name(entry.get("name"), Path(directory))
    path = Path(directory) / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{what} {name} is missing"
    if stat.S_ISLNK(info.st_mode):
        return f"{what} {name} is a symbolic link, not the file memscan wrote"
    if not stat.S_ISREG(info.st_mode):
        return f"{what} {name} is not a regular file"
    if info.st_size != entry.get("bytes"):
        return (f"{what} {name} is {info.st_size:,} bytes; its record says {entry.get('bytes'):,} "
                "(truncated or overwritten)")
    if sha256_of(path) != entry.get("sha256"):
        return f"{what} {name} fails its sha256 checksum (corrupted or replaced)"
    return None


def check_file(directory: Path, entry: Mapping[str, Any], what: str = "file") -> Path:
    """The path of a listed file, after checking it against its entry; a DataError names what is wrong."""
    problem = file_problem(directory, entry, what)
    if problem:
        raise DataError(f"{Path(directory)}: {problem}; run `memscan verify {shlex.quote(str(directory))}`")
    return Path(directory) / entry["name"]


# ---------------------------------------------------------------- records (JSON documents) checked on read


def read_record(path: Path, what: str, fields: Mapping[str, type | tuple[type, ...]] | None = None,
                ) -> dict[str, Any]:
    """A JSON object read from `path`, refused in one line when it does not parse or lacks a field.

    `fields` maps required top-level keys to their type(s); `what` names the record in errors.
    """
    path = Path(path)
    if path.is_symlink():
        raise DataError(f"{path} is a symbolic link, not the record memscan wrote")
    if path.exists() and not path.is_file():  # a FIFO or a device would hang the read
        raise DataError(f"{path} is not a regular file")
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"'{path.parent}' has no {path.name}: it is not a {what} folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({first_line(exc)})") from None
    if not isinstance(document, dict):
        raise DataError(f"{path} is not a {what} record (a JSON object was expected, got {type(document).__name__})")
    for key, kinds in (fields or {}).items():
        require(document, key, kinds, path)
    return document


def require(document: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], path: Path) -> Any:
    """document[key], refused in one line when it is missing or of another type (bool is not an int)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if key not in document:
        raise DataError(f"{path} has no '{key}'; the record is damaged")
    value = document[key]
    wrong_bool = isinstance(value, bool) and bool not in kinds
    if wrong_bool or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{path}: '{key}' must be {names}; got {json.dumps(value)[:60]}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{path}: '{key}' must be finite; got {value}")
    return value


SELF_SHA256 = "self_sha256"


def signed(document: Mapping[str, Any]) -> dict[str, Any]:
    """The document with `self_sha256`, the fingerprint of everything else in it: any edit of a record shows."""
    body = {key: value for key, value in document.items() if key != SELF_SHA256}
    return {**body, SELF_SHA256: fingerprint(body)}


def check_signature(document: Mapping[str, Any], path: Path) -> None:
    """Refuses a record whose content does not match its `self_sha256` (edited, corrupted or unsigned)."""
    body = {key: value for key, value in document.items() if key != SELF_SHA256}
    if document.get(SELF_SHA256) != fingerprint(body):
        raise DataError(f"{path} fails its self_sha256 checksum: it was edited or corrupted after memscan wrote it")


# ---------------------------------------------------------------- ownership: what memscan may remove


def foreign_files(directory: Path, ours: Callable[[str], bool]) -> list[str]:
    """Names in `directory` that memscan did not write (`ours(name)` is False), the lock's files aside."""
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in LOCK_FILES and not ours(p.name))


def refuse_foreign(directory: Path, ours: Callable[[str], bool], flag: str = "--out") -> None:
    """One line naming the files in `directory` that memscan did not write, if any."""
    foreign = foreign_files(directory, ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"{flag} '{directory}' holds files memscan did not write ({shown}); "
                         "choose an empty or new folder, move them, or pass --allow-other-files")


def remove_owned(directory: Path, names: Iterable[str]) -> None:
    """Remove the listed files (and their exact temporary names) of `directory`; nothing else."""
    for name in names:
        for path in (Path(directory) / name, tmp_path(Path(directory) / name)):
            refuse_link(path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------- one job per folder


@contextlib.contextmanager
def folder_lock(directory: Path, flag: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on `directory` (which must exist) for the block; a second job gets one line.

    The lock is the operating system's own on `.memscan.lock` (flock(2) on Linux and macOS,
    LockFileEx on Windows, through the filelock package): released when the process ends, even
    by kill -9, so a crashed job never leaves a folder locked. The file stays (Windows removes
    it). Who holds the lock (pid, command, since when) is `.memscan.lock.holder`, written once
    the lock is held and removed on release; a link at either name is refused, never followed.
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    refuse_link(path)
    refuse_link(directory / HOLDER_FILE)
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(directory))
    lock = FileLock(str(path), timeout=0, mode=0o644)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"{flag} '{directory}' is in use by another memscan job ({_holder(directory)}); "
                         "wait for it to finish or choose another folder") from None
    try:
        _write_holder(directory)
        yield
    finally:
        try:
            holder = directory / HOLDER_FILE
            if not os.path.islink(holder):
                with contextlib.suppress(OSError):
                    holder.unlink()
        finally:
            lock.release()


def _write_holder(directory: Path) -> None:
    """`.memscan.lock.holder`: one line naming this job, written whole (temporary name, rename)."""
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    line = f"pid {os.getpid()}: {command}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    path = directory / HOLDER_FILE
    tmp = new_tmp(path)
    try:
        tmp.write_text(line + "\n")
        os.replace(tmp, path)
    except OSError:  # who holds the lock is a courtesy to the next job: the lock itself is held
        with contextlib.suppress(OSError):
            tmp.unlink()


def _holder(directory: Path, tries: int = 5) -> str:
    """The holder's line (read without following a link), or "another process" where there is none yet."""
    for attempt in range(tries):
        with contextlib.suppress(OSError):
            fd = os.open(directory / HOLDER_FILE, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
            try:
                text = os.read(fd, 4096) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
            finally:
                os.close(fd)
            lines = text.decode(errors="replace").strip().splitlines()
            if lines:
                return lines[0]
        if attempt + 1 < tries:
            time.sleep(0.02)  # the holder took the lock a moment ago and is writing its line
    return "another process"


@contextlib.contextmanager
def job_folder(directory: Path, flag: str = "--out") -> Iterator[Path]:
    """Create `directory` if needed and hold its lock for the job; a failed job removes a folder it created.

    The folder is removed only when the job made it and it then holds nothing but the lock,
    memscan's temporary files and pending records: what a finished stage wrote, or what a user
    put there, stays.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{flag} '{directory}' exists and is not a folder")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{flag} '{directory}' cannot be created: {exc.strerror or first_line(exc)}") from None
    try:
        with folder_lock(directory, flag):
            yield directory
    except BaseException:
        if created:
            _remove_if_only_scratch(directory)
        raise


def _remove_if_only_scratch(directory: Path) -> None:
    with contextlib.suppress(OSError):
        paths = list(directory.iterdir())
        if all(p.name in LOCK_FILES or p.name.endswith(TMP_SUFFIX) or _is_pending(p) for p in paths):
            shutil.rmtree(directory)


PENDING = "pending"   # the key of a record written before its job's files: it vouches for nothing (memscan.folders)


def _is_pending(path: Path) -> bool:
    """Whether `path` is a pending record (scratch, as temporary files are): a regular JSON file with PENDING."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 20:
        return False
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and PENDING in document
