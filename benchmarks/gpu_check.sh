#!/usr/bin/env bash
# The GPU check: set up CUDA torch, faiss-gpu and memscan, show what sees the GPU, run the
# GPU-marked tests, issue 23's IVF-PQ and sharded query paths on the GPU, and the extraction and kNN
# benchmarks at GPU sizes, all within 10 minutes,
# and end with one table (step, status, key number). Exit 1 if any step failed or timed out.
#
#   bash benchmarks/gpu_check.sh [--tiny] [--python PATH] [--no-install] [--out DIR] [--budget SECONDS]
#
#   --tiny         benchmark sizes a CPU runs in seconds: a dry run of the script (GPU steps SKIP)
#   --python PATH  use this interpreter as it is (no venv is made)
#   --no-install   install nothing; say what is missing
#   --out DIR      logs and results [benchmarks/results/gpu-check]
#   --budget S     seconds for the whole check [570]
#
# Python: .venv if its torch is a CUDA build, else .venv-gpu (made here; where python3's own
# torch is a CUDA build, as on a machine image with PyTorch, .venv-gpu sees python3's packages
# instead of installing torch again). Installs come from .whl/ (prepared wheels, --no-index)
# when that folder exists, else from the package index; with neither, nothing is installed
# and the steps that need the missing packages fail. benchmarks/README.md says more.
set -u

