#!/usr/bin/env bash
# Open-set recognition: all settings x methods x splits (x seeds), one Hydra multirun (trials
# in parallel through Ray; failed trials do not stop the others and are listed at the end).
# The experiments osr-<setting>-<method> are generated from the method registry
# (src/mchad/registry: its methods.yaml and OSR_SETTINGS; the class splits: src/mchad/data/osr.py).
#
#   bash/run-openset.sh [-n|--dry-run] [overrides...]
#   bash/run-openset.sh dataset_dir=/path/to/datasets hydra/launcher=ray_gpu
#   SETTINGS=cifar10 bash/run-openset.sh datamodule=imagefolder datamodule.root=/path/cifar10-jpeg
#
# Environment (defaults in brackets):
#   SETTINGS  [cifar10 cifarplus10 cifarplus50 tinyimagenet]
#   METHODS   [every method of the registry, src/mchad/registry/methods.yaml, in table order]
#   SPLITS    [0,1,2,3,4]  Hydra sweep syntax
#   SEEDS     [1]          Hydra sweep syntax: 1,2,3 or range(1,4)
#   PROTOCOL  [neal]       neal (Neal et al. 2018 via ARPL / Vaze et al.) or cac (Miller et al. 2021)
#   PYTHON    [python]
# Then: python -m mchad.results.aggregate <the sweep folder printed at the start>  (openset_<id_dataset>.*)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SETTINGS="${SETTINGS:-cifar10 cifarplus10 cifarplus50 tinyimagenet}"
SPLITS="${SPLITS:-0,1,2,3,4}"
SEEDS="${SEEDS:-1}"
PROTOCOL="${PROTOCOL:-neal}"
KNOWN_SETTINGS=" cifar10 cifarplus10 cifarplus50 tinyimagenet "

for setting in $SETTINGS; do
    [[ "$KNOWN_SETTINGS" == *" $setting "* ]] || { echo "error: unknown setting $setting (one of$KNOWN_SETTINGS)" >&2; exit 2; }
done
if [[ -z "${METHODS:-}" ]]; then METHODS="$(registry keys)"; fi
# the registry exits 2 naming an unknown method
# shellcheck disable=SC2086  # word splitting of the list is intended
names="$(registry experiments osr $METHODS)"
experiments=()
for setting in $SETTINGS; do
    for name in $names; do
        if [[ "$name" == "osr-$setting-"* ]]; then experiments+=("$name"); fi
    done
done
IFS=, experiment="experiment=${experiments[*]}"

# every data set fetched (or checked) once before the sweep; offline compute nodes: docs/datasets.md
[[ "$DRY_RUN" == 1 ]] || "$PYTHON" -m mchad.data.prepare "$experiment" "split=$SPLITS" "osr.protocol=$PROTOCOL" "$@" || exit 1
run "$PYTHON" "$ROOT/run.py" -m "$experiment" "split=$SPLITS" "osr.protocol=$PROTOCOL" "seed=$SEEDS" "$@"
exit "$STATUS"
