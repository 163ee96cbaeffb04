"""The run page, `memscan report`: PNG plots and one offline HTML page from a `memscan query` run folder.

Every value on the page comes from files (summary.json, whose strings a user may have
chosen: split names, paths), so every one is escaped.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import numpy as np

from memscan import files, folders, wording
from memscan.layout import site_of
from memscan.query import RunTables, load
from memscan.report.plots import axes, report_files, save
from memscan.report.saturation import render_saturation

log = logging.getLogger(__name__)

PAGE = "report.html"
IMAGES = ("nearest_distances.png", "subset_histograms.png", "coverage.png", "distance_vs_nll.png",
          "radius_by_layer.png")
SATURATION_DIR = "saturation"   # a `memscan saturation` folder placed in the run folder is drawn too
COMPARISON = "comparison.json"  # `memscan run` of an experiment with [paper] numbers: paper against measured

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


def _get(summary: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a layer's summary (None where a key is missing)."""
    value: Any = summary
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _format(value: Any) -> str:
    """A summary value as escaped HTML text: numbers formatted, the floor with its verdict, anything else as its
    string."""
    if isinstance(value, dict) and "predicted_floor" in value:
        text = wording.floor_text(value)
    elif value is None:
        text = "n/a"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
    else:
        text = str(value)
    return html.escape(text, quote=True)



def _plots(run: RunTables, folder: Path) -> list[str]:
    """The run's figures at the last layer of the site its index holds (the depth figure: every site); their names."""
    own = site_of(run.summary)
    by_site: dict[str, list[dict[str, Any]]] = {}
    for entry in run.summary["layers"]:
        by_site.setdefault(site_of(entry), []).append(entry)
    last = by_site[own][-1]
    run = run.at_site(own)
    distances_png, subsets_png, coverage_png, loss_png, depth_png = IMAGES
    histograms = run.histograms[run.histograms.layer == last["layer"]]
    return [save(_distances_figure(histograms, last), folder / distances_png),
            save(_subsets_figure(histograms, last["r_star"]), folder / subsets_png),
            save(_coverage_figure(run.coverage[run.coverage.layer == last["layer"]], last), folder / coverage_png),
            save(_loss_figure(run.queries[(run.queries.layer == last["layer"]) & np.isfinite(run.queries.nll)]),
                 folder / loss_png),
            save(_depth_figure(by_site), folder / depth_png)]


