#!/usr/bin/env bash
# OpenOOD v1.5 (docs/openood.md): every method on CIFAR-10 and CIFAR-100 as ID data with
# OpenOOD's backbone, recipe and splits, 3 training runs each; one Hydra multirun (trials in
# parallel through Ray; failed trials do not stop the others and are listed at the end).
#
#   bash/run-openood.sh [overrides...] [-n|--dry-run]
#   bash/run-openood.sh openood_dir=/path/to/OpenOOD/data dataset_dir=/data hydra/launcher=ray_gpu
#
# Environment (defaults in brackets):
#   DATASETS     [cifar10 cifar100]
#   METHODS      [every method of the registry, src/mchad/registry/methods.yaml, in table order]
#   EXPERIMENTS  [every openood-<dataset>-<method> of the two above]
#   SEEDS        [1,2,3]  Hydra sweep syntax: 1,2,3 or range(1,4)
#   PYTHON       [python]
# Then: python -m mchad.results.aggregate <the sweep folder printed at the start>  (leaderboard.md|csv)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

DATASETS="${DATASETS:-cifar10 cifar100}"
if [[ -z "${METHODS:-}" ]]; then METHODS="$(registry keys)"; fi
SEEDS="${SEEDS:-1,2,3}"
if [[ -z "${EXPERIMENTS:-}" ]]; then
    EXPERIMENTS=""
    for dataset in $DATASETS; do
        for method in $METHODS; do
            EXPERIMENTS+="openood-$dataset-$method "
        done
    done
fi
# shellcheck disable=SC2086  # word splitting of the lists is intended
experiment="$(experiment_args $EXPERIMENTS)"

# every data set fetched (or checked) once before the sweep; offline compute nodes: docs/datasets.md
[[ "$DRY_RUN" == 1 ]] || "$PYTHON" -m mchad.data.prepare ${experiment:+"$experiment"} "$@" || exit 1
run "$PYTHON" "$ROOT/run.py" -m ${experiment:+"$experiment"} "seed=$SEEDS" "$@"
exit "$STATUS"
