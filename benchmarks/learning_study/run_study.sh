#!/usr/bin/env bash
# The learning study of benchmarks/learning_study/RESULTS.md: one synthetic "study" cohort, 5-fold CV with the
# same splits for every model (ABMIL first; the others reuse its splits), then the summary table.
#
#   benchmarks/learning_study/run_study.sh OUT_DIR [RUN ...]
#
# RUN is any of abmil paper no_distill official (default: all, in that order; official last). A run whose
# summary.json exists is kept, so the script resumes. Everything is written under OUT_DIR, which must lie outside
# the repository. One intra-op thread per run (OMP_NUM_THREADS=1): on a shared 2-core machine two torch threads
# made a training step 10-40x slower.
set -euo pipefail

out=${1:?usage: run_study.sh OUT_DIR [abmil|paper|no_distill|official ...]}
shift
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(abmil paper no_distill official)
for run in "${runs[@]}"; do
    case $run in abmil|paper|no_distill|official) ;; *) echo "run_study.sh: unknown run $run" >&2; exit 2 ;; esac
done
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=$(realpath -m "$out")
case "$out/" in "$repo"/*) echo "run_study.sh: OUT_DIR must be outside the repository ($repo)" >&2; exit 2 ;; esac
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

epochs=20
cohort="$out/cohort"
[ -f "$cohort/cohort.csv" ] || momkd synth "$cohort" --kind study --difficulty medium --cases 200 --patches 80 240 \
    --slides 1 1 --feature-dim 64 --genes 200 --seed 1 > "$out/synth.log"
data=(--cohort "$cohort/cohort.csv" --features "$cohort/features" --label-col her2_status --positive Positive
      --device cpu --epochs "$epochs" --seed 0)
omics=(--omics "$cohort/omics.csv")

for run in "${runs[@]}"; do
    case $run in
        abmil) args=(--model abmil) ;;
        paper) args=("${omics[@]}" --preset paper) ;;
        no_distill) args=("${omics[@]}" --preset paper --alpha-omics 0 --alpha-wsi 0) ;;
        official) args=("${omics[@]}" --preset official) ;;
    esac
    [ "$run" = abmil ] || [ -d "$out/abmil/splits" ] || { echo "run_study.sh: run abmil first (its splits)" >&2; exit 2; }
    [ "$run" = abmil ] || args+=(--splits "$out/abmil/splits")
    [ -f "$out/$run/summary.json" ] && continue
    rm -rf "${out:?}/$run"
    start=$(date +%s)
    momkd train "${data[@]}" "${args[@]}" --out "$out/$run" > "$out/$run.log" 2>&1
    echo "$run $(( $(date +%s) - start ))" >> "$out/wall_times.txt"
done
python "$here/summarize.py" "$out" > "$out/results.md"
cat "$out/results.md"
