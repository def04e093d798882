#!/usr/bin/env bash
# One GPU session for issue #5: parity and timings of the fused memory head, the torch CUDA backend and the
# training step, in one call of a few minutes. Run from the repository root on a machine with torch + CUDA +
# triton + onnxruntime (CPU) + onnx/onnxscript + pytest-benchmark; nothing is installed and nothing is fetched.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine; results under $OUT (default ./gpu_out)
#   bash benchmarks/gpu_session.sh --cpu      # smoke test of every step on CPU at tiny sizes (no GPU needed)
#
# Every step runs under `timeout`, is independent of the others (a failed step is logged and the next one runs)
# and all of them share one deadline: GPU_SESSION_BUDGET seconds (default 330) from the start; a step that would
# start with less than 15 s left is skipped. GPU_SESSION_STEPS (space-separated step names) runs only those, in
# the order below, e.g. GPU_SESSION_STEPS="model tests latency profile folder" for the steps a session still
# lacks (benchmarks/RESULTS.md says which). Steps, most important first:
#   model      random-weight paper model folder, D_in 1536 (python -m momkd.export.synthetic)
#   tests      pytest -m gpu: kernel parity at full size (fp32 tf32x3/ieee, fp16, bf16, launch configs), model
#              eval through the kernel, torch-CUDA backend vs CPU fp32, the existing CUDA backend tests
#   head       fused vs unfused memory head, N = 10k, 100k, 200k, paper + official dims, fp32/fp16/bf16, and the
#              fused kernel's launch configurations at N = 200k
#   bench      momkd bench on cuda (torch backend fp32/fp16/bf16, N 1000/20000/50000, 1 and 8 slides per pack)
#   bench_ab   the same model with the fused head off (MOMKD_FUSED_HEAD=0), N 20000: the head's share end to end
#   latency    model latency vs N on the GPU, with and without host<->device copies (resident)
#   profile    torch profiler of one 20000-patch forward on the GPU: top CUDA kernels (is GATv2 the bottleneck?)
#   train      one training step on CUDA at N = 20000, paper and official presets
#   folder     momkd infer folder throughput vs compute-only, torch backend on cuda (TRIDENT-layout files)
# Outputs (at most 8 files, as the device tool returns them): $OUT/summary.md (step table + report.py tables),
# $OUT/latency.png, $OUT/gpu_session.log (everything printed), $OUT/results.tar.gz (every JSON and log; refreshed
# after each step, so a cut-off run still returns what finished).
set -u -o pipefail

CPU_SMOKE=0
[ "${1:-}" = "--cpu" ] && CPU_SMOKE=1
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_out}
WORK=${GPU_SESSION_WORK:-/tmp/momkd_gpu_session}
BUDGET=${GPU_SESSION_BUDGET:-330}
PY=${PYTHON:-python3}
START=$(date +%s)
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/json" "$OUT"
LOG="$OUT/gpu_session.log"
: > "$LOG"
STATUS="$WORK/status.tsv"
: > "$STATUS"

if [ ! -f momkd/__init__.py ] || [ ! -d momkd/export ] || [ ! -d momkd/runtime ]; then
    echo "error: run from the momkd repository root (momkd/export, momkd/runtime)" >&2
    exit 2
fi

# The package without installing it: the repository root on sys.path (momkd/ holds every stage).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [ "$CPU_SMOKE" = 1 ]; then
    DEV=cpu; export TRITON_INTERPRET=1
    MODEL_ARGS=(--preset paper --in-dim 64)
    TEST_SEL="tests/test_kernels_memory_head.py"
    HEAD_NS=2000; LAT_NS=500,2000; BENCH_PATCHES=500,2000; BENCH_AB_PATCHES=2000; PROFILE_N=2000
    TRAIN_SEL="8000 and paper"; FOLDER_SLIDES=3; ROUNDS=2
