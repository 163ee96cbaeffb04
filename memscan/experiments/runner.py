"""An experiment's stages run in order, each in its own folder, each only where needed (docs/experiments.md).

A run folder holds experiment.toml (the resolved experiment), stages.json (each finished
stage's fingerprint: its resolved settings and the fingerprints of the stages it reads)
and one folder per stage; with variants, one such run folder per variant inside it. A
stage runs where its output is missing or unfinished or its fingerprint changed, through
its own resume and replace paths (training and extraction resume; an index is rebuilt
with --overwrite's swap; a query run's tables are replaced at its commit); a changed stage
changes every stage after it that reads it.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import memscan.query as query
import memscan.store as store
from memscan import assoc, files, folders, saturation, score, train
from memscan.errors import MemscanError
from memscan.experiments import comparison
from memscan.experiments.spec import Experiment, Plan, variant_overrides
from memscan.experiments.tables import FOLDERS, STAGES, build, folder_of
from memscan.experiments.toml_text import dumps
from memscan.extract import extract
from memscan.knn import index
from memscan.layout import site_of
from memscan.report import PAGE, render, render_assoc, render_experiment, render_saturation, render_scores

log = logging.getLogger(__name__)

EXPERIMENT_FILE, STAGES_FILE, COMPARISON_FILE = "experiment.toml", "stages.json", "comparison.json"


@dataclass
class Run:
    """One plan running in its folder, and the records of its stages so far."""

    folder: Path
    plan: Plan
    records: dict[str, Any] = field(default_factory=dict)

    def path(self, stage: str) -> Path:
        return self.folder / folder_of(stage, self.plan)


@dataclass(frozen=True)
class Outcome:
    """What one run did: the stages that ran and those already done, every stage's record, the comparison."""

    variant: str | None
    folder: Path
    ran: list[str]
    kept: list[str]
    records: dict[str, Any]
    comparison: list[dict[str, Any]]


# ---------------------------------------------------------------- the stages


def _train(run: Run) -> dict[str, Any]:
    return train.train(build(run.plan, "train"), run.path("train"), overwrite=True)


def _trained(folder: Path) -> dict[str, Any] | None:
    info = train.read_run(folder)
    return {**info, "final": str(train.final_checkpoint(folder, info["steps"]))} if info["complete"] else None


def _extract(run: Run) -> dict[str, Any]:
    trained = run.records.get("train")
    model = {"model": trained["final"], "max_documents": trained["data"]["documents"]} if trained else {}
    return extract(build(run.plan, "extract", **model), run.path("extract"), overwrite=True)


def _extracted(folder: Path) -> dict[str, Any] | None:
    manifest = store.read_manifest(folder)
    return manifest if manifest["complete"] else None


def _index(run: Run) -> dict[str, Any]:
    return index.build(run.path("extract"), run.path("index"), build(run.plan, "index"), overwrite=True)


def _indexed(folder: Path) -> dict[str, Any]:
    return index.read_info(folder)


def _query(run: Run) -> dict[str, Any]:
    return query.run(run.path("index"), run.path("extract"), run.path("query"), build(run.plan, "query"),
                     overwrite=True)


def _queried(folder: Path) -> dict[str, Any]:
    return query.read_summary(folder)


def _score(run: Run) -> dict[str, Any]:
    query_run = (str(run.path("query")),) if "query" in run.plan else ()
    settings = build(run.plan, "score", data=str(run.path("extract")), query_run=query_run, verbatim=None)
    result = score.score(settings, run.path("score"), overwrite=True)
    render_scores(run.path("score"))
    return result


def _scored(folder: Path) -> dict[str, Any]:
    return folders.read_record(folder, folders.SCORES)


def _saturation(run: Run) -> dict[str, Any]:
    trained = "train" in run.plan
    target = str(run.path("train")) if trained else run.plan["model"]["id"]
    settings = build(run.plan, "saturation", source=None if trained else run.plan["source"]["id"])
    summary = saturation.analyse(target, str(run.path("saturation")), settings, overwrite=True)
    render_saturation(run.path("saturation"))
    return summary


def _saturated(folder: Path) -> dict[str, Any]:
    return saturation.read_summary(folder)


def _assoc(run: Run) -> dict[str, Any]:
    assoc.run_sweep(build(run.plan, "assoc"), str(run.path("assoc")), overwrite=True)
    fitted = assoc.run_fit(str(run.path("assoc")))
    render_assoc(run.path("assoc"))
    return fitted


def _fitted(folder: Path) -> dict[str, Any]:
    assoc.read_settings(folder)
    return assoc.read_fit(folder)


