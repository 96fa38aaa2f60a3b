#!/usr/bin/env bash
# All datasets x methods x seeds of the paper, one Hydra multirun (trials in parallel
# through Ray; failed trials do not stop the others and are listed at the end).
#
#   bash/run-experiments.sh [overrides...] [-n|--dry-run]
#   bash/run-experiments.sh dataset_dir=/path/to/datasets hydra/launcher=ray_gpu
#
# Environment (defaults in brackets):
#   DATASETS     [cifar10 cifar100 svhn]
#   METHODS      [every method of the registry, src/mchad/registry/methods.yaml, in table order]
#   EXPERIMENTS  [every <dataset>-<method> of the two above; "none" = the quick-start on digits]
#   SEEDS        [range(1,21)]  Hydra sweep syntax: 1,2,3 or range(1,21)
#   PRETRAINED   [<dataset_dir>/imagenet_wrn_baseline_epoch_99.pt]  the ImageNet WRN-40-2 every
#                published run started from (++model.pretrained_checkpoint); "none" = from scratch
#                (not comparable with the published numbers)
#   PYTHON       [python]
# Then: python -m mchad.results.aggregate <the sweep folder printed at the start>
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

DATASETS="${DATASETS:-cifar10 cifar100 svhn}"
if [[ -z "${METHODS:-}" ]]; then METHODS="$(registry keys)"; fi
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

# the pretrained start of the published runs: PRETRAINED, else in dataset_dir (the last
# dataset_dir= argument, else data/ beside run.py); the quick-start (EXPERIMENTS=none) has no WRN
default_folder=data  # config/train.yaml's dataset_dir default, beside run.py
dataset_dir="$ROOT/$default_folder"
for arg in "$@"; do
    [[ "$arg" == dataset_dir=* ]] && dataset_dir="${arg#dataset_dir=}"
done
pretrained="${PRETRAINED:-$dataset_dir/imagenet_wrn_baseline_epoch_99.pt}"
pretrained_arg=()
if [[ -n "$experiment" && "$pretrained" != none ]]; then
    if [[ ! -f "$pretrained" ]]; then
        message="pretrained checkpoint $pretrained not found: download Hendrycks' ImageNet WRN-40-2 (imagenet_wrn_baseline_epoch_99.pt, github.com/hendrycks/pre-training) into $dataset_dir, or set PRETRAINED=/path/to/it (PRETRAINED=none: from scratch, not comparable with the published numbers)"
        if [[ "$DRY_RUN" != 1 ]]; then
            echo "error: $message" >&2
            exit 1
        fi
        echo "warning: $message" >&2
    fi
    pretrained_arg=("++model.pretrained_checkpoint=$pretrained")
fi

# every data set fetched (or checked) once before the sweep; offline compute nodes: docs/datasets.md
[[ "$DRY_RUN" == 1 ]] || "$PYTHON" -m mchad.data.prepare ${experiment:+"$experiment"} "${pretrained_arg[@]}" "$@" || exit 1
run "$PYTHON" "$ROOT/run.py" -m ${experiment:+"$experiment"} "seed=$SEEDS" "${pretrained_arg[@]}" "$@"
exit "$STATUS"