else
    DEV=cuda
    MODEL_ARGS=(--preset paper --in-dim 1536)
    TEST_SEL="tests/test_kernels_memory_head.py tests/test_runtime_backends.py"
    HEAD_NS=10000,100000,200000; LAT_NS=1000,5000,20000,50000; BENCH_PATCHES=1000,20000,50000
    BENCH_AB_PATCHES=20000; PROFILE_N=20000; TRAIN_SEL="20000"; FOLDER_SLIDES=12; ROUNDS=10
fi
MODEL="$WORK/model_paper_1536"

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

pack_results() {  # everything so far, one file (the device tool returns at most 8)
    tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" logs json status.tsv 2>/dev/null \
        && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

step() {  # step NAME MAX_SECONDS CMD...: run CMD under timeout, log it, record ok/failed/timeout/skipped
    local name=$1 max=$2
    shift 2
    if [ -n "${GPU_SESSION_STEPS:-}" ] && [[ " $GPU_SESSION_STEPS " != *" $name "* ]]; then
        printf '%s\tnot selected\t0\n' "$name" >> "$STATUS"
        return 0
    fi
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 15 ]; then
        say "SKIP $name (out of time: ${left}s left of ${BUDGET}s)"
        printf '%s\tskipped\t0\n' "$name" >> "$STATUS"
        return 0
    fi
    local limit=$(( max < left ? max : left ))
    say "START $name (limit ${limit}s)"
    local t0=$(date +%s) rc
    timeout --kill-after=5 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 )) state=ok
    [ "$rc" -ne 0 ] && state="failed(rc=$rc)"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && state="timeout"
    tail -n 25 "$WORK/logs/$name.log" >> "$LOG"
    say "END $name: $state in ${dt}s"
    printf '%s\t%s\t%s\n' "$name" "$state" "$dt" >> "$STATUS"
    pack_results
}

MOMKD=("$PY" -c 'import sys; from momkd.cli.main import app; sys.argv[0] = "momkd"; app()')  # the `momkd` command

# ------------------------------------------------------------------------------------------------ steps
say "momkd GPU session (cpu smoke: $CPU_SMOKE), budget ${BUDGET}s, work $WORK"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c 'import sys, torch, triton, onnxruntime as ort; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "onnxruntime", ort.__version__, ort.get_available_providers()); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)" || true
} > "$WORK/logs/env.log" 2>&1
cat "$WORK/logs/env.log" | tee -a "$LOG"

step model 150 "$PY" -m momkd.export.synthetic "$MODEL" "${MODEL_ARGS[@]}" --folds 1
export MOMKD_BENCH_MODEL_DIR="$MODEL"

step tests 240 "$PY" -m pytest -q -rs -s -p no:cacheprovider -m gpu $TEST_SEL --junitxml="$WORK/json/gpu_tests.xml"

