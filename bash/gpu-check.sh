#!/usr/bin/env bash
# The GPU check, for anyone with a CUDA GPU (budget: 8 minutes on one H200):
#   1. the GPU tests (pytest -m gpu: tests/test_gpu.py and the GPU-only tests of other files);
#   2. experiment=cifar10-mchad at paper scale (WRN-40-2, 10 epochs, default callbacks) on a
#      CIFAR-10 image folder, tested against the two noise sets (the other OOD sets need
#      downloads), three times: (i) default settings, (ii) bf16-mixed (channels_last auto: on
#      for a GPU), (iii) the fastest the project offers: bf16-mixed + model.compile=reduce-overhead
#      (torch.compile with CUDA graphs);
#   3. python -m mchad.bench on the GPU: training Lightning vs bare loop with the GPU utilisation
#      and the host synchronisations per step, testing, start-up with CUDA's own start cost, and
#      8 packed trials against one alone (Ray if importable, else plain processes);
# then one summary table: seconds to the first training step, training seconds, images/s,
# GPU utilisation during training (nvidia-smi sampled every 0.5 s), test seconds, accuracy
# and AUROC per test case; the benchmark's figures (GPU busy, syncs per step, packed ratio,
# CUDA start cost); and where the time went (flagged when over budget).
#
#   bash/gpu-check.sh [-n|--dry-run] CIFAR10_FOLDER [WORK_DIR]
#
# CIFAR10_FOLDER holds train/<class>/* and test/<class>/* (e.g. cifar10-jpeg); WORK_DIR
# (default logs/gpu-check/<date>_<time>) receives the runs, logs and summary.txt. The project
# need not be installed: the repository's src/ goes in front of PYTHONPATH, which may hold
# the other packages (e.g. wheels unpacked with pip install --target). Environment: PYTHON
# [python, else python3]; SKIP_TESTS=1 skips step 1; BENCH_ARGS replaces step 3's arguments;
# ROW_SEEDS=21 adds the whole 21-seed CIFAR-10 row, 8 at once, to step 3 (over the budget).
# Exit status 1 when an argument is wrong or a step failed (the summary is printed anyway).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
set +e  # every step runs and reports, even after a failure

fail() { echo "error: $*" >&2; exit 1; }

