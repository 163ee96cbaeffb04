"""The run page, `memscan report RUN`: one self-contained report.html for a `memscan query` run folder.

The page gives, per site, a verdict per assumption and layer (memscan.report.verdicts), the
summary's numbers (ROWS) in tables of at most LAYERS_PER_TABLE layers, the comparison with the
paper where `memscan run` made one, and the figures (memscan.report.run_plots), embedded.
Every value comes from files a user may have chosen (split names, paths), so the templates escape it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan import files, folders, show
from memscan.layout import SiteKey, site_of
from memscan.query import RunTables, load
from memscan.report import run_plots
from memscan.report.page import PAGE, Plot, Section, Table, cell, fragment, write_page
from memscan.report.plots import embed, report_files
from memscan.report.saturation import render_saturation, saturation_section
from memscan.report.verdicts import THRESHOLDS, value_at, verdicts

log = logging.getLogger(__name__)

SATURATION_DIR = "saturation"   # a `memscan saturation` folder placed in the run folder is drawn too
COMPARISON = "comparison.json"  # `memscan run` of an experiment with [paper] numbers: paper against measured
LAYERS_PER_TABLE = 6            # columns of layers a table holds and still fits a 1280 px page

# (path in a layer's summary, label, what it tests): one row of the page each.
ROWS: list[tuple[str, str, str]] = [
    ("d", "patterns d", "stored (training) activations searched"),
    ("d_prime", "queries d'", "held-out activations put to them"),
    ("n", "dimension n", "width of the activations"),
    ("search", "search", "exact, or the approximate index and its parameters"),
    ("recall.recall_1_at_1", "1-recall@1", "how often the approximate search found the true nearest pattern"),
    ("query_nearest_dist.median", "median query-to-pattern distance", "how far held-out activations sit from training ones"),
    ("pattern_nearest_dist.median", "median pattern-to-pattern distance s_i", "how far apart stored patterns are"),
    ("r_star", "r* = sqrt(n / 2 pi e)", "radius of the unit-volume ball, the theory's reference scale"),
    ("typical_radius", "typical radius (median s_i / 2)", "the largest common radius at which the median pattern's ball is disjoint"),
    ("typical_over_r_star", "typical radius / r*", "above 1: balls are larger than the unit-volume ball (the paper: about 10 / 7.74)"),
    ("A2.coverage_at_r_star", "A2 coverage at r*", "held-out activations inside some training ball of radius r*"),
    ("A2.coverage_at_typical", "A2 coverage at the typical radius", "held-out activations inside some training ball of the typical radius"),
    ("A3.disjoint_at_r_star", "A3 disjoint at r*", "patterns whose ball of radius r* meets no other (s_i > 2 r*)"),
    ("A3.ramsauer_well_separated", "A3 Ramsauer-separated", "patterns with Delta_i above Ramsauer's threshold for a fixed point"),
    ("A1.retrieval_rate", "A1 retrieval rate", "queries the update carries to within epsilon of their nearest pattern"),
    ("A1.next_token_agreement", "A1 next-token agreement", "queries whose nearest pattern predicts the same next token"),
    ("A1.train_loss", "train loss (nats)", "model's next-token loss on the patterns"),
    ("A1.test_loss", "held-out loss (nats)", "model's next-token loss on the queries"),
    ("floor", "predicted floor log Z + 1/Z", "Proposition 4's cross-entropy floor (at least 1 nat), where its premises hold"),
    ("floor.top_1pct_share", "share of Z_t in the top 1% of patterns", "above 50%: a few outlying patterns set the floor"),
    ("floor.at_unit_scale.log_z", "log Z_t at the unit scale", "Eq. 13 with the activations scaled so the typical radius is r* (Z_t is not scale-invariant)"),
    ("floor.radius_rules.r_star.log_z", "log Z_t with the common radius r*", "Eq. 13 with every ball of radius r* (the paper's rule)"),
    ("size.N_over_D2", "N / D^2", "size condition: Z_t = 1 needs N = O(D^2) (paper: ~8.6e-10)"),
]


def render(run_dir: str | Path, comparison: dict[str, Any] | None = None, allow_other_files: bool = False,
           examples: pd.DataFrame | None = None) -> Path:
    """Write report.html into the run folder (its tables checked first; a saturation folder inside drawn too);
    returns the page's path.

    `comparison` (from `memscan run`: the paper's numbers against the measured ones) is written
    beside it as comparison.json and shown on the page; without it, an earlier one is kept.
    `examples`: queries with their nearest training text (memscan.show), shown as a table; None: `show.for_page`'s,
    an empty frame: none.
    """
    run_dir = Path(run_dir)
    run = load(run_dir)
    examples = show.for_page(run_dir) if examples is None else examples
    with files.folder_lock(run_dir, "RUN_DIR"):
        comparison = comparison or _comparison(run_dir)
        with report_files(run_dir, (PAGE, COMPARISON), allow_other_files) as written:
            sections = [*verdict_sections(run.summary), *number_sections(run.summary)]
            if comparison is not None:
                files.write_json_atomic(run_dir / COMPARISON, comparison)
                written.append(COMPARISON)
                sections.append(_comparison_section(comparison))
            sections += _figure_sections(run)
            saturation_dir = run_dir / SATURATION_DIR
            if (saturation_dir / "summary.json").exists():
                render_saturation(saturation_dir, allow_other_files)
                sections.append(saturation_section(saturation_dir, f"{SATURATION_DIR}/{PAGE}"))
            written.append(write_page(run_dir, "run.html", "memscan report: query run", sections, examples,
                                      summary=run.summary))
    log.info("report: %s", run_dir / PAGE)
    return run_dir / PAGE


def by_site(summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The summary's layer entries grouped by site, in the summary's order (runs before sites: one, hidden)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for entry in summary["layers"]:
        grouped.setdefault(site_of(entry), []).append(entry)
    return grouped


def verdict_sections(summary: dict[str, Any]) -> list[Section]:
    """The thresholds with their reasons, then one verdict table per site: a row per layer, a column per
    assumption and one for the floor's premises."""
    thresholds = Table("What each assumption is held to", ("assumption", "number", "holds at", "reason"),
                       [(t.assumption, f"{t.path}: {t.measures}", f"\N{GREATER-THAN OR EQUAL TO} {t.least:.0%}",
                         t.reason) for t in THRESHOLDS])
    header = ("layer", *(t.assumption for t in THRESHOLDS), "floor (Proposition 4)")
    tables = [Table(f"Verdicts, site {site}", header,
                    [(_column_name(entry), *(v.text for v in verdicts(entry))) for entry in entries])
              for site, entries in by_site(summary).items()]
    return [Section("Verdicts", ("Each assumption's number at each layer against the threshold it is held to; "
                                 "a number whose premises fail is not judged.",), (thresholds, *tables))]


def number_sections(summary: dict[str, Any]) -> list[Section]:
    """One section per site: the ROWS quantities down, at most LAYERS_PER_TABLE layers across per table."""
    sections = []
    for site, entries in by_site(summary).items():
        tables = []
        for start in range(0, len(entries), LAYERS_PER_TABLE):
            part = entries[start:start + LAYERS_PER_TABLE]
            header = ("quantity", *(_column_name(entry) for entry in part), "what it tests")
            rows = [(label, *(cell(value_at(entry, path)) for entry in part), why) for path, label, why in ROWS]
            tables.append(Table(f"Site {site}, layers {part[0]['layer']} to {part[-1]['layer']}", header, rows))
        sections.append(Section(f"Numbers, site {site}", (), tables))
    return sections


def _figure_sections(run: RunTables) -> list[Section]:
    """Per site, each layer's distance CDFs; the loss against distance at the last layer of the index's site;
    the radius through depth."""
    grouped = by_site(run.summary)
    sections = []
    for site, entries in grouped.items():
        tables = run.at_site(site)
        plots = [Plot(f"{_column_name(entry)}: nearest-distance CDFs",
                      embed(run_plots.distances_figure(tables.histograms[tables.histograms.layer == entry["layer"]],
                                                       entry, _column_name(entry))))
                 for entry in entries]
        sections.append(Section(f"Distances, site {site}", (), (), plots))
    own = site_of(run.summary)
    last = grouped[own][-1]
    queries = run.at_site(own).queries
    queries = queries[(queries.layer == last["layer"]) & np.isfinite(queries.nll)]
    plots = [Plot("loss against distance", embed(run_plots.loss_figure(queries, _column_name(last)))),
             Plot("radius through depth", embed(run_plots.depth_figure(grouped)))]
    return [*sections, Section("Loss and depth", (), (), plots)]


def _comparison(run_dir: Path) -> dict[str, Any] | None:
    """The comparison.json an earlier report of this run folder wrote (listed in its report.json), or None."""
    path = run_dir / COMPARISON
    if COMPARISON not in folders.owned_names(run_dir) or not path.is_file():
        return None
    return files.read_record(path, "memscan comparison", {"rows": list})


def _comparison_section(comparison: dict[str, Any]) -> Section:
    """The paper's numbers and memscan's derivations beside the measured ones, with their ratio, kind and source,
    under the run's scale note ("reduced run: ...")."""
    def measured(row: dict[str, Any]) -> str:
        if "not_applicable" in row:   # a number whose premises fail is a verdict, not a figure
            return f"not applicable: {cell(row['not_applicable'])}"
        bounds = row.get("interval")
        shown = cell(row.get("measured"))
        return f"{shown} [{cell(bounds[0])}, {cell(bounds[1])}]" if isinstance(bounds, list) else shown

    def ratio(row: dict[str, Any]) -> str:
        return f"incomparable: {cell(row['incomparable'])}" if "incomparable" in row else cell(row.get("ratio"))

    rows = [(cell(row.get("quantity")), cell(row.get("kind", "paper")), cell(row.get("paper", row.get("derived"))),
             measured(row), ratio(row), cell(row.get("source", "not given")))
            for row in comparison["rows"] if isinstance(row, dict)]
    notes = [cell(comparison.get("reproduces") or comparison.get("experiment"))]
    notes += [cell(comparison["scale_note"])] if comparison.get("scale_note") else []
    table = Table("paper against measured", ("quantity", "kind", "reference", "measured [interval]",
                                             "measured / reference", "source"), rows)
    return Section("Against the paper", notes, (table,))


def _comparison_table(comparison: dict[str, Any] | None) -> str:
    """The comparison section as HTML, escaped as on the page; empty without a comparison."""
    return "" if comparison is None else fragment("section.html", section=_comparison_section(comparison))


def _column_name(entry: dict[str, Any]) -> str:
    """`layer 4` for the residual stream, `attn_out 3` for a site's block (runs before sites: the residual stream)."""
    return SiteKey(site_of(entry), entry["layer"]).label()