MOMKD_BENCH_HEAD_NS=$HEAD_NS MOMKD_BENCH_INTERPRET_MAX_N=${HEAD_NS##*,} MOMKD_BENCH_ROUNDS=$(( ROUNDS * 2 )) \
    step head 200 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_head.py --benchmark-only \
    --benchmark-json="$WORK/json/head.json"

step bench 180 "${MOMKD[@]}" bench "$MODEL" --devices "$DEV" --backends torch,onnxruntime --precision fp32,fp16,bf16 \
    --patches "$BENCH_PATCHES" --slides-per-pack 1,8 --repeat "$ROUNDS" --json "$WORK/json/bench_$DEV.json"

MOMKD_FUSED_HEAD=0 step bench_ab 90 "${MOMKD[@]}" bench "$MODEL" --devices "$DEV" --backends torch \
    --precision fp32,fp16 --patches "$BENCH_AB_PATCHES" --slides-per-pack 1 --repeat "$ROUNDS" \
    --json "$WORK/json/bench_${DEV}_unfused_head.json"

MOMKD_BENCH_NS=$LAT_NS MOMKD_BENCH_ROUNDS=$ROUNDS step latency 150 "$PY" -m pytest -q -p no:cacheprovider \
    benchmarks/test_bench_latency.py --benchmark-only -k "$DEV and not roofline" \
    --benchmark-json="$WORK/json/latency.json"

step profile 60 "$PY" - "$MODEL" "$PROFILE_N" "$DEV" "$WORK/json/profile.json" <<'PYEOF'
"""Top kernels of one forward of the model folder's model.pt on DEV at N patches (fp32, then fp16 autocast)."""
import json, sys
import numpy as np, torch
import momkd.kernels.ops  # noqa: F401 - registers momkd::memory_head
from momkd.manifest import load_manifest
from momkd.runtime.bench import synthetic_pack

model_dir, n, dev, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
man = load_manifest(model_dir)
m = man.model
pack = synthetic_pack(n, 1, m.feature_dim, m.k, m.graph_direction)
module = torch.jit.load(str(man.torch_path), map_location=dev).eval()
args = [torch.from_numpy(a).to(dev) for a in (pack.features, pack.neighbors, pack.slide_offsets)]
report = {}
for precision, dtype in (("fp32", None), ("fp16", torch.float16)):
    def call():
        with torch.inference_mode(), torch.autocast(dev, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            module(*args)
        if dev == "cuda":
            torch.cuda.synchronize()
    for _ in range(3):
        call()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        call()
    key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in rows) or 1
    report[precision] = [{"name": e.key[:120], "ms": round(getattr(e, key) / 1e3, 4),
                          "share": round(getattr(e, key) / total, 4), "calls": e.count} for e in rows[:25]]
    print(f"{precision}: total {total / 1e3:.2f} ms ({key})")
    for r in report[precision][:15]:
        print(f"  {r['ms']:9.3f} ms {100 * r['share']:5.1f}%  x{r['calls']:<3d} {r['name']}")
json.dump({"n_patches": n, "device": dev, "top_kernels": report}, open(out, "w"), indent=1)
PYEOF

MOMKD_BENCH_DEVICE=$DEV step train 120 "$PY" -m pytest -q -s -p no:cacheprovider \
    benchmarks/test_bench_train_step.py --benchmark-only -k "$TRAIN_SEL" --benchmark-json="$WORK/json/train_step.json"

MOMKD_BENCH_BACKEND=torch MOMKD_BENCH_DEVICE=$DEV MOMKD_BENCH_SLIDES=$FOLDER_SLIDES step folder 120 \
    "$PY" -m pytest -q -s -p no:cacheprovider benchmarks/test_bench_runtime.py --benchmark-only \
    -k "folder_throughput and processes" --benchmark-json="$WORK/json/folder.json"

# ------------------------------------------------------------------------------------------------ report
reports=()
for f in head bench_$DEV latency train_step folder; do
    [ -s "$WORK/json/$f.json" ] && reports+=("$WORK/json/$f.json")
done
[ -s "$WORK/json/bench_${DEV}_unfused_head.json" ] && reports+=("head-unfused=$WORK/json/bench_${DEV}_unfused_head.json")
{
    echo "# momkd GPU session ($(date -u +%Y-%m-%dT%H:%MZ), cpu smoke: $CPU_SMOKE)"
    echo
    echo '```'
    cat "$WORK/logs/env.log"
    echo '```'
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---:|"
    awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$STATUS"
    echo
    grep -hE "passed|failed|error" "$WORK/logs/tests.log" 2>/dev/null | tail -n 3 | sed 's/^/    /'
    grep -h "vs cpu fp32" "$WORK/logs/tests.log" 2>/dev/null | sed 's/^/    /'
    echo
    if [ ${#reports[@]} -gt 0 ]; then
        "$PY" benchmarks/report.py "${reports[@]}" --png "$OUT/latency.png" 2>&1
    fi
    echo
    [ -s "$WORK/logs/profile.log" ] && { echo '## profile'; echo '```'; cat "$WORK/logs/profile.log"; echo '```'; }
} > "$OUT/summary.md"
pack_results
say "done in $(( $(date +%s) - START ))s; summary:"
cat "$OUT/summary.md"
