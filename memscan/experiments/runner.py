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

import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memscan import files
from memscan.errors import DataError, InputError, MemscanError
from memscan.experiments import comparison
from memscan.experiments.spec import Experiment, Plan, variant_overrides
from memscan.experiments.tables import FOLDERS, STAGES, build, folder_of
from memscan.experiments.toml_text import dumps

log = logging.getLogger(__name__)

EXPERIMENT_FILE, STAGES_FILE, COMPARISON_FILE = "experiment.toml", "stages.json", "comparison.json"
STAGES_FORMAT = "memscan.stages"


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
    from memscan import train

    return train.train(build(run.plan, "train"), run.path("train"), overwrite=True)


def _trained(folder: Path) -> dict[str, Any] | None:
    from memscan import train

    info = train.read_run(folder)
    return {**info, "final": str(train.final_checkpoint(folder, info["steps"]))} if info["complete"] else None


def _extract(run: Run) -> dict[str, Any]:
    from memscan.extract import extract

    trained = run.records.get("train")
    model = {"model": trained["final"], "max_documents": trained["data"]["documents"]} if trained else {}
    return extract(build(run.plan, "extract", **model), run.path("extract"), overwrite=True)


def _extracted(folder: Path) -> dict[str, Any] | None:
    from memscan import store

    manifest = store.read_manifest(folder)
    return manifest if manifest["complete"] else None


def _index(run: Run) -> dict[str, Any]:
    from memscan.knn import index

    return index.build(run.path("extract"), run.path("index"), build(run.plan, "index"), overwrite=True)


def _indexed(folder: Path) -> dict[str, Any]:
    from memscan.knn import index

    return index.read_info(folder)


def _query(run: Run) -> dict[str, Any]:
    from memscan import query

    return query.run(run.path("index"), run.path("extract"), run.path("query"), build(run.plan, "query"))


def _queried(folder: Path) -> dict[str, Any]:
    from memscan import query

    return query.read_summary(folder)


def _score(run: Run) -> dict[str, Any]:
    from memscan import score

    query_run = (str(run.path("query")),) if "query" in run.plan else ()
    settings = build(run.plan, "score", data=str(run.path("extract")), query_run=query_run, verbatim=None)
    return score.score(settings, run.path("score"))


def _scored(folder: Path) -> dict[str, Any]:
    from memscan import score

    summary = files.read_record(folder / score.SUMMARY, "memscan score run", {"tables": list})
    files.check_signature(summary, folder / score.SUMMARY)
    return summary


def _saturation(run: Run) -> dict[str, Any]:
    from memscan import report, saturation

    trained = "train" in run.plan
    target = str(run.path("train")) if trained else run.plan["model"]["id"]
    settings = build(run.plan, "saturation", source=None if trained else run.plan["source"]["id"])
    summary = saturation.analyse(target, str(run.path("saturation")), settings)
    report.render_saturation(run.path("saturation"))
    return summary


def _saturated(folder: Path) -> dict[str, Any]:
    from memscan import saturation

    return saturation.read_summary(folder)


def _assoc(run: Run) -> dict[str, Any]:
    from memscan import assoc, report

    assoc.run_sweep(build(run.plan, "assoc"), str(run.path("assoc")))
    fitted = assoc.run_fit(str(run.path("assoc")))
    report.render_assoc(run.path("assoc"))
    return fitted


def _fitted(folder: Path) -> dict[str, Any]:
    from memscan import assoc

    assoc.read_settings(folder)
    return files.read_record(folder / assoc.FIT_FILE, "`memscan assoc fit`")


def _report(run: Run) -> str:
    """The comparison beside the query run (where the page shows it), then the page."""
    from memscan import report

    folder = run.path("report")
    _write_comparison(folder / report.COMPARISON, run.plan, comparison_rows(run))
    return str(report.render(folder))


def _reported(folder: Path) -> str | None:
    from memscan import report

    return str(folder / report.PAGE) if (folder / report.PAGE).is_file() else None


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
        own = record.get("site", "hidden")
        return [entry for entry in record["layers"] if entry.get("site", "hidden") == own][-1]
    if stage == "score" and record is not None:
        from memscan import score

        return files.read_record(run.path("score") / score.METRICS, "memscan metrics")
    return record


def comparison_rows(run: Run) -> list[dict[str, Any]]:
    return comparison.rows(run.plan.get("paper", {}), lambda stage: measured(run, stage))


# ---------------------------------------------------------------- running


