#!/usr/bin/env bash
# All datasets x methods x seeds of the paper, one Hydra multirun (trials in parallel
# through Ray; failed trials do not stop the others and are listed at the end).
#
#   bash/run-experiments.sh [overrides...] [-n|--dry-run]
#   bash/run-experiments.sh dataset_dir=/path/to/datasets hydra/launcher=ray_gpu
#
# Environment (defaults in brackets):
#   DATASETS     [cifar10 cifar100 svhn]
#   METHODS      [mchad gmchad center gcenter cac gcac ii softmax]
#   EXPERIMENTS  [every <dataset>-<method> of the two above that has config/experiment/*.yaml;
#                 "none" = the quick-start on digits]
#   SEEDS        [range(1,21)]  Hydra sweep syntax: 1,2,3 or range(1,21)
#   PYTHON       [python]
# Then: python -m mchad.aggregate <the sweep folder printed at the start>
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
parse_dry_run "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}

DATASETS="${DATASETS:-cifar10 cifar100 svhn}"
METHODS="${METHODS:-mchad gmchad center gcenter cac gcac ii softmax}"
SEEDS="${SEEDS:-range(1,21)}"
if [[ -z "${EXPERIMENTS:-}" ]]; then
    EXPERIMENTS=""
    for dataset in $DATASETS; do
        for method in $METHODS; do
            EXPERIMENTS+="$dataset-$method "
        done
    done
fi
# shellcheck disable=SC2086  # word splitting of the lists is intended
experiment="$(experiment_args $EXPERIMENTS)"

run "$PYTHON" "$ROOT/run.py" -m ${experiment:+"$experiment"} "seed=$SEEDS" "$@"
exit "$STATUS"
