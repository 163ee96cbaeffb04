"""`memscan report`: PNG plots and one offline HTML page from a `memscan query` run folder.

Every value on the page comes from files (summary.json, whose strings a user may have
chosen: split names, paths), so every one is escaped.
"""

from __future__ import annotations

import contextlib
import html
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from memscan import files, folders, store, wording
from memscan.query import RunTables, load

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    own = run.summary.get("site", "hidden")   # runs from before sites hold the residual stream alone
    by_site: dict[str, list[dict[str, Any]]] = {}
    for entry in run.summary["layers"]:
        by_site.setdefault(entry.get("site", "hidden"), []).append(entry)
    last = by_site[own][-1]
    layer, r_star = last["layer"], last["r_star"]
    run = run.at_site(own)

    def save(fig: Any, name: str) -> None:
        names.append(_save(fig, folder / name))

    distances_png, subsets_png, coverage_png, loss_png, depth_png = IMAGES

    h = run.histograms[run.histograms.layer == layer]
    fig, ax = plt.subplots(figsize=(7, 4))
    for table, style in (("query_nearest", "-"), ("pattern_nearest_100", "--")):
        rows = h[h.table == table]
        ax.step(rows.bin_left, rows["count"], where="post", linestyle=style, label=table.replace("_", " "))
    for x, label in ((r_star, "r*"), (2 * r_star, "2r*")):
        ax.axvline(x, color="k", linestyle=":", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", va="top")
    ax.set(xlabel="nearest-neighbour distance", ylabel="count", title=f"Nearest distances, layer {layer}")
    ax.legend()
    save(fig, distances_png)

    fig, ax = plt.subplots(figsize=(7, 4))
    for table in sorted(t for t in h.table.unique() if t.startswith("pattern_nearest_")):
        rows = h[h.table == table]
        ax.step(rows.bin_left, rows["count"], where="post", label=f"{table.rsplit('_', 1)[1]}% of the patterns")
    ax.axvline(2 * r_star, color="k", linestyle=":", linewidth=1)
    ax.set(xlabel="nearest-other distance s_i", ylabel="count", title="Pattern spacing over subsets (the paper's 25-100%)")
    ax.legend()
    save(fig, subsets_png)

    c = run.coverage[run.coverage.layer == layer]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(c.radius, c.coverage)
    ax.axvline(r_star, color="k", linestyle=":", linewidth=1, label="r*")
    ax.axvline(last["typical_radius"], color="r", linestyle="--", linewidth=1, label="typical radius")
    ax.set(xlabel="ball radius", ylabel="fraction of queries covered", ylim=(0, 1.02), title="A2 coverage")
    ax.legend()
    save(fig, coverage_png)

    q = run.queries[(run.queries.layer == layer) & np.isfinite(run.queries.nll)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(q.nearest_dist, q.nll, s=6, alpha=0.5)
    ax.set(xlabel="distance to nearest pattern", ylabel="next-token loss (nats)", title="Distance against loss")
    save(fig, loss_png)

    fig, ax = plt.subplots(figsize=(7, 4))
    for site, entries in by_site.items():
        line, = ax.plot([s["layer"] for s in entries], [s["typical_radius"] for s in entries], marker="o",
                        label=f"typical radius, {site}")
        ax.plot([s["layer"] for s in entries], [s["r_star"] for s in entries], linestyle=":", color=line.get_color(),
                label=f"r*, {site}")
    ax.set(xlabel="layer (hidden) or block (other sites)", ylabel="radius", title="Radius through depth, per site")
    ax.legend(fontsize="small")
    save(fig, depth_png)
    return names


def render_saturation(folder: str | Path, allow_other_files: bool = False) -> list[str]:
    """Plots of a `memscan saturation` folder, listed in its report.json: norm growth with its fits, cosines by
    layer, head spread."""
    from memscan import saturation

    folder = Path(folder)
    with _report_files(folder, saturation.IMAGES, allow_other_files) as written:
        written += _saturation_plots(folder)
    return written


def _saturation_plots(folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memscan import saturation

    summary = saturation.read_summary(folder)  # its tables checked against their sha256
    names = []
    growth = summary["norm_growth"]
    if growth:
        steps, norms = np.array(growth["steps"], float), np.array(growth["norms"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, norms, "o", label="||theta_t||")
        grid = np.linspace(steps.min(), steps.max(), 200)
        for law, fit in growth["fits"].items():
            ax.plot(grid, fit["a"] + fit["b"] * saturation.GROWTH_LAWS[law](grid), label=f"{law}: R^2 {fit['r2']:.3f}")
        ax.set(xlabel="step t", ylabel="parameter norm", title="Norm growth")
        ax.legend()
        names.append(_save(fig, folder / "norm_growth.png"))
    cos = store.read_table(folder / "saturation.parquet").to_pandas()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(cos.layer, cos.cosine, marker="o")
    ax.set(xlabel="layer", ylabel=f"cos(h(theta), h({summary['scale']:g} theta))", ylim=(-1.02, 1.02),
           title="Saturation by layer")
    names.append(_save(fig, folder / "saturation.png"))
    heads = store.read_table(folder / "heads.parquet").to_pandas()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(heads.mean_fraction, bins=20, range=(0, 1))
    ax.set(xlabel="mean share of the causal prefix attended (> 1e-5)", ylabel="heads",
           title="Saturated heads: argmax (left) to uniform (right)")
    names.append(_save(fig, folder / "heads.png"))
    return names


def _save(fig: Any, path: Path) -> str:
    """Save a pyplot figure atomically (a fresh temporary file, then rename) and close it; returns its name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(files.new_tmp(path), dpi=110, format="png")
    files.commit_file(files.tmp_path(path), path)
    plt.close(fig)
    return path.name


@contextlib.contextmanager
def _report_files(folder: Path, names: tuple[str, ...], allow_other_files: bool) -> Iterator[list[str]]:
    """Claim `folder` for a report drawn from its record (memscan.folders.REPORT, beside that record), collect
    the names the block writes, then sign report.json listing them; a report's earlier files not drawn again go."""
    claimed = folders.claim(folder, folders.REPORT, names, folders.identity(folder), overwrite=True,
                            allow_other_files=allow_other_files)
    written: list[str] = []
    yield written
    entries = [files.file_entry(folder / name) for name in written]
    folders.write_record(folder, folders.REPORT, {"fingerprint": folders.identity(folder), "files": entries},
                         claimed.previous)


def render(run_dir: str | Path, comparison: dict[str, Any] | None = None, allow_other_files: bool = False) -> Path:
    """Write the plots and report.html into the run folder (its tables checked first); returns the page's path.

    `comparison` (from `memscan run`: the paper's numbers against the measured ones) is written
    beside them as comparison.json and shown on the page; without it, an earlier one is kept.
    """
    run_dir = Path(run_dir)
    run = load(run_dir)
    with files.folder_lock(run_dir, "RUN_DIR"):
        comparison = comparison or _comparison(run_dir)
        with _report_files(run_dir, (PAGE, COMPARISON, *IMAGES), allow_other_files) as written:
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
    site = entry.get("site", "hidden")
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


def render_assoc(folder: str | Path, allow_other_files: bool = False) -> list[str]:
    """Plots of an assoc sweep folder, listed in its report.json: error against d and against T with
    docs/theory.md's rates, and SGD's q against q_gamma."""
    from memscan import assoc

    folder = Path(folder)
    with _report_files(folder, assoc.IMAGES, allow_other_files) as written:
        written += _assoc_plots(folder)
    return written


def _assoc_plots(folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memscan import assoc

    settings = assoc.read_settings(folder)["settings"]
    table = store.read_table(folder / assoc.SWEEP_TABLE).to_pandas()
    alpha, largest_T, largest_d = settings["alpha"], max(settings["samples"]), max(settings["dims"])
    names = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scheme in ("p", "p_hat", "threshold", "top_seen", "seen"):
        rows = table[(table.scheme == scheme) & ((table["T"] == 0) | (table["T"] == largest_T))]
        if rows.empty:
            continue
        curve = rows.groupby("d").error.mean()
        line, = ax.loglog(curve.index, curve.values, marker="o", label=scheme)
        if scheme in assoc.THEORY_SLOPES and assoc.THEORY_SLOPES[scheme][0] == "d":
            rate = assoc.THEORY_SLOPES[scheme][1](alpha)
            ax.loglog(curve.index, curve.values[0] * (curve.index / curve.index[0]) ** rate, ":", color=line.get_color())
    ax.set(xlabel="memory dimension d", ylabel="population error", title=f"Error against d (T = {largest_T:,}; dotted: theory)")
    ax.legend()
    names.append(_save(fig, folder / "error_vs_d.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d_value, style in ((largest_d, "-"), (min(settings["dims"]), "--")):
        for scheme in ("seen", "p_hat", "top_seen"):
            rows = table[(table.scheme == scheme) & (table.d == d_value)]
            if not rows.empty:
                curve = rows.groupby("T").error.mean()
                ax.loglog(curve.index, curve.values, style, marker="o", label=f"{scheme}, d={d_value}")
    T = np.array(sorted(settings["samples"]), float)
    ax.loglog(T, 0.5 * T ** (-1 + 1 / alpha), "k:", label=f"T^({-1 + 1 / alpha:.2f})")
    ax.set(xlabel="samples T", ylabel="population error", title="Error against T (dashed: overflow at small d)")
    ax.legend(fontsize=8)
    names.append(_save(fig, folder / "error_vs_T.png"))

    q = store.read_table(folder / assoc.Q_TABLE).to_pandas()
    if not q.empty:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for scheme, marker in (("sgd_small", "o"), ("sgd_large", "x")):
            rows = q[(q.scheme == scheme) & (q["T"] == q["T"].max()) & (q.d == q.d.max())]
            ax.scatter(rows["count"], rows.q_measured, s=10, marker=marker, label=f"{scheme}: measured")
            ax.scatter(rows["count"], rows.q_gamma, s=10, marker="_", label=f"{scheme}: q_gamma")
        ax.set(xscale="log", yscale="symlog", xlabel="times the token was seen", ylabel="q(x)",
               title="SGD's learned q against the q_gamma approximation")
        ax.legend(fontsize=8)
        names.append(_save(fig, folder / "sgd_q.png"))
    return names


def _score_run(folder: Path) -> tuple[Any, dict[str, Any]]:
    """A `memscan score` folder's scores table (pyarrow) and metrics, checked against its signed summary."""
    from memscan import score

    summary = folders.read_record(folder, folders.SCORES)
    entries = {entry["name"]: entry for entry in summary["tables"]}
    table = store.read_table(files.check_file(folder, entries[score.SCORES], "table"))
    metrics = files.read_record(files.check_file(folder, entries[score.METRICS], "metrics"), "memscan metrics")
    return table, metrics


def _commit_figure(fig: Any, path: Path) -> str:
    """Save a Figure atomically (a fresh temporary file, then rename); returns the file's name."""
    fig.tight_layout()
    fig.savefig(files.new_tmp(path), dpi=110, format="png", bbox_inches="tight")   # long tick labels stay whole
    files.commit_file(files.tmp_path(path), path)
    return path.name


def render_scores(folder: str | Path, allow_other_files: bool = False) -> list[str]:
    """roc.png and bridge.png of a `memscan score` folder, listed in its report.json; returns their names.

    Called by the score job, which holds the folder; each drawn on a matplotlib Figure of its
    own (no pyplot, no global backend change).
    """
    from memscan import score

    folder = Path(folder)
    table, metrics = _score_run(folder)
    with _report_files(folder, (score.ROC_IMAGE, score.BRIDGE_IMAGE), allow_other_files) as written:
        written += [_roc(folder, table, metrics), _bridge(folder, table, metrics)]
    return written


def _roc(folder: Path, table: Any, metrics: dict[str, Any]) -> str:
    """ROC curves of every rated score, FPR on a log axis as the field plots them, into roc.png."""
    from matplotlib.figure import Figure

    from memscan import membership, score

    labels = np.asarray(table.column("label"))
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    floor = 1.0 / max(1, int((labels == 0).sum()))   # the smallest non-zero FPR these chunks can show
    for name, row in metrics["scores"].items():
        values = np.asarray(table.column(name), np.float64)
        keep = np.isfinite(values)
        fpr, tpr, _ = membership.roc_curve(values[keep], labels[keep])
        ax.step(np.maximum(fpr, floor / 2), tpr, where="post", label=f"{name} (AUC {row['auc']['value']:.3f})")
    grid = np.logspace(np.log10(floor / 2), 0, 50)
    ax.plot(grid, grid, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set(xlabel="false positive rate (non-members called members)", ylabel="true positive rate",
           title="Membership: ROC per score", ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    return _commit_figure(fig, folder / score.ROC_IMAGE)


def bridge_points(table: Any) -> dict[str, Any] | None:
    """What the bridge scatter draws, one entry (m,) per chunk of a scores table; None when it has no x.

    x is the geometry (distance to the nearest other pattern for members, to the nearest
    pattern for held-out chunks: minus the `nearest` score) where the score run had a query
    run, else the verbatim match fraction; y is the loss in nats (minus the `loss` score);
    `extractable` is True where the verbatim run found the whole suffix (False where it did
    not or did not sample the chunk).
    """
    names = set(table.column_names)

    def column(name: str) -> np.ndarray:
        return np.asarray(table.column(name), np.float64)

    if "nearest" in names:
        x, x_label = -column("nearest"), "distance to the nearest (other) training pattern"
    elif "verbatim_match_fraction" in names:
        x, x_label = column("verbatim_match_fraction"), "verbatim match fraction (greedy suffix)"
    else:
        return None
    extractable = column("verbatim_extractable") == 1 if "verbatim_extractable" in names else np.zeros(len(x), bool)
    return {"x": x, "x_label": x_label, "y": -column("loss"), "split": np.asarray(table.column("split")).astype(str),
            "extractable": extractable}


def _bridge_scatter(ax: Any, points: dict[str, Any]) -> None:
    """One view against another on the same chunks: colour = split, filled marker = verbatim-extractable."""
    from memscan import score

    for split, colour in zip(score.SPLITS, ("tab:red", "tab:blue")):
        for filled in (True, False):
            keep = (points["split"] == split) & (points["extractable"] == filled) & np.isfinite(points["x"])
            if keep.any():
                ax.scatter(points["x"][keep], points["y"][keep], s=14, alpha=0.7, edgecolors=colour,
                           facecolors=colour if filled else "none",
                           label=f"{split} ({'member' if split == 'train' else 'non-member'})"
                                 f"{', extractable' if filled else ''}: {int(keep.sum()):,}")
    ax.set(xlabel=points["x_label"], ylabel="loss (mean nll over the chunk, nats)",
           title="The views on the same chunks (filled: verbatim-extractable)")
    ax.legend(fontsize=7)


def _bridge_heatmap(fig: Any, ax: Any, spearman: dict[str, dict[str, float | None]]) -> None:
    """The Spearman matrix of metrics.json's bridge; blank where a pair has no rank correlation."""
    names = list(spearman)
    matrix = np.array([[np.nan if spearman[a].get(b) is None else spearman[a][b] for b in names] for a in names])
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 14:    # beyond that the numbers no longer fit their cells
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title("Spearman rank correlation (scores: larger = member)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)


def _bridge(folder: Path, table: Any, metrics: dict[str, Any]) -> str:
    """The bridge plot into bridge.png. Left, where the run has a geometric or verbatim column: loss against
    nearest-pattern distance (or the verbatim match fraction), coloured by split, filled where the chunk is
    verbatim-extractable. Right: the heatmap of metrics.json's Spearman matrix."""
    from matplotlib.figure import Figure

    from memscan import score

    points = bridge_points(table)
    fig = Figure(figsize=(13, 6.4) if points else (7, 6.4))
    axes = fig.subplots(1, 2 if points else 1, squeeze=False)[0]
    if points:
        _bridge_scatter(axes[0], points)
    _bridge_heatmap(fig, axes[-1], metrics["bridge"]["spearman"])
    return _commit_figure(fig, folder / score.BRIDGE_IMAGE)
