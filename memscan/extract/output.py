"""The dataset folder around an extraction: what a start resumes, replaces or refuses, and what a finished
run removes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memscan import files, folders, store
from memscan.errors import InputError

log = logging.getLogger(__name__)


def prepare_output(out: Path, fingerprints: Sequence[str], overwrite: bool, allow_other_files: bool = False,
                   ) -> tuple[dict[str, Any] | None, list[str]]:
    """(the manifest to resume from, or None for a fresh start in the (existing, locked) folder `out`;
    memscan's files a fresh start removes first, with `clear_output`). A manifest resumes when its
    fingerprint is one of `fingerprints` (this memscan's, then those older ones gave the same dataset).

    memscan's files here come from the manifest (memscan.folders' rule): manifest.json, the
    shards and per-chunk tables it lists, and while it records an extraction in progress the
    exact names that extraction writes next (vectors/part-NNNNN.parquet, chunks/chunks-NNNNN.parquet,
    or flat in a version 1-3 dataset: a shard is whole on disk a moment before the manifest lists
    it); temporary names of those are scratch. Names are relative to `out`, its subfolders
    vectors/ and chunks/ (never links) looked into. A file of that name that no manifest vouches
    for is refused, always; anything else, in `out` or its subfolders, is refused unless
    `allow_other_files`, and is never removed. Another extraction is replaced
    only with `overwrite`. Nothing is removed here: a run refused before it writes (the
    preflight's space check) keeps what it would replace.
    """
    present = _present(out)
    folders.refuse_links(out, [name for name in present if store.is_dataset_file(name)])
    manifest = store.read_manifest(out) if (out / store.MANIFEST).exists() else None
    listed = {entry["name"] for key in ("shards", "chunk_tables") for entry in (manifest or {}).get(key) or []}
    in_progress = manifest is not None and not manifest["complete"]

    def ours(name: str) -> bool:
        if (out / name).is_dir() or not store.is_dataset_file(name):
            return False
        return (name.endswith(files.TMP_SUFFIX) or (name == store.MANIFEST and manifest is not None)
                or name in listed or (in_progress and store.is_dataset_file(name, (), manifest["format_version"])))

    named = [name for name in present if store.is_dataset_file(name) and not (out / name).is_dir()]
    folders.refuse_in_the_way(out, [name for name in named if not name.endswith(files.TMP_SUFFIX)],
                              {name for name in named if ours(name)})
    if not allow_other_files:
        files.refuse_foreign(out, lambda name: ours(name) or name in _subfolders(out))
        for folder in _subfolders(out):
            files.refuse_foreign(out / folder, lambda name, folder=folder: ours(f"{folder}/{name}"))
    if manifest is not None and manifest["fingerprint"] in fingerprints:
        return manifest, []
    if manifest is not None and not overwrite:
        raise InputError(f"--out '{out}' holds another extraction (different settings, model or data); "
                         "choose another folder or pass --overwrite")
    return None, sorted(name for name in present if ours(name))


def _subfolders(out: Path) -> list[str]:
    """The dataset subfolders (vectors/, chunks/) present in `out` as folders (a link there is refused first)."""
    return [name for name in store.SUBFOLDERS if (out / name).is_dir()]


def _present(out: Path) -> list[str]:
    """Every name in `out` and in its dataset subfolders, relative to `out`; a link at a subfolder's name is one
    InputError line (memscan reads and removes nothing through a link)."""
    folders.refuse_links(out, store.SUBFOLDERS)
    names = [p.name for p in out.iterdir()]
    return names + [f"{folder}/{p.name}" for folder in _subfolders(out) for p in (out / folder).iterdir()]


def clear_output(out: Path, replaced: list[str]) -> None:
    """Remove the files `prepare_output` said a fresh start replaces (an old extraction: with a warning).

    An old manifest is first emptied (an extraction in progress that lists nothing): a removal
    cut short leaves no manifest listing missing shards, and what is left stays memscan's.
    """
    if store.MANIFEST in replaced:
        log.warning("--overwrite: removing the extraction in %s", out)
        old = store.read_manifest(out)
        emptied = {key: value for key, value in old.items() if key not in ("counts", "corpus")}
        store.write_manifest(out, {**emptied, "complete": False, "shards": [],
                                   "chunk_tables": None if old["chunk_tables"] is None else []})
    files.remove_owned(out, [name for name in replaced if name != store.MANIFEST])
    folders.remove_empty_subfolders(out, folders.DATASET)


def remove_unlisted(out: Path, manifest: dict[str, Any]) -> None:
    """Remove the shard-named files an extraction in progress owned but its finished manifest does not list
    (left by an earlier, longer start): once the manifest is complete they would be no one's."""
    listed = {entry["name"] for key in ("shards", "chunk_tables") for entry in manifest.get(key) or []}
    files.remove_owned(out, [name for name in _present(out) if store.is_dataset_file(name, (), manifest["format_version"])
                             and not (out / name).is_dir() and name != store.MANIFEST and name not in listed])
    folders.remove_empty_subfolders(out, folders.DATASET)