[[ $# -ge 1 && $# -le 2 ]] || fail "usage: bash/gpu-check.sh [-n|--dry-run] CIFAR10_FOLDER [WORK_DIR]"
[[ "$1" != -* ]] || fail "unknown option $1 (only -n/--dry-run)"
DATA="$1"
[[ -d "$DATA/train" && -d "$DATA/test" ]] || fail "$DATA is not an image folder with train/ and test/ (CIFAR-10 as <split>/<class>/<image>)"
DATA="$(cd "$DATA" && pwd)"
WORK="${2:-$ROOT/logs/gpu-check/$(date +%Y-%m-%d_%H-%M-%S)}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
command -v "$PYTHON" >/dev/null 2>&1 || fail "no python (set PYTHON=/path/to/python)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export MCHAD_ROOT="$ROOT"
missing="$("$PYTHON" -c '
import importlib.util
print(" ".join(m for m in ("torch", "pytorch_lightning", "hydra", "omegaconf", "pytorch_ood", "mchad", "pytest", "pandas")
               if importlib.util.find_spec(m) is None))' 2>&1)" || fail "$PYTHON does not run: $missing"
[[ -z "$missing" ]] || fail "$PYTHON cannot import: $missing (put their wheels on PYTHONPATH)"
if [[ "$DRY_RUN" != 1 ]]; then
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || fail "no CUDA GPU visible to torch (this check is for a GPU machine)"
    mkdir -p "$WORK" || fail "cannot create $WORK"
fi

# phase NAME LOG COMMAND...: print and run COMMAND (output to LOG and the terminal), time it
# and record "NAME seconds status" in WORK/phases.txt
phase() {
    local name="$1" log="$2"; shift 2
    printf '+'; printf ' %q' "$@"; printf '\n'
    [[ "$DRY_RUN" == 1 ]] && return 0
    mkdir -p "$(dirname "$log")"
    local t0 t1 status
    t0=$(date +%s.%N)
    "$@" > >(tee "$log") 2>&1
    status=$?
    t1=$(date +%s.%N)
    echo "$name $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') $status" >> "$WORK/phases.txt"
    [[ $status == 0 ]] || { STATUS=1; echo "step $name failed (exit $status): continuing" >&2; }
}

# GPU utilisation every 0.5 s as "<epoch seconds> <percent>" into $1, in the background
SAMPLER=""
start_sampler() {
    [[ "$DRY_RUN" == 1 ]] && return 0
    command -v nvidia-smi >/dev/null 2>&1 || { echo "warning: no nvidia-smi: GPU utilisation n/a" >&2; return 0; }
    mkdir -p "$(dirname "$1")"
    ( while :; do
          echo "$(date +%s.%N) $(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -i 0 2>/dev/null)"
          sleep 0.5
      done > "$1" ) &
    SAMPLER=$!
}
stop_sampler() {
    [[ -n "$SAMPLER" ]] && { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; }
    SAMPLER=""
}
trap stop_sampler EXIT

echo "GPU check: data $DATA, results in $WORK, python $PYTHON, PYTHONPATH $PYTHONPATH"

# 1. the GPU test suite
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    phase gpu-tests "$WORK/gpu-tests.log" "$PYTHON" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m gpu "$ROOT/tests"
fi

# 2. the paper's run; the image folder is decoded once first (cached for both runs)
phase decode "$WORK/decode.log" "$PYTHON" -c '
import sys
from mchad.data import ImageFolderSource
for split in ("train", "test"):
    print(split, len(ImageFolderSource(sys.argv[1], split, size=32).load(sys.argv[2])), "images")' "$DATA" "$WORK/datasets"
PAPER=(experiment=cifar10-mchad datamodule=imagefolder "datamodule.root=$DATA" testmodules=noise trainer.gpus=1
       trainer.enable_progress_bar=false "dataset_dir=$WORK/datasets")
declare -A SETTINGS=(
    [default]=""
    [bf16]="trainer.precision=bf16-mixed"
    [fastest]="trainer.precision=bf16-mixed model.compile=reduce-overhead"
)
for name in default bf16 fastest; do
    folder="$WORK/$name"
    start_sampler "$folder/gpu_util.txt"
    # shellcheck disable=SC2086  # the settings are words
    phase "run-$name" "$folder/run.log" "$PYTHON" "$ROOT/run.py" "${PAPER[@]}" ${SETTINGS[$name]} "hydra.run.dir=$folder" \
        +callbacks.gpu_check_timer._target_=mchad.bench.gpu_check.run_timer "+callbacks.gpu_check_timer.out=$folder/timing.json" \
        "+callbacks.gpu_check_timer.started=$(date +%s.%N)"
    stop_sampler
done

# 3. the benchmark on the GPU (compile off: it would compile every repeat's new model again);
# its run folders and the packed trials' logs stay in WORK/bench-runs
read -r -a BENCH <<< "${BENCH_ARGS:---data cifar10 --root $DATA --backbone wrn40-2 --device cuda --precision bf16-mixed --repeats 3 --steps 50 --eval-repeats 1 --startup-repeats 1 --only train,eval,startup,packed --packed 8 --packed-steps 100 --row-seeds ${ROW_SEEDS:-0} --work-dir $WORK/bench-runs --set dataset_dir=$WORK/datasets}"
phase bench "$WORK/bench.log" "$PYTHON" -m mchad.bench.gpu_check bench "$WORK" -- "${BENCH[@]}"

if [[ "$DRY_RUN" != 1 ]]; then
    "$PYTHON" -m mchad.bench.gpu_check summary "$WORK" | tee "$WORK/summary.txt"
fi
exit "$STATUS"