def _report(run: Run) -> str:
    """The comparison beside the query run (where the page shows it), then the page."""
    rows = comparison_rows(run)
    return str(render(run.path("report"), comparison.document(run.plan, rows) if rows else None))


def _reported(folder: Path) -> str | None:
    """The page of a report whose record lists it (a report without one, or damaged, is drawn again)."""
    listed = {entry["name"] for entry in folders.entries(folders.REPORT, folders.read_record(folder, folders.REPORT))}
    return str(folder / PAGE) if PAGE in listed else None


@dataclass(frozen=True)
class Stage:
    """How one stage runs: the plan's tables it reads, the stages whose outputs it reads, how it runs,
    and how its finished output is read back (its record; None or a MemscanError where unfinished)."""

    reads: tuple[str, ...]
    after: tuple[str, ...]
    run: Callable[[Run], Any]
    finished: Callable[[Path], Any]


STAGE_RUNNERS = {
    "train": Stage(("train", "source"), (), _train, _trained),
    "extract": Stage(("extract", "model", "source"), ("train",), _extract, _extracted),
    "index": Stage(("index",), ("extract",), _index, _indexed),
    "query": Stage(("query",), ("extract", "index"), _query, _queried),
    "score": Stage(("score",), ("extract", "query"), _score, _scored),
    "saturation": Stage(("saturation", "model", "source"), ("train",), _saturation, _saturated),
    "assoc": Stage(("assoc",), (), _assoc, _fitted),
    # the report compares every stage's numbers with the paper's
    "report": Stage(("report", "paper", "experiment"), STAGES[:-1], _report, _reported),
}


# ---------------------------------------------------------------- what the stages measured


def measured(run: Run, stage: str) -> Any:
    """The record [paper] keys of a stage name: a query run's last layer, score's metrics.json, else its record."""
    record = run.records.get(stage)
    if stage == "query" and record is not None:   # the last layer of the site the index holds
        own = site_of(record)
        return [entry for entry in record["layers"] if site_of(entry) == own][-1]
    if stage == "score" and record is not None:
        return files.read_record(run.path("score") / score.METRICS, "memscan metrics")
    return record


def comparison_rows(run: Run) -> comparison.Table:
    """The [paper] rows of a run, with its scale (from its stages' records) against the paper's."""
    return comparison.rows(run.plan.get("paper", {}), lambda stage: measured(run, stage))


# ---------------------------------------------------------------- running


def fingerprint(stage: str, plan: Plan, upstream: dict[str, str]) -> str:
    """A stage's identity: the tables it reads, resolved, and the fingerprints of the stages it reads."""
    runner = STAGE_RUNNERS[stage]
    return files.fingerprint({"stage": stage, "tables": {table: plan.get(table) for table in runner.reads},
                              "after": {name: upstream[name] for name in runner.after if name in upstream}})


def run(experiment: Experiment, out: str | Path, overwrite: bool = False,
        allow_other_files: bool = False) -> list[Outcome]:
    """Run (or resume, or find finished) every run of `experiment` in `out`, held for the job.

    Every run folder (`out`, or with variants `out` and one folder per variant) is claimed by the
    folder model's rules (memscan.folders.claim): the same experiment resumes stage by stage,
    another needs `overwrite`, files memscan did not write need `allow_other_files`.
    """
    identity = folders.job_fingerprint(experiment=experiment.name)
    text = resolved_text(experiment)
    with files.job_folder(Path(out)) as folder:
        if not experiment.variants:
            outcomes = [run_plan(folder, experiment.plan, identity, text, overwrite, allow_other_files)]
        else:
            claimed = _claim(folder, identity, overwrite, allow_other_files)
            files.write_text_atomic(folder / EXPERIMENT_FILE, text)
            outcomes = [run_plan(folder / variant, plan, identity, None, overwrite, allow_other_files, variant)
                        for variant, plan in experiment.runs()]
            _write_stages(folder, identity, {}, claimed.previous, [outcome.folder.name for outcome in outcomes])
    render_experiment(folder, allow_other_files)   # once the job's lock is released: the page takes its own
    return outcomes


