#!/usr/bin/env bash
# Open-set recognition: all settings x methods x splits (x seeds), one Hydra multirun (trials
# in parallel through Ray; failed trials do not stop the others and are listed at the end).
# The experiments osr-<setting>-<method> are generated in src/mchad/data/osr.py.
#
#   bash/run-openset.sh [-n|--dry-run] [overrides...]
#   bash/run-openset.sh dataset_dir=/path/to/datasets hydra/launcher=ray_gpu
#   SETTINGS=cifar10 bash/run-openset.sh datamodule=imagefolder datamodule.root=/path/cifar10-jpeg
#
# Environment (defaults in brackets):
#   SETTINGS  [cifar10 cifarplus10 cifarplus50 tinyimagenet]
#   METHODS   [mchad gmchad center gcenter cac gcac ii softmax]
#   SPLITS    [0,1,2,3,4]  Hydra sweep syntax
#   SEEDS     [1]          Hydra sweep syntax: 1,2,3 or range(1,4)
#   PROTOCOL  [neal]       neal (Neal et al. 2018 via ARPL / Vaze et al.) or cac (Miller et al. 2021)
#   PYTHON    [python]
# Then: python -m mchad.results.aggregate <the sweep folder printed at the start>  (openset_<id_dataset>.*)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

SETTINGS="${SETTINGS:-cifar10 cifarplus10 cifarplus50 tinyimagenet}"
METHODS="${METHODS:-mchad gmchad center gcenter cac gcac ii softmax}"
SPLITS="${SPLITS:-0,1,2,3,4}"
SEEDS="${SEEDS:-1}"
PROTOCOL="${PROTOCOL:-neal}"
KNOWN_SETTINGS=" cifar10 cifarplus10 cifarplus50 tinyimagenet "
KNOWN_METHODS=" mchad gmchad center gcenter cac gcac ii softmax "

experiments=()
for setting in $SETTINGS; do
    [[ "$KNOWN_SETTINGS" == *" $setting "* ]] || { echo "error: unknown setting $setting (one of$KNOWN_SETTINGS)" >&2; exit 2; }
    for method in $METHODS; do
        [[ "$KNOWN_METHODS" == *" $method "* ]] || { echo "error: unknown method $method (one of$KNOWN_METHODS)" >&2; exit 2; }
        experiments+=("osr-$setting-$method")
    done
done
IFS=, experiment="experiment=${experiments[*]}"

# every data set fetched (or checked) once before the sweep; offline compute nodes: docs/datasets.md
[[ "$DRY_RUN" == 1 ]] || "$PYTHON" -m mchad.data.prepare "$experiment" "split=$SPLITS" "osr.protocol=$PROTOCOL" "$@" || exit 1
run "$PYTHON" "$ROOT/run.py" -m "$experiment" "split=$SPLITS" "osr.protocol=$PROTOCOL" "seed=$SEEDS" "$@"
exit "$STATUS"
