# shellcheck shell=bash
# Shared by bash/run-*.sh (sourced, not run). Every script:
#   * takes -n/--dry-run anywhere among its arguments: print the commands, run nothing
#     (sourced without arguments, this file removes it from the script's own "$@");
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

parse_dry_run() {  # sets DRY_RUN and ARGS (the arguments without -n/--dry-run); then: set -- "${ARGS[@]}"
    ARGS=()
    local arg
    for arg in "$@"; do
        if [[ "$arg" == "-n" || "$arg" == "--dry-run" ]]; then
            DRY_RUN=1
        else
            ARGS+=("$arg")
        fi
    done
}

# sourced without arguments, `set --` here sets the sourcing script's own arguments
parse_dry_run "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}

quote() {  # an argument as the shell reads it back, quoted only where needed (printf %q writes \, for ,)
    if [[ "$1" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

run() {  # print a command (shell-quoted), then run it unless dry run; remember failures
    printf '+'
    local arg
    for arg in "$@"; do
        printf ' '
        quote "$arg"
    done
    printf '\n'
    if [[ "$DRY_RUN" != 1 ]]; then
        "$@" || { STATUS=$?; echo "sweep failed (exit $STATUS): continuing" >&2; }
    fi
}

registry() {  # python -m mchad.registry ARGS of this checkout: the methods (src/mchad/registry/methods.yaml)
    PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m mchad.registry "$@"
}

# experiment_args NAME...: "experiment=a,b" for those with a config (a file in config/experiment/
# or generated from the method registry); "none": no experiment (the quick-start on digits).
# Unknown names are skipped with a warning.
experiment_args() {
    local name found=() generated
    generated=" $(registry experiments paper | tr '\n' ' ')$(registry experiments openood | tr '\n' ' ')"
    for name in "$@"; do
        if [[ "$name" == none ]]; then
            return 0
        elif [[ -f "$ROOT/config/experiment/$name.yaml" || "$generated" == *" $name "* ]]; then
            found+=("$name")
        else
            echo "warning: skipping $name: no config/experiment/$name.yaml and no such method in src/mchad/registry/methods.yaml" >&2
        fi
    done
    if [[ ${#found[@]} -eq 0 ]]; then
        echo "error: none of the experiments exists: $*" >&2
        exit 2
    fi
    local IFS=,
    echo "experiment=${found[*]}"
}
