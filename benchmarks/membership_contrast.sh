#!/usr/bin/env bash
# Issue 13's demonstration where the answer is known: the same small GPT-2 trained on the
# Question-Formation language twice, once on a tiny budget for many epochs (it over-fits:
# training loss near 0) and once on a larger budget for one epoch (it does not). Each is
# extracted on exactly its training run's members and held-out chunks, tested for verbatim
# extraction, indexed and queried (the geometry), and scored; the script ends with one
# table: losses, every score's AUC and TPR at 1% FPR with bootstrap 95% intervals, the
# verbatim rates per split and the bridge's Spearman correlations. With --views, each model is
# also extracted at every layer of the residual stream and of resid_post and mlp_out, at the
# positions given, and scored with `--geometry views` (issue 21): a second table gives every
# view's AUC per aggregation beside the loss AUC, and the best view after the Holm correction.
#
#   bash benchmarks/membership_contrast.sh --out DIR [--small] [--views POSITIONS] [--device auto|cpu|cuda] [--memscan PATH]
#
#   --out DIR       work folder (made; one sub-folder per model and stage)
#   --small         a smoke test in about a minute of CPU: fewer epochs and tokens (no over-fitting expected)
#   --views P       also score every (site, layer) view at positions P (all | every:K); the kNN is quadratic
#                   in rows: all positions of the general model take tens of minutes on 2 cores, every:4 a few
#   --device D      passed to every stage [auto]
#   --memscan PATH  the memscan executable [.venv/bin/memscan of this repository]
#
# Full size without --views takes about 10 minutes on 2 CPU cores (the over-fit training is most of it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=""
SMALL=0
DEVICE=auto
VIEWS=""
MEMSCAN="$ROOT/.venv/bin/memscan"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --small) SMALL=1 ;;
        --device) DEVICE=${2:?--device needs a value}; shift ;;
        --memscan) MEMSCAN=${2:?--memscan needs a path}; shift ;;
        --views) VIEWS=${2:?--views needs positions (all or every:K)}; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "membership_contrast: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$OUT" ] || { echo "membership_contrast: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=$(dirname "$MEMSCAN")/python

# One architecture for both: 2 layers, 64 wide, 4 heads, 64-token context.
ARCH=(--source qf --n-layer 2 --n-embd 64 --n-head 4 --context 64 --batch-size 16 --lr 3e-3 --dtype fp32 --seed 0)
if [ "$SMALL" = 1 ]; then
    OVERFIT=(--tokens 1500 --test-fraction 0.5 --epochs 10)
    GENERAL=(--tokens 12000 --test-fraction 0.2 --epochs 1)
    VERBATIM_CHUNKS=50
else
    OVERFIT=(--tokens 4000 --test-fraction 0.5 --epochs 150)     # 69 train, 24 held-out chunks, 750 steps
    GENERAL=(--tokens 300000 --test-fraction 0.1 --epochs 1)     # 4,693 train, 661 held-out chunks, 294 steps
    VERBATIM_CHUNKS=500
fi

# The extract arguments that reproduce a training run's split exactly, from its run.json.
extract_args() {
    "$PYTHON" -c '
import json, sys
run = json.load(open(sys.argv[1]))
data = run["data"]
print(run["final"], data["documents"], data["context"], data["test_fraction"], data["seed"])' "$1/run.json"
}

run_model() {
    local name=$1
    shift
    local dir="$OUT/$name"
    echo "== $name: train"
    "$MEMSCAN" train "${ARCH[@]}" "$@" --device "$DEVICE" --out "$dir/run" | tail -n 3
    local model docs context fraction seed
    read -r model docs context fraction seed < <(extract_args "$dir/run")
    echo "== $name: extract, verbatim, index, query, score (each folder's report.html beside)"
    "$MEMSCAN" extract --model "$model" --source qf --max-documents "$docs" --chunk-tokens "$context" \
        --test-fraction "$fraction" --seed "$seed" --positions last --layers last --dtype fp32 --device "$DEVICE" \
        --out "$dir/data" | tail -n 2
    "$MEMSCAN" verbatim "$dir/data" --out "$dir/verbatim" --per-split "$VERBATIM_CHUNKS" \
        --prompt-tokens 32 --suffix-tokens 16 --device "$DEVICE" | tail -n 2
    "$MEMSCAN" index "$dir/data" --out "$dir/index" --split train --factory Flat --device cpu | tail -n 1
    "$MEMSCAN" query "$dir/index" --queries "$dir/data" --split test --radius typical --device cpu \
        --out "$dir/query" | tail -n 2
    "$MEMSCAN" report "$dir/query" > /dev/null
    "$MEMSCAN" score "$dir/data" --out "$dir/score" --verbatim "$dir/verbatim" --query-run "$dir/query" \
        --device "$DEVICE" > /dev/null
    [ -z "$VIEWS" ] && return
    echo "== $name: views at positions $VIEWS: extract, score --geometry views"
    local views="$dir/views-${VIEWS//:/-}"
    "$MEMSCAN" extract --model "$model" --source qf --max-documents "$docs" --chunk-tokens "$context" \
        --test-fraction "$fraction" --seed "$seed" --positions "$VIEWS" --layers all \
        --sites resid_post:all,mlp_out:all --dtype fp32 --device "$DEVICE" --out "$views/data" | tail -n 2
    "$MEMSCAN" score "$views/data" --out "$views/score" --geometry views --device "$DEVICE" > /dev/null
}

run_model overfit "${OVERFIT[@]}"
run_model general "${GENERAL[@]}"

echo
"$PYTHON" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
models = ("overfit", "general")
read = lambda name, path: json.loads((out / name / path).read_text())  # noqa: E731


def interval(entry):
    return "n/a" if entry is None or entry["value"] is None else \
        f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def number(value):
    return "n/a" if value is None else f"{value:+.3f}"


rows = [("", *models)]
runs = {m: read(m, "run/run.json") for m in models}
rows.append(("train chunks / held-out chunks", *(f"{runs[m]['data']['train_chunks']:,} / {runs[m]['data']['heldout_chunks']:,}" for m in models)))
rows.append(("final train loss", *(f"{runs[m]['final_train_loss']:.3f}" for m in models)))
rows.append(("final held-out loss", *(f"{runs[m]['final_heldout_loss']:.3f}" for m in models)))
metrics = {m: read(m, "score/metrics.json") for m in models}
names = list(dict.fromkeys(n for m in models for n in (*metrics[m]["scores"], *metrics[m]["skipped"])))
for name in names:
    for key, label in (("auc", "AUC"), ("tpr@1%fpr", "TPR@1%FPR")):
        rows.append((f"{name} {label}", *(interval(metrics[m]["scores"][name][key]) if name in metrics[m]["scores"]
                                          else "not rated: " + metrics[m]["skipped"].get(name, "absent")
                                          for m in models)))
verbatim = {m: read(m, "verbatim/summary.json")["splits"] for m in models}
for split in ("train", "test"):
    for key in ("match_fraction", "extractable_rate"):
        rows.append((f"verbatim {key} ({split})", *(interval(verbatim[m][split][key]) for m in models)))
# Spearman between scores oriented larger = member: nearest = -distance, loss = -nll.
for a, b in (("nearest", "loss"), ("nearest", "verbatim_match_fraction"), ("retrieved", "loss"),
             ("retrieved", "verbatim_match_fraction"), ("loss", "verbatim_match_fraction")):
    rows.append((f"spearman {a} ~ {b}", *(number(metrics[m]["bridge"]["spearman"].get(a, {}).get(b)) for m in models)))
widths = [max(len(row[i]) for row in rows) for i in range(3)]
for row in rows:
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
EOF
[ -z "$VIEWS" ] && exit 0

echo
"$PYTHON" - "$OUT" "views-${VIEWS//:/-}" <<'EOF'
import json
import sys
from pathlib import Path

out, folder = Path(sys.argv[1]), sys.argv[2]
models = ("overfit", "general")
metrics = {m: json.loads((out / m / folder / "score" / "metrics.json").read_text()) for m in models}


def interval(entry):
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def view(m, name):
    row = metrics[m]["geometry"]["views"][name]
    return f"{interval(row['auc'])} p_holm {row['p_holm']:.2g}"


print(f"views ({folder}): minus the distance to the nearest other member, AUC [95%] and Holm-adjusted p")
rows = [("", *(f"{m} {agg}" for m in models for agg in ("mean", "max")))]
rows.append(("loss", *(interval(metrics[m]["scores"]["loss"]["auc"]) for m in models for _ in ("mean", "max"))))
prefixes = dict.fromkeys(name.rsplit("_", 1)[0] for name in metrics["overfit"]["geometry"]["views"])
for prefix in prefixes:
    rows.append((prefix, *(view(m, f"{prefix}_{agg}") for m in models for agg in ("mean", "max"))))
widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
for row in rows:
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
for m in models:
    best = metrics[m]["geometry"]["best_view"]
    verdict = "separates members" if best["separates"] else "does not separate members"
    print(f"{m}: best view {best['name']} AUC {interval(best['auc'])}, p {best['p']:.2g}, "
          f"Holm p {best['p_holm']:.2g}: {verdict} at {best['alpha']}")
EOF