def _distances_figure(h: Any, last: dict[str, Any]) -> Any:
    """Histograms of the query-to-pattern and pattern-to-pattern nearest distances, with r* and 2r* marked."""
    layer, r_star = last["layer"], last["r_star"]
    fig, ax = axes(7, 4)
    for table, style in (("query_nearest", "-"), ("pattern_nearest_100", "--")):
        rows = h[h.table == table]
        ax.step(rows.bin_left, rows["count"], where="post", linestyle=style, label=table.replace("_", " "))
    for x, label in ((r_star, "r*"), (2 * r_star, "2r*")):
        ax.axvline(x, color="k", linestyle=":", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", va="top")
    ax.set(xlabel="nearest-neighbour distance", ylabel="count", title=f"Nearest distances, layer {layer}")
    ax.legend()
    return fig


def _subsets_figure(h: Any, r_star: float) -> Any:
    """Histograms of the patterns' nearest-other distance s_i over growing subsets of the patterns."""
    fig, ax = axes(7, 4)
    for table in sorted(t for t in h.table.unique() if t.startswith("pattern_nearest_")):
        rows = h[h.table == table]
        ax.step(rows.bin_left, rows["count"], where="post", label=f"{table.rsplit('_', 1)[1]}% of the patterns")
    ax.axvline(2 * r_star, color="k", linestyle=":", linewidth=1)
    ax.set(xlabel="nearest-other distance s_i", ylabel="count", title="Pattern spacing over subsets (the paper's 25-100%)")
    ax.legend()
    return fig


def _coverage_figure(c: Any, last: dict[str, Any]) -> Any:
    """A2: the fraction of queries inside some pattern's ball against the radius, r* and the typical radius marked."""
    fig, ax = axes(7, 4)
    ax.plot(c.radius, c.coverage)
    ax.axvline(last["r_star"], color="k", linestyle=":", linewidth=1, label="r*")
    ax.axvline(last["typical_radius"], color="r", linestyle="--", linewidth=1, label="typical radius")
    ax.set(xlabel="ball radius", ylabel="fraction of queries covered", ylim=(0, 1.02), title="A2 coverage")
    ax.legend()
    return fig


def _loss_figure(q: Any) -> Any:
    """Each query's next-token loss against its distance to the nearest pattern."""
    fig, ax = axes(7, 4)
    ax.scatter(q.nearest_dist, q.nll, s=6, alpha=0.5)
    ax.set(xlabel="distance to nearest pattern", ylabel="next-token loss (nats)", title="Distance against loss")
    return fig


def _depth_figure(by_site: dict[str, list[dict[str, Any]]]) -> Any:
    """The typical radius and r* through depth, one pair of lines per site."""
    fig, ax = axes(7, 4)
    for site, entries in by_site.items():
        line, = ax.plot([s["layer"] for s in entries], [s["typical_radius"] for s in entries], marker="o",
                        label=f"typical radius, {site}")
        ax.plot([s["layer"] for s in entries], [s["r_star"] for s in entries], linestyle=":", color=line.get_color(),
                label=f"r*, {site}")
    ax.set(xlabel="layer (hidden) or block (other sites)", ylabel="radius", title="Radius through depth, per site")
    ax.legend(fontsize="small")
    return fig


def render(run_dir: str | Path, comparison: dict[str, Any] | None = None, allow_other_files: bool = False) -> Path:
    """Write the plots and report.html into the run folder (its tables checked first); returns the page's path.

    `comparison` (from `memscan run`: the paper's numbers against the measured ones) is written
    beside them as comparison.json and shown on the page; without it, an earlier one is kept.
    """
    run_dir = Path(run_dir)
    run = load(run_dir)
    with files.folder_lock(run_dir, "RUN_DIR"):
        comparison = comparison or _comparison(run_dir)
        with report_files(run_dir, (PAGE, COMPARISON, *IMAGES), allow_other_files) as written:
            images = _plots(run, run_dir)
            saturation_dir = run_dir / SATURATION_DIR
            saturation = (render_saturation(saturation_dir, allow_other_files)
                          if (saturation_dir / "summary.json").exists() else [])
            if comparison is not None:
                files.write_json_atomic(run_dir / COMPARISON, comparison)
                written.append(COMPARISON)
            path = run_dir / PAGE
            files.write_text_atomic(path, _page(run.summary, images, [f"{SATURATION_DIR}/{n}" for n in saturation],
                                                comparison))
            written += [*images, PAGE]
    log.info("report: %s", path)
    return path


def _comparison(run_dir: Path) -> dict[str, Any] | None:
    """The comparison.json an earlier report of this run folder wrote (listed in its report.json), or None."""
    path = run_dir / COMPARISON
    if COMPARISON not in folders.owned_names(run_dir):
        return None
    return files.read_record(path, "memscan comparison", {"rows": list})


def _comparison_table(comparison: dict[str, Any] | None) -> str:
    """The paper's numbers and memscan's derivations beside the measured ones, with their ratio, kind and source,
    under the run's scale note ("reduced run: ..."); empty without a comparison."""
    if comparison is None:
        return ""
    def measured(row: dict[str, Any]) -> str:
        if "not_applicable" in row:   # a number whose premises fail is a verdict, not a figure
            return f"not applicable: {_format(row['not_applicable'])}"
        interval = row.get("interval")
        shown = _format(row.get("measured"))
        return f"{shown} [{_format(interval[0])}, {_format(interval[1])}]" if isinstance(interval, list) else shown

    def ratio(row: dict[str, Any]) -> str:
        return f"incomparable: {_format(row['incomparable'])}" if "incomparable" in row else _format(row.get("ratio"))

    rows = "".join(f"<tr><td>{_format(row.get('quantity'))}</td><td>{_format(row.get('kind', 'paper'))}</td>"
                   f"<td>{_format(row.get('paper', row.get('derived')))}</td><td>{measured(row)}</td><td>{ratio(row)}</td>"
                   f"<td class='why'>{_format(row.get('source', 'not given'))}</td></tr>"
                   for row in comparison["rows"] if isinstance(row, dict))
    note = f"<p><b>{_format(comparison['scale_note'])}</b></p>" if comparison.get("scale_note") else ""
    return (f"<h2>Against the paper</h2><p>{_format(comparison.get('reproduces') or comparison.get('experiment'))}"
            f"</p>{note}<table><tr><th>quantity</th><th>kind</th><th>reference</th><th>measured [interval]</th>"
            f"<th>measured / reference</th><th>source</th></tr>{rows}</table>")


def _column_name(entry: dict[str, Any]) -> str:
    """`layer 4` for the residual stream, `attn_out 3` for a site's block (runs before sites: the residual stream)."""
    site = site_of(entry)
    return f"{'layer' if site == 'hidden' else site} {entry['layer']}"


def _page(summary: dict[str, Any], images: list[str], saturation: list[str],
          comparison: dict[str, Any] | None = None) -> str:
    """The HTML page: one row per ROWS entry and one column per layer, the comparison with the paper where
    there is one, then the figures; all text escaped."""
    layers, settings = summary["layers"], summary["settings"]
    header = "".join(f"<th>{_format(_column_name(s))}</th>" for s in layers)
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>{''.join(f'<td>{_format(_get(s, path))}</td>' for s in layers)}"
        f"<td class='why'>{html.escape(why)}</td></tr>" for path, label, why in ROWS)
    figures = "".join(f"<figure><img src='{_format(name)}' alt='{_format(name)}'></figure>" for name in images)
    if saturation:
        figures += "<h2>Norm growth and saturation</h2>" + "".join(
            f"<figure><img src='{_format(name)}' alt='{_format(name)}'></figure>" for name in saturation)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>memscan report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd;
text-align:right}}td:first-child,.why{{text-align:left}}.why{{color:#555;font-size:90%}}img{{max-width:100%}}</style>
</head><body><h1>memscan report</h1>
<p>Index <code>{_format(summary['index'])}</code>, queries <code>{_format(summary['queries'])}</code>
(split <code>{_format(settings['split'])}</code>{', each leaving its own row out' * summary['queries_are_patterns']}),
k = {_format(settings['k'])}, beta = {_format(settings['beta'])}.</p>
<table><tr><th>quantity</th>{header}<th>what it tests</th></tr>{body}</table>
{_comparison_table(comparison)}
{figures}</body></html>"""