def run_plan(folder: Path, plan: Plan, identity: str, text: str | None = None, overwrite: bool = False,
             allow_other_files: bool = False, variant: str | None = None) -> Outcome:
    """Each stage of `plan` in order, where its output is missing, unfinished or from other settings;
    stages.json, the folder's record, lists each finished stage's fingerprint."""
    folder.mkdir(exist_ok=True)
    claimed = _claim(folder, identity, overwrite, allow_other_files)
    if text is not None:
        _write_experiment(folder / EXPERIMENT_FILE, text)
    previous = claimed.previous
    recorded = _recorded_stages(previous)
    current = Run(folder, plan)
    fingerprints: dict[str, str] = {}
    ran, kept = [], []
    for stage in (name for name in STAGES if name in plan):
        fingerprints[stage] = fingerprint(stage, plan, fingerprints)
        record = _finished(stage, current) if recorded.get(stage) == fingerprints[stage] else None
        if record is None:
            log.info("%s: running %s", folder, stage)
            recorded.pop(stage, None)
            previous = _write_stages(folder, identity, recorded, previous)
            record = STAGE_RUNNERS[stage].run(current)
            recorded[stage] = fingerprints[stage]
            previous = _write_stages(folder, identity, recorded, previous)
            ran.append(stage)
        else:
            kept.append(stage)
        current.records[stage] = record
    rows = comparison_rows(current)
    if rows:
        _write_comparison(folder / COMPARISON_FILE, comparison.document(plan, rows))
    _write_stages(folder, identity, recorded, previous, with_comparison=bool(rows))
    return Outcome(variant, folder, ran, kept, current.records, rows)


def _finished(stage: str, current: Run) -> Any:
    """The stage's record where its folder holds a finished output, else None (it runs again)."""
    try:
        return STAGE_RUNNERS[stage].finished(current.path(stage))
    except MemscanError as exc:
        log.info("%s: %s runs again (%s)", current.folder, stage, files.first_line(exc))
        return None


# ---------------------------------------------------------------- the run folder's own files


def resolved_text(experiment: Experiment) -> str:
    """experiment.toml: the resolved plan, and each variant as the keys where it differs from it."""
    document: dict[str, Any] = dict(experiment.plan)
    if experiment.variants:
        document["variant"] = {name: variant_overrides(experiment.plan, plan, experiment.file, name)
                               for name, plan in experiment.variants.items()}
    sets = "".join(f" --set {item}" for item in experiment.sets)
    header = (f"memscan experiment '{experiment.name}', resolved from {experiment.file}{sets}: every default\n"
              "written out. `memscan run THIS-FILE --out DIR` finds DIR's finished stages done, and runs them\n"
              "all again in a new folder.")
    return dumps(document, header)


def _claim(folder: Path, identity: str, overwrite: bool, allow_other_files: bool) -> folders.Claim:
    """Claim a run folder for this experiment: another experiment's needs `overwrite`."""
    return folders.claim(folder, folders.EXPERIMENT, (EXPERIMENT_FILE, COMPARISON_FILE), identity,
                         overwrite=overwrite, allow_other_files=allow_other_files)


def _recorded_stages(record: dict[str, Any] | None) -> dict[str, str]:
    """The finished stages' fingerprints in a run folder's record (none without one: each is checked by running)."""
    stages = (record or {}).get("stages")
    return {name: value for name, value in stages.items() if isinstance(value, str)} if isinstance(stages, dict) else {}


def _write_stages(folder: Path, identity: str, recorded: dict[str, str], previous: dict[str, Any] | None,
                  subfolders: list[str] | None = None, with_comparison: bool | None = None) -> dict[str, Any]:
    """stages.json, the run folder's signed record: the finished stages, experiment.toml and comparison.json
    (kept as the previous record had it unless `with_comparison` says), the stage or variant folders."""
    if with_comparison is None:
        with_comparison = COMPARISON_FILE in folders.owned_names(folder)
    names = [EXPERIMENT_FILE, *([COMPARISON_FILE] if with_comparison else [])]
    owned = subfolders if subfolders is not None else [
        name for name in sorted(set(FOLDERS.values())) if (folder / name).is_dir()]
    return folders.write_record(folder, folders.EXPERIMENT, {
        "fingerprint": identity, "stages": dict(recorded),
        "files": [files.file_entry(folder / name) for name in names if (folder / name).is_file()],
        "folders": owned}, previous)


def _write_comparison(path: Path, document: dict[str, Any]) -> None:
    """comparison.json, unless it already holds this document (a rerun that changes nothing leaves it)."""
    try:
        if json.loads(path.read_text()) == document:
            return
    except (OSError, ValueError):
        pass
    files.write_json_atomic(path, document)


def _write_experiment(path: Path, text: str) -> None:
    """experiment.toml, unless it already holds this experiment (its header, which names where it was
    resolved from, stays that of the run that first wrote it)."""
    try:
        if tomllib.loads(path.read_text()) == tomllib.loads(text):
            return
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass
    files.write_text_atomic(path, text)
