"""One model of a memscan folder: every kind described once, and the rules each stage writes by.

A kind of folder is its format name and version, the record that vouches for it (a JSON
file written last, signed with the sha256 of its content), the files that record lists
(each with its size and sha256) and the command that writes it. Every stage claims its
folder through `claim` and writes its record through `write_record`, so the rules are
the same everywhere (docs/formats.md, "One model of a folder"):

- ownership comes from records, never from names: a file is memscan's when a sound record
  in the folder lists it; a job replaces or removes only what its own previous record listed;
- a file of someone else's at a name the job writes is refused, always; any other file of
  someone else's is refused unless `--allow-other-files`, and then never touched;
- the same job (the same fingerprint of settings and inputs) finds its finished output and
  does nothing; another job of the same kind needs `--overwrite`; another kind is refused;
- nothing is written, removed or read through a symbolic link (files.new_tmp, files.refuse_link).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memscan import files
from memscan.errors import DataError, InputError


PENDING = files.PENDING   # a record written before its job's files: what it will own, nothing it vouches for


@dataclass(frozen=True)
class Kind:
    """A kind of folder memscan writes: its format, its record and what the record lists.

    `lists`: the record's keys whose entries ({name, bytes, sha256}, or objects holding such
    entries, as an index's shards do) are the files it vouches for; `folders`: the record's
    key listing subfolders it owns (an experiment's stage folders). `signed_since`: the first
    version whose record carries self_sha256 (earlier ones are read unsigned). `legacy`: the
    keys of a record written before the kind had a format name. `attached`: written into
    another kind's folder beside its record (a report, a fit).
    """

    name: str
    format: str
    version: int
    record: str
    command: str
    readable: tuple[int, ...]
    signed_since: int = 1
    lists: tuple[str, ...] = ("files",)
    folders: str | None = None
    legacy: tuple[str, ...] = ()
    attached: bool = False
    growing: tuple[str, ...] = ()   # files a sound record owns while its job still writes them (a run's log)
    subfolders: tuple[str, ...] = ()   # folders its listed files may lie in, one level down (`listed_name`)

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether a parsed record is one of this kind's (by its format, or for old records by its keys)."""
        if "format" in record:
            return record["format"] == self.format
        return bool(self.legacy) and all(key in record for key in self.legacy)

    def version_of(self, record: Mapping[str, Any]) -> Any:
        return record.get("format_version", 1)


DATASET = Kind("dataset", "memscan.activations", 4, "manifest.json", "memscan extract", (1, 2, 3, 4),
               signed_since=3, lists=("shards", "chunk_tables"), subfolders=("vectors", "chunks"))
INDEX = Kind("index", "memscan.index", 2, "index.json", "memscan index", (2,), signed_since=2, lists=("shards",))
QUERY_RUN = Kind("query run", "memscan.run", 2, "summary.json", "memscan query", (2,), lists=("tables",))
SCORES = Kind("scores", "memscan.scores", 2, "summary.json", "memscan score", (1, 2), lists=("tables",))
VERBATIM = Kind("verbatim", "memscan.verbatim", 2, "summary.json", "memscan verbatim", (1, 2), lists=("tables",))
TRAINING = Kind("training run", "memscan.training", 2, "run.json", "memscan train", (1, 2), signed_since=2,
                folders="folders", legacy=("fingerprint", "checkpoint_steps"), growing=("log.parquet",))
SATURATION = Kind("saturation", "memscan.saturation", 2, "summary.json", "memscan saturation", (1, 2),
                  signed_since=2, legacy=("target", "layer_cosines"))
ASSOC = Kind("assoc sweep", "memscan.assoc", 2, "settings.json", "memscan assoc sweep", (1, 2), signed_since=2,
             legacy=("settings", "rows", "files"))
EXPERIMENT = Kind("experiment", "memscan.stages", 2, "stages.json", "memscan run", (1, 2), signed_since=2,
                  folders="folders")
REPORT = Kind("report", "memscan.report", 1, "report.json", "memscan report", (1,), attached=True)
# An index is swapped, not rewritten in place: its pending names go in a record of their own beside index.json.
INDEX_BUILD = Kind("index build", "memscan.index_build", 1, "build.json", "memscan index", (1,), attached=True)
FIT = Kind("assoc fit", "memscan.assoc_fit", 1, "fit.json", "memscan assoc fit", (1,), attached=True,
           legacy=("slopes",))

KINDS = (DATASET, INDEX, QUERY_RUN, SCORES, VERBATIM, TRAINING, SATURATION, ASSOC, EXPERIMENT)
ATTACHED = (REPORT, FIT, INDEX_BUILD)
# What a record written before the folder model (no `fingerprint`) did not list but its stages wrote beside it.
_REPORT_IMAGES = ("nearest_distances.png", "subset_histograms.png", "coverage.png", "distance_vs_nll.png",
                  "radius_by_layer.png")
LEGACY_NAMES = {TRAINING.name: ("log.parquet", "checkpoints"),
                QUERY_RUN.name: ("report.html", "comparison.json", *_REPORT_IMAGES),
                SCORES.name: ("roc.png", "bridge.png"),
                ASSOC.name: ("fit.json", "error_vs_d.png", "error_vs_T.png", "sgd_q.png"),
                SATURATION.name: ("norm_growth.png", "saturation.png", "heads.png"),
                EXPERIMENT.name: ("experiment.toml", "comparison.json")}


# ---------------------------------------------------------------- reading a record


def entries(kind: Kind, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The file entries {name, bytes, sha256, ...} a record lists, at its `lists` keys (one level deep)."""
    found = []
    for key in kind.lists:
        for item in record.get(key) or []:
            if isinstance(item, dict) and "name" in item:
                found.append(item)
            elif isinstance(item, dict):
                found.extend(value for value in item.values() if isinstance(value, dict) and "name" in value)
    return found


def read_record(directory: Path, kind: Kind, allow_pending: bool = False) -> dict[str, Any]:
    """`kind`'s record in `directory`, refused in one line unless it is this kind's, of a version this memscan
    reads, signed where its version is, lists only plain file names with their size and sha256, and is finished
    (a job cut short leaves its pending record: read only for ownership, with `allow_pending`)."""
    path = Path(directory) / kind.record
    record = files.read_record(path, f"memscan {kind.name}")
    if "format" not in record:   # written before the kind had a format name: it must have that version's keys
        for key in kind.legacy:
            if key not in record:
                raise DataError(f"{path} has no '{key}'; the record is damaged")
    if not kind.matches(record):
        raise DataError(f"{path} is not a memscan {kind.name} record (format {record.get('format')!r})")
    version = kind.version_of(record)
    if version not in kind.readable:
        versions = f"version{'s' * (len(kind.readable) > 1)} {', '.join(map(str, kind.readable))}"
        raise DataError(f"{path} has format version {version}; this memscan reads {versions}: rerun "
                        f"`{kind.command}` with --overwrite to write it anew")
    if isinstance(version, int) and version >= kind.signed_since:
        files.check_signature(record, path)
    for entry in entries(kind, record):
        listed_name(kind, entry.get("name"), path)
        files.require(entry, "bytes", int, path)
        files.require(entry, "sha256", str, path)
    for name in (*_folders(kind, record), *record.get(PENDING, ())):
        files.plain_name(name, path)
    if PENDING in record and not allow_pending:
        raise DataError(f"'{directory}' holds an incomplete run of `{kind.command}` (cut short before its record "
                        f"vouched for its files): rerun `{kind.command}` to finish it")
    return record


def _folders(kind: Kind, record: Mapping[str, Any]) -> list[Any]:
    listed = record.get(kind.folders) if kind.folders else None
    return list(listed) if isinstance(listed, list) else []


def listed_problems(directory: Path, kind: Kind, record: Mapping[str, Any]) -> list[str]:
    """Each listed file that is missing, a link, resized or altered, in one line each."""
    problems = (file_problem(Path(directory), kind, entry) for entry in entries(kind, record))
    return [problem for problem in problems if problem]


def listed_name(kind: Kind, name: Any, where: Path) -> str:
    """A file name read from `kind`'s record: a plain name, or `folder/name` in one of the kind's subfolders
    (a dataset's vectors/ and chunks/); anything else (absolute, `..`, deeper) is one DataError line."""
    folder, _, plain = name.rpartition("/") if isinstance(name, str) else ("", "", name)
    if folder and folder not in kind.subfolders:
        raise DataError(f"{where} names the file {name!r}; only plain file names inside its folder"
                        f"{' or its ' + ', '.join(kind.subfolders) if kind.subfolders else ''} are accepted")
    files.plain_name(plain, where)
    return str(name)


def file_problem(directory: Path, kind: Kind, entry: Mapping[str, Any], what: str = "file") -> str | None:
    """What is wrong with a file `kind`'s record lists (`files.file_problem`), or None; a file in a subfolder
    that is a link, or not a folder, is refused too (memscan reads nothing through a link)."""
    directory = Path(directory)
    name = listed_name(kind, entry.get("name"), directory)
    folder, _, plain = name.rpartition("/")
    if not folder:
        return files.file_problem(directory, entry, what)
    if os.path.islink(directory / folder):
        return f"{what} {name} lies in {folder}/, a symbolic link, not the folder memscan wrote"
    if not (directory / folder).is_dir():
        return f"{what} {name} is missing" + (f" ({folder} is not a folder)" if (directory / folder).exists() else "")
    problem = files.file_problem(directory / folder, {**entry, "name": plain}, what)
    return problem and problem.replace(f"{what} {plain}", f"{what} {name}", 1)


def check_file(directory: Path, kind: Kind, entry: Mapping[str, Any], what: str = "file") -> Path:
    """The path of a file `kind`'s record lists, after checking it against its entry; a DataError names the problem."""
    problem = file_problem(directory, kind, entry, what)
    if problem:
        raise DataError(f"{Path(directory)}: {problem}; run `memscan verify {shlex.quote(str(directory))}`")
    return Path(directory) / entry["name"]


def subfolder(directory: Path, name: str) -> Path:
    """`directory/name`, a subfolder memscan writes listed files into, made (and its entry fsynced) when missing;
    a link there, or a file, is one InputError line."""
    path = Path(directory) / name
    files.refuse_link(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"'{path}' is not a folder; memscan writes its files there: move it or choose another folder")
    if not path.exists():
        path.mkdir()
        files.fsync_directory(Path(directory))
    return path


def remove_empty_subfolders(directory: Path, kind: Kind) -> None:
    """Remove `kind`'s subfolders of `directory` that hold nothing (emptied by a replaced or finished job); one
    holding anyone's file stays, and a link is never followed."""
    for name in kind.subfolders:
        path = Path(directory) / name
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()


def owned_by_record(kind: Kind, record: Mapping[str, Any]) -> set[str]:
    """The names a sound record makes memscan's: itself, the files and folders it lists (and for a record
    written before records listed everything, the names its stage wrote)."""
    listed = [entry["name"] for entry in entries(kind, record)]
    names = {kind.record, *listed, *_folders(kind, record), *record.get(PENDING, ()), *kind.growing,
             *(name.split("/")[0] for name in listed if "/" in name)}   # a subfolder a listed file lies in
    if "fingerprint" not in record or kind.version_of(record) < kind.signed_since:
        names.update(LEGACY_NAMES.get(kind.name, ()))
    return names


def records(directory: Path) -> dict[Kind, dict[str, Any]]:
    """Every sound memscan record in `directory`, by kind (attached ones included); damaged ones are left out."""
    found: dict[Kind, dict[str, Any]] = {}
    for kind in (*KINDS, *ATTACHED):
        path = Path(directory) / kind.record
        if not path.is_file() or path.is_symlink():
            continue
        try:
            found[kind] = read_record(directory, kind, allow_pending=True)
        except (DataError, InputError):
            continue
    return found


def detect(directory: Path) -> tuple[Kind, dict[str, Any]]:
    """The kind of a memscan folder and its record; one line when it is none (naming a damaged record)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"'{directory}' is not a folder")
    for kind, record in records(directory).items():
        if not kind.attached:
            return kind, record
    for kind in KINDS:   # a record is there but unsound: its reader says why
        if (directory / kind.record).exists() and _format_of(directory / kind.record) in (kind.format, None):
            read_record(directory, kind)
    known = ", ".join(sorted({kind.record for kind in KINDS}))
    raise DataError(f"'{directory}' is not a memscan folder of any kind: it has no record memscan wrote ({known})")


def _format_of(path: Path) -> str | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document.get("format") if isinstance(document, dict) else None


def owned_names(directory: Path) -> set[str]:
    """Every name in `directory` that a sound memscan record there lists, the records and the lock included,
    and every subfolder that is itself a memscan folder (its own record vouches for it)."""
    names = set(files.LOCK_FILES)
    for kind, record in records(directory).items():
        names |= owned_by_record(kind, record)
    for path in Path(directory).iterdir():
        if path.name not in names and path.is_dir() and not path.is_symlink() and _is_memscan_folder(path):
            names.add(path.name)
    return names


def _is_memscan_folder(directory: Path) -> bool:
    return any(not kind.attached for kind in records(directory))


# ---------------------------------------------------------------- writing: claim, then record


@dataclass(frozen=True)
class Claim:
    """What a job found in the folder it holds: its own previous record (None: none), and whether that
    record is this very job's, finished and whole (then there is nothing to do)."""

    previous: dict[str, Any] | None
    done: bool


def claim(directory: Path, kind: Kind, writes: Iterable[str], fingerprint: str, *, overwrite: bool = False,
          allow_other_files: bool = False, flag: str = "--out") -> Claim:
    """Check a folder (held by this job) before `kind`'s stage writes the names `writes` into it.

    Refused in one line: a link at a name the job writes; a folder of another kind (an attached
    kind goes beside any); another job of this kind unless `overwrite`; a file memscan did not
    write at a name the job writes (always); any other such file unless `allow_other_files`.
    """
    directory = Path(directory)
    writes = {kind.record, *writes}
    refuse_links(directory, writes)
    found = records(directory)
    others = [other for other in found if other is not kind and not other.attached]
    if others and not kind.attached:
        raise InputError(f"{flag} '{directory}' holds a memscan {others[0].name} (written by `{others[0].command}`), "
                         f"not a {kind.name}; choose another folder")
    previous = found.get(kind)
    same = previous is not None and previous.get("fingerprint") == fingerprint
    if previous is not None and not same and not overwrite:
        raise InputError(f"{flag} '{directory}' holds another {kind.name} (other settings or inputs); "
                         "pass --overwrite to replace it, or choose another folder")
    owned = owned_names(directory)
    scratch = {files.tmp_path(Path(name)).name for name in writes}
    refuse_in_the_way(directory, writes, owned, flag)
    if not allow_other_files:
        files.refuse_foreign(directory, lambda name: name in owned or name in scratch, flag)
    done = same and PENDING not in previous and not listed_problems(directory, kind, previous)
    return Claim(previous if same or overwrite else None, done)


def refuse_links(directory: Path, names: Iterable[str]) -> None:
    """Refuse a link at any name a job writes, or at its temporary name, before anything is written."""
    for name in sorted(names):
        files.refuse_link(Path(directory) / name)
        files.refuse_link(files.tmp_path(Path(directory) / name))


def refuse_in_the_way(directory: Path, names: Iterable[str], owned: set[str], flag: str = "--out") -> None:
    """Refuse, always, a file memscan did not write (no sound record lists it) at a name the job writes."""
    in_the_way = sorted(name for name in names if os.path.lexists(Path(directory) / name) and name not in owned)
    if in_the_way:
        raise InputError(f"{flag} '{directory}' holds {in_the_way[0]}, which memscan did not write and this job "
                         "would replace; move it or choose another folder")


def write_record(directory: Path, kind: Kind, body: Mapping[str, Any], previous: Mapping[str, Any] | None = None,
                 ) -> dict[str, Any]:
    """Write `kind`'s signed record (last, atomically; not at all where it holds this already), then remove the
    files the previous record of this kind listed and the new one does not: a replaced job leaves no stale file,
    and nothing of anyone else's goes (folders it listed stay: they may hold a user's files)."""
    directory = Path(directory)
    record = files.signed({"format": kind.format, "format_version": kind.version, **body})
    if record != previous or not (directory / kind.record).is_file():
        files.write_json_atomic(directory / kind.record, record)
    if previous is not None:
        stale = owned_by_record(kind, previous) - owned_by_record(kind, record)
        files.remove_owned(directory, sorted(name for name in stale if not (directory / name).is_dir()))
    return record


def begin(directory: Path, kind: Kind, fingerprint: str, writes: Iterable[str],
          previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """Replace `kind`'s record by a pending one before its files are written: it vouches for no file (readers
    say the run is incomplete) but keeps memscan's ownership of what the job writes and what the previous
    record listed, so a job cut short resumes, and its replacement removes what is stale. Returns it."""
    names = set(writes) | (owned_by_record(kind, previous) if previous is not None else set())
    names.discard(kind.record)
    record = files.signed({"format": kind.format, "format_version": kind.version, "fingerprint": fingerprint,
                           PENDING: sorted(names)})
    files.write_json_atomic(Path(directory) / kind.record, record)
    return record


def job_fingerprint(**parts: Any) -> str:
    """The identity of a job: its settings and the records (or their sha256) of what it reads."""
    return files.fingerprint(parts)


def identity(directory: Path) -> str:
    """The sha256 of a memscan folder's record file: what a later stage's fingerprint records of its input."""
    kind, _ = detect(directory)
    return files.sha256_of(Path(directory) / kind.record)
