"""`memscan report FOLDER` for every kind of folder: the kind found from its record (memscan.folders.detect), then
its page; the simple pages (training run, dataset, index) and an experiment's index page live here.

An experiment folder (`memscan run`) gets a page linking each stage folder's page, and those
pages are rendered too; a query run's page draws the saturation folder inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

import memscan.store as store
from memscan import files, folders
from memscan.knn.index import read_info
from memscan.report.assoc import render_assoc
from memscan.report.page import PAGE, Plot, Section, key_values, write_page
from memscan.report.plots import axes, embed, report_files
from memscan.report.run import render
from memscan.report.saturation import render_saturation
from memscan.report.scores import render_scores
from memscan.report.verbatim import render_verbatim
from memscan.train import read_run

Renderer = Callable[..., Any]


def render_folder(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None) -> Path:
    """Write report.html into a memscan folder of any kind (listed in its report.json); returns the page's path.
    `examples`: a table of examples (memscan.show's frame for this kind) shown on the page; None: none."""
    folder = Path(folder)
    kind, _ = folders.detect(folder)
    RENDERERS[kind.name](folder, allow_other_files=allow_other_files, examples=examples)
    return folder / PAGE


def render_training(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None,
                    ) -> list[str]:
    """report.html of a `memscan train` folder: its data, steps and final losses, and the loss curves."""
    folder = Path(folder)
    info = read_run(folder)
    data = info["data"]
    numbers = key_values("the run", [
        ("source", data.get("source")), ("training chunks", data.get("train_chunks")),
        ("held-out chunks", data.get("heldout_chunks")), ("context", data.get("context")),
        ("steps", info.get("steps")), ("checkpoints at", ", ".join(map(str, info.get("checkpoint_steps", [])))),
        ("complete", info.get("complete")), ("final train loss (nats)", info.get("final_train_loss")),
        ("final held-out loss (nats)", info.get("final_heldout_loss"))])
    plots = [Plot("loss curves", embed(_loss_curves(folder, info)))] if _log_entry(info) else []
    return _simple_page(folder, folders.TRAINING, "training run", [Section("Training", (), (numbers,), plots)],
                        allow_other_files, examples)


def _log_entry(info: dict[str, Any]) -> dict[str, Any] | None:
    return next((entry for entry in info.get("files", []) if entry.get("name") == "log.parquet"), None)


def _loss_curves(folder: Path, info: dict[str, Any]) -> Any:
    """Train and held-out loss against the step, from log.parquet (checked against run.json's entry)."""
    log = store.read_table(files.check_file(folder, _log_entry(info), "log")).to_pandas()
    fig, ax = axes(7, 4)
    ax.plot(log.step, log.train_loss, label="train loss")
    heldout = log[log.heldout_loss.notna()]
    ax.plot(heldout.step, heldout.heldout_loss, marker="o", label="held-out loss")
    ax.set(xlabel="step", ylabel="loss (nats)", title="Training")
    ax.legend()
    return fig


def render_dataset(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None,
                   ) -> list[str]:
    """report.html of a `memscan extract` folder: the model, source, sites, layers and counts."""
    folder = Path(folder)
    manifest = store.read_manifest(folder)
    model = manifest.get("model")
    counts = manifest.get("counts", {})
    numbers = key_values("the dataset", [
        ("model", model.get("id") if isinstance(model, dict) else model), ("source", manifest.get("source")),
        ("dimension n", manifest.get("n")), ("layers", manifest.get("layers")),
        ("sites", [site.get("name") for site in manifest.get("sites", [])]), ("positions", manifest.get("positions")),
        ("chunk tokens", manifest.get("chunk_tokens")), ("chunks per split", counts.get("chunks")),
        ("rows per split", counts.get("rows")), ("vectors stored as", manifest.get("vec_dtype")),
        ("complete", manifest.get("complete"))])
    return _simple_page(folder, folders.DATASET, "dataset", [Section("Activations", (), (numbers,))],
                        allow_other_files, examples)


def render_index(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None,
                 ) -> list[str]:
    """report.html of a `memscan index` folder: the factory and why, the vectors, the dataset and the recall."""
    folder = Path(folder)
    info = read_info(folder)
    dataset = info.get("dataset", {})
    numbers = key_values("the index", [
        ("factory", info.get("factory")), ("why", info.get("factory_reason")), ("metric", info.get("metric")),
        ("dimension n", info.get("n")), ("vectors", info.get("ntotal")), ("dataset", dataset.get("path")),
        ("site", dataset.get("site")), ("layer", dataset.get("layer")), ("split", dataset.get("split")),
        ("recall", info.get("recall"))])
    return _simple_page(folder, folders.INDEX, "index", [Section("Index", (), (numbers,))], allow_other_files,
                        examples)


def _simple_page(folder: Path, kind: folders.Kind, title: str, sections: list[Section], allow_other_files: bool,
                 examples: pd.DataFrame | None) -> list[str]:
    """Write a folder page of `kind` through folder.html, listed in the folder's report.json."""
    with files.folder_lock(folder, "FOLDER"), report_files(folder, (PAGE,), allow_other_files) as written:
        written.append(write_page(folder, "folder.html", f"memscan report: {title}", sections, examples,
                                  kind=kind.name, command=kind.command))
    return written


def render_experiment(folder: str | Path, allow_other_files: bool = False, examples: pd.DataFrame | None = None,
                      ) -> list[str]:
    """report.html of a `memscan run` folder: each stage folder's page rendered where it has none newer than
    its record (the stages that draw their own have), then a page linking them, unless every page is current."""
    folder = Path(folder)
    kind, record = folders.detect(folder)
    links, drawn = [], False
    for name in stage_folders(folder, record):
        stage_kind, _ = folders.detect(folder / name)
        if not _page_is_current(folder / name, stage_kind):
            render_folder(folder / name, allow_other_files)
            drawn = True
        links.append((f"{name}: {stage_kind.name} (written by {stage_kind.command})", f"{name}/{PAGE}"))
    if not drawn and examples is None and _page_is_current(folder, kind):
        return []
    stages = record.get("stages") or {}
    section = Section("Stages", (f"Finished stages: {', '.join(stages) or 'none'}.",), (), (), links)
    with files.folder_lock(folder, "FOLDER"), report_files(folder, (PAGE,), allow_other_files) as written:
        written.append(write_page(folder, "experiment.html", "memscan report: experiment", [section], examples))
    return written


def _page_is_current(folder: Path, kind: folders.Kind) -> bool:
    """Whether the folder's page was written after its record (the stage's last job)."""
    page, record = folder / PAGE, folder / kind.record
    return page.is_file() and record.is_file() and page.stat().st_mtime >= record.stat().st_mtime


def stage_folders(folder: Path, record: dict[str, Any]) -> list[str]:
    """The stage (or variant) folders an experiment's record lists; for a record from before it listed them,
    every subfolder holding a memscan folder's record."""
    listed = record.get(folders.EXPERIMENT.folders)
    if isinstance(listed, list):
        return [name for name in listed if (folder / name).is_dir()]
    return sorted(path.name for path in folder.iterdir()
                  if path.is_dir() and not path.is_symlink() and any(not kind.attached for kind in folders.records(path)))


RENDERERS: dict[str, Renderer] = {
    folders.QUERY_RUN.name: render, folders.SCORES.name: render_scores, folders.VERBATIM.name: render_verbatim,
    folders.SATURATION.name: render_saturation, folders.ASSOC.name: render_assoc,
    folders.TRAINING.name: render_training, folders.DATASET.name: render_dataset, folders.INDEX.name: render_index,
    folders.EXPERIMENT.name: render_experiment,
}