TORCH_PIN="torch==2.13.0"        # from the default index on Linux x86-64: the CUDA build, with nvidia-* wheels
FAISS_GPU_PIN="faiss-gpu==1.15.1" # Meta's official wheel (the `gpu` extra): CUDA 12, sm_90 code for H100/H200
FAISS_CPU_PIN="faiss-cpu==1.15.1" # only where faiss-gpu cannot be installed, so the torch-CUDA paths still run

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
TINY=0
NO_INSTALL=0
PYTHON_ARG=""
OUTDIR="$ROOT/benchmarks/results/gpu-check"
BUDGET=570
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1 ;;
        --no-install) NO_INSTALL=1 ;;
        --python) PYTHON_ARG=${2:?--python needs a path}; shift ;;
        --out) OUTDIR=${2:?--out needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUTDIR" || exit 1
LOG="$OUTDIR/gpu_check.log"
rm -f "$LOG" "$OUTDIR/pytest-gpu.xml" "$OUTDIR/bench_knn.json" "$OUTDIR/bench_extract.json" "$OUTDIR/summary.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this working tree's memscan, installed or not
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- bookkeeping
NAMES=()
STATUSES=()
KEYS=()
START=$SECONDS

record() {  # record STEP STATUS KEY: one row of the final table
    NAMES+=("$1")
    STATUSES+=("$2")
    KEYS+=("$3")
    echo "=> $1: $2${3:+ - $3}" | tee -a "$LOG"
}

header() {
    printf '\n=== %s (%d s left) ===\n' "$1" "$(left)" | tee -a "$LOG"
}

left() {
    echo $(( BUDGET - (SECONDS - START) ))
}

limit() {  # limit WANTED: seconds a step may take, keeping 10 s for the table
    local spare=$(( $(left) - 10 ))
    echo $(( spare < $1 ? spare : $1 ))
}

run() {  # run SECONDS CMD...: output to the console and the log; the command's status (124/137: timed out)
    local seconds=$1
    shift
    if [ "$seconds" -lt 5 ]; then
        echo "no time left for: $*" | tee -a "$LOG"
        return 124
    fi
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

timed_out() {
    [ "$1" -eq 124 ] || [ "$1" -eq 137 ]
}

summary() {
    local i failed=0 width=6
    for i in "${!NAMES[@]}"; do
        [ "${#NAMES[$i]}" -gt "$width" ] && width=${#NAMES[$i]}
    done
    {
        printf '\nGPU check summary: %d s, results in %s\n' "$(( SECONDS - START ))" "$OUTDIR"
        printf "%-${width}s  %-7s  %s\n" step status "key number"
        for i in "${!NAMES[@]}"; do
            printf "%-${width}s  %-7s  %s\n" "${NAMES[$i]}" "${STATUSES[$i]}" "${KEYS[$i]}"
        done
    } | tee "$OUTDIR/summary.txt" | tee -a "$LOG"
    for i in "${!STATUSES[@]}"; do
        case "${STATUSES[$i]}" in FAIL|TIMEOUT) failed=1 ;; esac
    done
    return $failed
}

trap 'record "interrupted" FAIL "stopped by a signal"; summary; exit 130' INT TERM

# ---------------------------------------------------------------- 1. the Python environment
has_cuda_torch() {  # has_cuda_torch PYTHON: its torch is a CUDA build (whether or not a GPU is seen)
    "$1" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' >/dev/null 2>&1
}

make_venv() {  # make_venv BASE: .venv-gpu, seeing BASE's packages where BASE's torch is a CUDA build
    local base=$1 venv="$ROOT/.venv-gpu" site
    if [ ! -x "$venv/bin/python" ]; then
        "$base" -m venv "$venv" >>"$LOG" 2>&1 || "$base" -m venv --without-pip "$venv" >>"$LOG" 2>&1 || return 1
        echo '*' >"$venv/.gitignore"  # not part of the repository
    fi
    if has_cuda_torch "$base"; then
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
        # site.addsitedir also reads the .pth files there; appended, so what .venv-gpu installs comes first
        "$base" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
            >"$site/gpu_check_base.pth" || return 1
        VENV_NOTE="made; sees $base's CUDA torch"
    else
        VENV_NOTE="made"
    fi
}

header "setup: python"
VENV_NOTE="given with --python"
if [ -n "$PYTHON_ARG" ]; then
    PY=$PYTHON_ARG
elif [ -x "$ROOT/.venv/bin/python" ] && has_cuda_torch "$ROOT/.venv/bin/python"; then
    PY="$ROOT/.venv/bin/python"
    VENV_NOTE="reused: its torch is a CUDA build"
elif BASE=$(command -v python3) && make_venv "$BASE"; then
    PY="$ROOT/.venv-gpu/bin/python"
else
    PY=""
fi
PIP=()
if [ -n "$PY" ] && "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    PIP=("$PY" -m pip)
    if ! "$PY" -m pip --version >/dev/null 2>&1 && [ -n "${BASE:-}" ]; then
        PIP=("$BASE" -m pip --python "$PY")  # a venv made without pip: python3's pip installs into it
    fi
    record "setup python" OK "$PY ($("$PY" -c 'import platform; print("Python", platform.python_version())'); $VENV_NOTE)"
else
    record "setup python" FAIL "no Python 3.10+ (python3 -m venv .venv-gpu failed; see $LOG)"
    summary
    exit 1
fi

# Where packages come from: .whl/ alone, or the index, or nowhere.
SOURCE=""
PIP_SRC=()
if [ "$NO_INSTALL" -eq 1 ]; then
    SOURCE="nowhere: --no-install"
elif compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    SOURCE=".whl/"
    PIP_SRC=(--no-index --find-links "$ROOT/.whl")
elif timeout 40 "${PIP[@]}" index versions pip --timeout 8 --retries 0 >/dev/null 2>&1; then
    SOURCE="the package index"
else
    SOURCE="nowhere: no .whl/ and the package index is unreachable"
    echo "gpu_check: cannot install anything: there is no .whl/ folder of prepared wheels and the package" \
         "index is unreachable. Put the wheels in .whl/ (benchmarks/README.md says how), or run where the" \
         "index is reachable; the steps below use what is already installed." | tee -a "$LOG"
fi
echo "packages come from: $SOURCE" | tee -a "$LOG"

pip_install() {  # pip_install ARGS...: from .whl/ or the index, quietly, within the time left
    run "$(limit 300)" "${PIP[@]}" install -q --timeout 20 --retries 1 ${PIP_SRC[@]+"${PIP_SRC[@]}"} "$@"
}

can_install() {
    [ "$SOURCE" = ".whl/" ] || [ "$SOURCE" = "the package index" ]
}

# ---------------------------------------------------------------- 1b. torch (CUDA build)
header "setup: torch"
torch_line() {
    "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>/dev/null
}
if has_cuda_torch "$PY"; then
    record "setup torch" OK "$(torch_line) (already there)"
elif ! can_install; then
    record "setup torch" FAIL "no CUDA build of torch ($(torch_line || echo 'torch missing')); installs come from $SOURCE"
else
    REINSTALL=()
    "$PY" -c 'import torch' 2>/dev/null && REINSTALL=(--force-reinstall)  # a CPU build of the same version
    pip_install ${REINSTALL[@]+"${REINSTALL[@]}"} "$TORCH_PIN"
    status=$?
    if has_cuda_torch "$PY"; then
        record "setup torch" OK "$(torch_line) (installed $TORCH_PIN from $SOURCE)"
    elif timed_out $status; then
        record "setup torch" TIMEOUT "installing $TORCH_PIN from $SOURCE"
    else
        record "setup torch" FAIL "$TORCH_PIN from $SOURCE gave no CUDA build ($(torch_line || echo 'torch missing'))"
    fi
fi

# ---------------------------------------------------------------- 1c. memscan and its dependencies (but faiss)
header "setup: project"
missing_requirements() {  # pyproject's dependencies and dev extra, faiss aside, that the environment lacks
    "$PY" - <<'PY'
import importlib.metadata as metadata
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
    requirement = Requirement(line)
    if requirement.name.startswith("faiss"):
        continue
    try:
        ok = requirement.specifier.contains(metadata.version(requirement.name), prereleases=True)
    except metadata.PackageNotFoundError:
        ok = False
    if not ok:
        print(line.replace(" ", ""))
PY
}
NEEDED="import memscan.cli, memscan.extract, memscan.knn.index, pytest"
mapfile -t MISSING < <(missing_requirements)
if [ ${#MISSING[@]} -gt 0 ] && can_install; then
    if ! pip_install "${MISSING[@]}"; then  # all or nothing: then each on its own, to get what there is
        for requirement in "${MISSING[@]}"; do
            pip_install "$requirement"
        done
    fi
    mapfile -t MISSING < <(missing_requirements)
fi
if can_install && ! "$PY" -c 'import importlib.metadata as m; m.version("memscan")' 2>/dev/null; then
    # --no-deps: the requirements above are installed already, and faiss-gpu is the only faiss (never the cpu extra)
    NO_ISOLATION=()
    "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null \
        && NO_ISOLATION=(--no-build-isolation)
    pip_install --no-deps ${NO_ISOLATION[@]+"${NO_ISOLATION[@]}"} -e "$ROOT"
fi
if ! "$PY" -c "$NEEDED" >>"$LOG" 2>&1; then
    record "setup project" FAIL "memscan or pytest does not import (missing: ${MISSING[*]:-see $LOG})"
elif [ ${#MISSING[@]} -gt 0 ]; then
    record "setup project" WARN "memscan imports; missing (this check does not use them): ${MISSING[*]}"
else
    record "setup project" OK "memscan $("$PY" -c 'import memscan; print(memscan.__version__)') and every dependency"
fi

# ---------------------------------------------------------------- 1d. faiss-gpu
header "setup: faiss-gpu"
faiss_line() {  # "faiss VERSION, a GPU|CPU build"; nothing where faiss does not import
    "$PY" -c 'import faiss; print(f"faiss {faiss.__version__}, a", "GPU" if hasattr(faiss, "StandardGpuResources") else "CPU", "build")' \
        2>/dev/null
}
faiss_is_gpu() {
    faiss_line | grep -q "a GPU build"
}
if faiss_is_gpu; then
    record "setup faiss-gpu" OK "$(faiss_line) (already there)"
elif ! can_install; then
    record "setup faiss-gpu" FAIL "no faiss GPU build ($(faiss_line || echo 'faiss missing')); installs come from $SOURCE"
else
    pip_install "$FAISS_GPU_PIN"  # over faiss-cpu's files: both packages own faiss/
    status=$?
    if [ $status -eq 0 ] && "${PIP[@]}" show -q faiss-cpu >/dev/null 2>&1; then
        # Only now that faiss-gpu is in: removing faiss-cpu takes the shared files, so faiss-gpu goes in again.
        run 60 "${PIP[@]}" uninstall -y -q faiss-cpu
        pip_install --force-reinstall --no-deps "$FAISS_GPU_PIN"
    fi
    if faiss_is_gpu; then
        record "setup faiss-gpu" OK "$(faiss_line) (installed $FAISS_GPU_PIN from $SOURCE)"
    else
        fallback=""
        if ! faiss_line >/dev/null; then  # no faiss at all: faiss-cpu, so the torch-CUDA paths still run
            pip_install "$FAISS_CPU_PIN" && fallback="; $FAISS_CPU_PIN installed instead"
        fi
        if timed_out $status; then
            record "setup faiss-gpu" TIMEOUT "installing $FAISS_GPU_PIN from $SOURCE$fallback"
        else
            record "setup faiss-gpu" FAIL "$FAISS_GPU_PIN did not install from $SOURCE (see $LOG)$fallback"
        fi
    fi
fi

# ---------------------------------------------------------------- 2. what sees the GPU
header "gpu"
SMI=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 4)
GPU_PRESENT=0
if [ -n "$SMI" ]; then
    GPU_PRESENT=1
    echo "nvidia-smi: $SMI" | tee -a "$LOG"
else
    echo "nvidia-smi: no GPU listed ($(command -v nvidia-smi >/dev/null && echo 'nvidia-smi found none' || echo 'no nvidia-smi'))" \
        | tee -a "$LOG"
fi
SEEN=$(timeout 90 "$PY" - 2>&1 <<'PY'
try:
    import torch
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    capability = "sm_%d%d" % torch.cuda.get_device_capability(0) if names else "-"
    print(f"torch {torch.__version__}: CUDA build {torch.version.cuda}, cuda.is_available() {torch.cuda.is_available()}, "
          f"{len(names)} device(s) {names} {capability}")
    torch_gpus = len(names)
except Exception as exc:  # a broken install is a finding here, not a crash
    print(f"torch: {type(exc).__name__}: {exc}")
    torch_gpus = 0
try:
    import faiss
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"faiss {faiss.__version__}: get_num_gpus() {faiss_gpus}")
except Exception as exc:
    print(f"faiss: {type(exc).__name__}: {exc}")
    faiss_gpus = 0
print(torch_gpus, faiss_gpus)
PY
)
echo "$SEEN" | sed '$d' | tee -a "$LOG"  # the last line is the two counts
read -r TORCH_GPUS FAISS_GPUS <<<"$(echo "$SEEN" | tail -n 1)"
[[ "${TORCH_GPUS:-}" =~ ^[0-9]+$ ]] || TORCH_GPUS=0
[[ "${FAISS_GPUS:-}" =~ ^[0-9]+$ ]] || FAISS_GPUS=0
SEEN_KEY="torch sees $TORCH_GPUS, faiss sees $FAISS_GPUS"
if [ $GPU_PRESENT -eq 1 ] && [ "$TORCH_GPUS" -gt 0 ] && [ "$FAISS_GPUS" -gt 0 ]; then
    record "gpu" OK "$(echo "$SMI" | head -n 1); $SEEN_KEY"
elif [ $GPU_PRESENT -eq 1 ]; then
    record "gpu" FAIL "$(echo "$SMI" | head -n 1); but $SEEN_KEY"
elif [ $TINY -eq 1 ]; then
    record "gpu" SKIP "no NVIDIA GPU: a CPU dry run; $SEEN_KEY"
else
    record "gpu" FAIL "no NVIDIA GPU: nvidia-smi lists none; $SEEN_KEY"
fi

# ---------------------------------------------------------------- 3. the GPU-marked tests
header "pytest -m gpu"
XML="$OUTDIR/pytest-gpu.xml"
run "$(limit 150)" "$PY" -m pytest -m gpu -q -rs --continue-on-collection-errors --junitxml="$XML" tests
status=$?
COUNTS=$("$PY" - "$XML" 2>>"$LOG" <<'PY'
import sys
import xml.etree.ElementTree as ET

passed = failed = skipped = 0
uncollected = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    problem = case.find("failure") if case.find("failure") is not None else case.find("error")
    if problem is not None and "collection failure" in (problem.get("message") or ""):
        uncollected.append(case.get("name"))
    elif problem is not None:
        failed += 1
    elif case.find("skipped") is not None:
        skipped += 1
    else:
        passed += 1
print(passed, failed, skipped, len(uncollected), ",".join(uncollected) or "-")
PY
)
read -r PASSED FAILED SKIPPED UNCOLLECTED UNCOLLECTED_NAMES <<<"${COUNTS:-0 0 0 0 -}"
TESTS_KEY="$PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$UNCOLLECTED" -gt 0 ] && TESTS_KEY="$TESTS_KEY; not collected: $UNCOLLECTED_NAMES"
if timed_out $status; then
    record "pytest -m gpu" TIMEOUT "$TESTS_KEY so far"
elif [ -z "$COUNTS" ]; then
    record "pytest -m gpu" FAIL "pytest exited $status without a report (see $LOG)"
elif [ "$FAILED" -gt 0 ]; then
    record "pytest -m gpu" FAIL "$TESTS_KEY"
elif [ "$PASSED" -eq 0 ] && [ $GPU_PRESENT -eq 1 ]; then
    printf '\n!!! EVERY GPU TEST WAS SKIPPED, BUT THIS MACHINE HAS A GPU (%s) !!!\n!!! %s: see the SKIPPED reasons above !!!\n\n' \
        "$(echo "$SMI" | head -n 1)" "$SEEN_KEY" | tee -a "$LOG"
    record "pytest -m gpu" FAIL "all skipped on a machine with a GPU: $TESTS_KEY"
elif [ "$PASSED" -eq 0 ]; then
    record "pytest -m gpu" "$([ $TINY -eq 1 ] && echo SKIP || echo FAIL)" "no GPU, so all skipped: $TESTS_KEY"
elif [ "$UNCOLLECTED" -gt 0 ]; then
    record "pytest -m gpu" WARN "$TESTS_KEY"
else
    record "pytest -m gpu" OK "$TESTS_KEY"
fi

# ---------------------------------------------------------------- 4. benchmarks at GPU sizes
bench() {  # bench NAME SECONDS ARGS...: benchmarks/NAME.py ARGS, its JSON to $OUTDIR/NAME.json; the status
    local name=$1 seconds=$2
    shift 2
    BENCH_NOTE="stopped at its limit of $seconds s (partial numbers in $LOG)"
    if [ "$seconds" -lt 5 ]; then
        BENCH_NOTE="not run: no time left"
        echo "$BENCH_NOTE for $name" | tee -a "$LOG"
        return 124
    fi
    { timeout --kill-after=10 "$seconds" "$PY" "benchmarks/$name.py" "$@" >"$OUTDIR/$name.json"; } 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    cat "$OUTDIR/$name.json" >>"$LOG"
    return "$status"
}

read_bench() {  # read_bench KIND FILE: prints "STATUS|key" per table row (KIND knn or extract)
    "$PY" - "$@" "$GPU_PRESENT" "$TINY" 2>>"$LOG" <<'PY'
import json
import sys

kind, path, gpu_present, tiny = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
results = json.load(open(path))


def knn() -> None:
    exact = results["exact_self_join"]
    rows = exact["backends"]
    n = f"{exact['n_vectors']:,} x {exact['dim']}"
    parts = [f"{r['backend']} {r['seconds']:.1f} s" + (f" ({r['over_floor']:g}x floor)" if "over_floor" in r else "")
             for r in rows if r["backend"] != "faiss-cpu"]
    cpu = next(r for r in rows if r["backend"] == "faiss-cpu")
    best = max(rows, key=lambda r: r["queries_per_s"])
    parts.append(f"faiss-cpu {cpu['queries_per_s']:,} q/s"
                 + (f" vs {best['backend']} {best['queries_per_s']:,} q/s" if best is not cpu else ""))
    disagree = [f"{r['backend']} recall@1 {r['recall_at_1']:.3f}" for r in rows if r.get("recall_at_1", 1) < 0.99]
    status = "OK"
    if disagree:
        status, parts = "FAIL", [f"answers differ from {rows[0]['backend']}: " + ", ".join(disagree)] + parts
    if exact["missing"] and (gpu_present or not tiny):
        status, parts = "FAIL", ["missing " + "; ".join(exact["missing"])] + parts
    elif exact["missing"]:
        parts.insert(0, "no GPU backend (CPU dry run)")
    print(f"{status}|self-join {n}: " + "; ".join(parts))

    table = results["approximate"]["rows"]
    ivf = [r for r in table if "IVF" in r["index"]]
    ivf = [r for r in ivf if r["params"] == "nprobe=16"] or ivf
    shown = "; ".join(f"{r['index']} {r['params']}: recall@1 {r['recall_at_1']:.3f}, {r['queries_per_s']:,} q/s"
                      for r in ivf)
    exact_rows = "; ".join(f"{r['index']}: {r['queries_per_s']:,} q/s" for r in table if r["index"].startswith("exact"))
    gpu_ivf = any(r["index"].startswith("faiss-gpu") for r in table)
    status = "OK" if gpu_ivf or not (gpu_present or not tiny) else "FAIL"
    print(f"{status}|{shown}" + (f"; {exact_rows}" if exact_rows else "") + ("" if gpu_ivf else "; no faiss-gpu IVF"))


def extract() -> None:
    runs = {k: v for k, v in results["memscan_extract"].items() if not k.startswith("fp32")}
    size, best = max(runs.items(), key=lambda item: item[1]["tokens_per_s"])
    fp32 = next(v for k, v in results["memscan_extract"].items() if k.startswith("fp32"))
    on_gpu = results["device"].startswith("cuda")
    status = "OK" if on_gpu or not (gpu_present or not tiny) else "FAIL"
    print(f"{status}|{results['device']}: batch {size} {best['tokens_per_s']:,.0f} tok/s = "
          f"{best['fraction_of_bf16_peak']:.3f} of bf16 peak ({results['matmul_peak_gflops']['bf16']:,.0f} GFLOP/s), "
          f"{best['speedup_vs_plain']:.1f}x the plain loop; fp32 {fp32['tokens_per_s']:,.0f} tok/s")


knn() if kind == "knn" else extract()
PY
}

record_bench() {  # record_bench KIND STATUS STEP...: one table row per line of read_bench
    local kind=$1 status=$2 line i=0
    shift 2
    local steps=("$@") file="$OUTDIR/bench_$kind.json"
    if [ "$status" -ne 0 ] || ! [ -s "$file" ]; then
        local why="exited $status (see $LOG)"
        timed_out "$status" && why=$BENCH_NOTE
        for i in "${!steps[@]}"; do
            record "${steps[$i]}" "$(timed_out "$status" && echo TIMEOUT || echo FAIL)" "$why"
        done
        return
    fi
    while IFS= read -r line; do
        [ $i -lt ${#steps[@]} ] && record "${steps[$i]}" "${line%%|*}" "${line#*|}"
        i=$((i + 1))
    done < <(read_bench "$kind" "$file")
    for (( ; i < ${#steps[@]}; i++ )); do
        record "${steps[$i]}" FAIL "its JSON could not be read (see $LOG)"
    done
}

# ---------------------------------------------------------------- 3b. issue 23's paths: IVF-PQ and a sharded query on the GPU
# One dataset (bench_query's clustered float16 vectors, written in blocks), then `memscan index` with an
# --index-memory that only PQ codes fit (auto picks IVF<nlist>,PQ<m>, trained, filled and tuned on the GPU)
# and `memscan query` over it; then `memscan index --shards 2` and `memscan query` over the two shards.
# Each command is time-boxed; the key number is each command's wall time and the index's factory.
QDIR="$OUTDIR/query-paths"
if [ $TINY -eq 1 ]; then
    Q_PATTERNS=60000; Q_QUERIES=500; Q_N=32; Q_MEMORY=2MB   # PQ8: 1.4 MB with ids
else
    # 300,000 x 256: float32 codes 0.31 GB, SQ8 82 MB, PQ64 24 MB with ids: 40 MB leaves only PQ
    Q_PATTERNS=300000; Q_QUERIES=10000; Q_N=256; Q_MEMORY=40MB
fi
Q_DEVICE=gpu
[ $GPU_PRESENT -eq 1 ] || [ $TINY -eq 0 ] || Q_DEVICE=auto   # a CPU dry run: the same commands on the CPU

query_step() {  # query_step STEP SECONDS INDEX_DIR INDEX_ARGS...: index then query, one table row
    local step=$1 seconds=$2 index_dir=$3 status started index_s query_s info
    shift 3
    header "$step"
    started=$SECONDS
    run "$(limit "$seconds")" "$PY" -m memscan index "$QDIR/data" --out "$index_dir" --overwrite \
        --device "$Q_DEVICE" "$@"
    status=$?
    index_s=$(( SECONDS - started ))
    if [ $status -ne 0 ]; then
        record "$step" "$(timed_out $status && echo TIMEOUT || echo FAIL)" "memscan index exited $status after $index_s s (see $LOG)"
        return
    fi
    started=$SECONDS
    rm -rf "$index_dir-run"
    run "$(limit $(( seconds - index_s > 20 ? seconds - index_s : 20 )))" "$PY" -m memscan query "$index_dir" \
        --queries "$QDIR/data" --split test --device "$Q_DEVICE" --out "$index_dir-run"
    status=$?
    query_s=$(( SECONDS - started ))
    info=$("$PY" -c 'import json, sys; i = json.load(open(sys.argv[1])); print(i["factory"], i["device"], len(i["shards"]), i["search"])' \
        "$index_dir/index.json" 2>>"$LOG")
    if [ $status -ne 0 ]; then
        record "$step" "$(timed_out $status && echo TIMEOUT || echo FAIL)" "index $index_s s ($info); memscan query exited $status after $query_s s"
    elif [ "$Q_DEVICE" = gpu ] && ! echo "$info" | grep -q "faiss-gpu"; then
        record "$step" FAIL "index $index_s s, query $query_s s, but the index was not built on the GPU: $info"
    else
        record "$step" OK "$Q_PATTERNS x $Q_N: index $index_s s, query $query_s s ($info)$([ "$Q_DEVICE" = gpu ] || echo '; CPU dry run')"
    fi
}

header "query paths: data"
rm -rf "$QDIR"
mkdir -p "$QDIR"
if run "$(limit 60)" "$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; import bench_query as b; b.write_dataset(Path(sys.argv[1]), *map(int, sys.argv[2:5]), 0)' \
        "$QDIR/data" "$Q_PATTERNS" "$Q_QUERIES" "$Q_N"; then
    query_step "gpu ivf-pq index+query" 110 "$QDIR/ivfpq" --index-memory "$Q_MEMORY"
    if ! grep -q '"factory": "IVF[0-9_A-Z]*,PQ' "$QDIR/ivfpq/index.json" 2>/dev/null; then
        record "gpu ivf-pq factory" FAIL "auto did not choose IVF-PQ at --index-memory $Q_MEMORY (see $QDIR/ivfpq/index.json)"
    fi
    query_step "gpu sharded index+query" 90 "$QDIR/sharded" --shards 2
else
    record "gpu ivf-pq index+query" FAIL "could not write the dataset (see $LOG)"
    record "gpu sharded index+query" FAIL "could not write the dataset (see $LOG)"
fi
rm -rf "$QDIR/data"

header "bench knn"
if [ $TINY -eq 1 ]; then
    KNN_ARGS=(--device gpu --n-vectors 4000 --dim 32 --block-rows 1500 --queries 100 --cpu-queries 1000 --nlist 16 --skip-hnsw)
else
    # Blocks of 100,000: 4 block pairs, each re-ranked exactly on the CPU (what bounds a GPU self-join);
    # torch holds one 100,000 x 100,000 float32 score block (40 GB) at a time.
    KNN_ARGS=(--device gpu --n-vectors 200000 --dim 1024 --block-rows 100000 --queries 2000 --cpu-queries 20000 \
              --nlist 2048 --skip-sklearn --skip-hnsw)
fi
bench bench_knn "$(limit 150)" "${KNN_ARGS[@]}"
record_bench knn $? "bench knn exact" "bench knn approx"

header "bench extract"
if [ $TINY -eq 1 ]; then
    EXTRACT_ARGS=(--device auto --layers 2 --width 64 --documents 2 --baseline-chunks 2 --batch-sizes 4 --skip-memory)
else
    # shellcheck disable=SC2054  # 16,64,128 is one argument
    EXTRACT_ARGS=(--device cuda --documents 400 --baseline-chunks 64 --batch-sizes 16,64,128 --skip-memory)
fi
bench bench_extract "$(limit 120)" "${EXTRACT_ARGS[@]}"
record_bench extract $? "bench extract"

summary
exit $?
