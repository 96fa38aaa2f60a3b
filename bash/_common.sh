# shellcheck shell=bash
# Shared by bash/run-*.sh (sourced, not run). Every script:
#   * takes -n/--dry-run first: print the commands, run nothing;
#   * passes all further arguments through to run.py as Hydra overrides, e.g.
#     dataset_dir=/data trainer.gpus=1 hydra/launcher=ray_gpu;
#   * reads the lists it sweeps from environment variables (see each script), so that a
#     tiny smoke test is e.g. EXPERIMENTS=none SEEDS=1,2 bash/run-experiments.sh trainer.max_epochs=1
#   * prints each command (prefixed "+ ") before running it and exits non-zero when a sweep
#     failed (failed trials are listed by the sweep and in <sweep dir>/sweep_report.txt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"
STATUS=0

parse_dry_run() {  # sets DRY_RUN; the caller then shifts DRY_RUN_SHIFT arguments
    DRY_RUN_SHIFT=0
    if [[ $# -gt 0 && ( "$1" == "-n" || "$1" == "--dry-run" ) ]]; then
        DRY_RUN=1
        DRY_RUN_SHIFT=1
    fi
}

run() {  # print a command (shell-quoted), then run it unless dry run; remember failures
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ "$DRY_RUN" != 1 ]]; then
        "$@" || { STATUS=$?; echo "sweep failed (exit $STATUS): continuing" >&2; }
    fi
}

# experiment_args NAME...: "experiment=a,b" for those with a config; "none": no experiment
# (the quick-start on digits). Missing configs are skipped with a warning.
experiment_args() {
    local name found=()
    for name in "$@"; do
        if [[ "$name" == none ]]; then
            return 0
        elif [[ -f "$ROOT/config/experiment/$name.yaml" ]]; then
            found+=("$name")
        else
            echo "warning: skipping $name: no config/experiment/$name.yaml" >&2
        fi
    done
    if [[ ${#found[@]} -eq 0 ]]; then
        echo "error: none of the experiments exists: $*" >&2
        exit 2
    fi
    local IFS=,
    echo "experiment=${found[*]}"
}
