#!/usr/bin/env bash
# The paper's radius study: hypersphere radius r = 0..20 for MCHAD and G-MCHAD on CIFAR10,
# one multirun over both experiments.
#
#   bash/run-vary-radius.sh [overrides...] [-n|--dry-run]
#   bash/run-vary-radius.sh dataset_dir=/path/to/datasets hydra/launcher=ray_gpu
#
# Environment (defaults in brackets):
#   EXPERIMENTS  [cifar10-mchad cifar10-gmchad]; "none" = the quick-start on digits
#   RADII        [range(0,21)]  Hydra sweep syntax: 0..20
#   SEEDS        [1]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

EXPERIMENTS="${EXPERIMENTS:-cifar10-mchad cifar10-gmchad}"
RADII="${RADII:-range(0,21)}"
SEEDS="${SEEDS:-1}"
# shellcheck disable=SC2086
experiment="$(experiment_args $EXPERIMENTS)"

run "$PYTHON" "$ROOT/run.py" -m ${experiment:+"$experiment"} "model.radius=$RADII" "seed=$SEEDS" "$@"
exit "$STATUS"