def fingerprint(stage: str, plan: Plan, upstream: dict[str, str]) -> str:
    """A stage's identity: the tables it reads, resolved, and the fingerprints of the stages it reads."""
    runner = STAGE_RUNNERS[stage]
    return files.fingerprint({"stage": stage, "tables": {table: plan.get(table) for table in runner.reads},
                              "after": {name: upstream[name] for name in runner.after if name in upstream}})


def run(experiment: Experiment, out: str | Path, allow_other_files: bool = False) -> list[Outcome]:
    """Run (or resume, or find finished) every run of `experiment` in `out`, held for the job."""
    with files.job_folder(Path(out)) as folder:
        _claim(folder, experiment, allow_other_files)
        _write_experiment(folder / EXPERIMENT_FILE, resolved_text(experiment))
        return [run_plan(folder / variant if variant else folder, plan, allow_other_files, variant)
                for variant, plan in experiment.runs()]


def run_plan(folder: Path, plan: Plan, allow_other_files: bool = False, variant: str | None = None) -> Outcome:
    """Each stage of `plan` in order, where its output is missing, unfinished or from other settings."""
    folder.mkdir(exist_ok=True)
    if not allow_other_files:
        files.refuse_foreign(folder, _owned(folder))
    recorded = _read_stages(folder)
    current = Run(folder, plan)
    fingerprints: dict[str, str] = {}
    ran, kept = [], []
    for stage in (name for name in STAGES if name in plan):
        fingerprints[stage] = fingerprint(stage, plan, fingerprints)
        record = _finished(stage, current) if recorded.get(stage) == fingerprints[stage] else None
        if record is None:
            log.info("%s: running %s", folder, stage)
            recorded.pop(stage, None)
            _write_stages(folder, recorded)
            record = STAGE_RUNNERS[stage].run(current)
            recorded[stage] = fingerprints[stage]
            _write_stages(folder, recorded)
            ran.append(stage)
        else:
            kept.append(stage)
        current.records[stage] = record
    rows = comparison_rows(current)
    _write_comparison(folder / COMPARISON_FILE, plan, rows)
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


def _claim(folder: Path, experiment: Experiment, allow_other_files: bool) -> None:
    """Refuse a folder that holds another experiment, or files memscan did not write."""
    path = folder / EXPERIMENT_FILE
    if path.exists():
        try:
            held = tomllib.loads(path.read_text()).get("experiment", {}).get("name")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, AttributeError):
            raise DataError(f"{path} is not an experiment memscan wrote; choose another --out") from None
        if held != experiment.name:
            raise InputError(f"--out '{folder}' holds the experiment '{held}', not '{experiment.name}'; "
                             "choose another folder")
    if not allow_other_files:
        files.refuse_foreign(folder, _owned(folder))


def _owned(folder: Path) -> Callable[[str], bool]:
    """Names memscan writes in a run folder: its records, the stages' folders, variants' run folders."""
    own = files.owned_by((EXPERIMENT_FILE, STAGES_FILE, COMPARISON_FILE, *FOLDERS.values()))
    return lambda name: own(name) or (folder / name / STAGES_FILE).is_file()


def _read_stages(folder: Path) -> dict[str, str]:
    """stages.json's fingerprints; a missing or damaged one is no stage done (each is then checked by running)."""
    path = folder / STAGES_FILE
    if not path.exists():
        return {}
    try:
        stages = files.read_record(path, "memscan stages", {"stages": dict})["stages"]
    except DataError as exc:
        log.warning("%s; every stage runs again", files.first_line(exc))
        return {}
    return {name: value for name, value in stages.items() if isinstance(value, str)}


def _write_stages(folder: Path, recorded: dict[str, str]) -> None:
    _write_json_if_changed(folder / STAGES_FILE, {"format": STAGES_FORMAT, "format_version": 1,
                                                  "stages": dict(recorded)})


def _write_comparison(path: Path, plan: Plan, rows: list[dict[str, Any]]) -> None:
    """comparison.json where the plan has [paper] numbers; an old one goes where it has none."""
    if rows:
        _write_json_if_changed(path, comparison.document(plan, rows))
    else:
        files.remove_owned(path.parent, [path.name])


def _write_json_if_changed(path: Path, document: dict[str, Any]) -> None:
    """Write a record atomically unless it already holds exactly this (a rerun that changes nothing leaves it)."""
    import json

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
    files.tmp_path(path).write_text(text)
    files.commit_file(files.tmp_path(path), path)
