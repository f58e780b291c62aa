#!/usr/bin/env bash
# Everything owed on a GPU machine, in one command, with no network:
#   1. the gpu test suite      python3 -m pytest -m gpu -q
#   2. gpu-backup bench        JSON and plot, named <device>-<date>.json/.png; with torch
#                              present its torch_step is bench_torch.py's comparison
#   3. the narrower benchmarks bench_pipeline.py --device cuda (page sizes, zero runs, swap,
#                              per-piece cost), bench_store.py
# then summary.txt: every part with its time, every goal met or missed.
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]     (default: $OUT, else ./gpu-check-results)
#
# All files land flat in RESULTS_DIR: summary.txt, gpu-check.log (every part's output),
# <device>-<date>.json/.png, pipeline.json, store.json.  Each part runs under
# its own time budget (timeout); one that fails or times out is recorded and the next
# runs.  The budgets add up to under 8 minutes on an H100.  Without a usable GPU it runs
# a quick host version (tiny sizes, well under a minute): CI runs that.
# Exit status: 1 if any part failed, else 0.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$PWD
py=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

outdir=${1:-${OUT:-./gpu-check-results}}
mkdir -p "$outdir" || exit 2
outdir=$(cd "$outdir" && pwd)
log=$outdir/gpu-check.log
: >"$log"

read -r mode slug device < <("$py" -m gpu_backup.bench.gpucheck probe 2>>"$log") || {
    echo "gpu_check: probing the device failed; see $log" >&2
    exit 2
}
day=$(date +%Y-%m-%d)
bench_base=$outdir/$slug-$day

if [ "$mode" = gpu ]; then
    # seconds per part; 440 s in all, under the 480 s goal with start-up to spare
    t_pytest=130 t_bench=230 t_pipeline=40 t_store=40
    bench_args=()
    pipeline_args=(--device cuda --zero --swap --pieces)
    store_args=()
else
    t_pytest=60 t_bench=60 t_pipeline=30 t_store=30
    bench_args=(--device host --quick --sizes 64K,1M --repeat 1 --budget 0 --touches 4)
    pipeline_args=(--device host --size 4M --repeat 1 --zero --zero-size 4M --swap)
    store_args=(--sizes 4M --cycle-sizes 16M --repeat 1)
fi
echo "gpu_check: mode $mode, device $device, results in $outdir" | tee -a "$log"

parts=()
# run NAME BUDGET NOTE-CMD -- COMMAND...: run under timeout, log, record rc and seconds.
# SIGINT first, so the bench keeps what finished; SIGKILL 15 s later.
run() {
    local name=$1 budget=$2
    shift 2
    local t0 t1 rc
    echo "===== $name (budget $budget s): $*" >>"$log"
    t0=$(date +%s.%N)
    timeout --signal=INT --kill-after=15 "$budget" "$@" >>"$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "===== $name: rc $rc, $secs s" >>"$log"
    printf 'gpu_check: %-14s rc %-4s %7s s\n' "$name" "$rc" "$secs"
    parts+=("$name|$rc|$secs|$budget|${note:-}")
}

note=""
run pytest_gpu "$t_pytest" "$py" -m pytest -m gpu -q -p no:cacheprovider
note=$(grep -E '^[0-9]+ (passed|failed|skipped|deselected)|^=+ .* in [0-9.]+s' "$log" \
       | tail -1 | tr -d '=' | sed 's/^ *//')
parts[-1]="${parts[-1]}$note"
note=""

run bench "$t_bench" "$py" -m gpu_backup bench "${bench_args[@]}" \
    --json "$bench_base.json" --plot "$bench_base.png"
run bench_pipeline "$t_pipeline" "$py" benchmarks/bench_pipeline.py "${pipeline_args[@]}" \
    --json "$outdir/pipeline.json"
run bench_store "$t_store" "$py" benchmarks/bench_store.py "${store_args[@]}" \
    --json "$outdir/store.json"
# bench_torch.py measures what the bench's torch_step step already measured above (the
# same code, gpu_backup.bench.torchstep): not run again, to keep the check short.
parts+=("bench_torch|-1|0|0|the bench's torch_step ran this comparison (rows and goals in its JSON)")

"$py" -m gpu_backup.bench.gpucheck summary "$mode" "$outdir" "$bench_base.json" "${parts[@]}"
