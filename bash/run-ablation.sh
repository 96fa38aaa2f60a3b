#!/usr/bin/env bash
# The paper's weight ablations of G-MCHAD on CIFAR10: one multirun per weight, the other
# weights at the experiment's values; 100 epochs, validating 10 times per epoch.
#
#   bash/run-ablation.sh [overrides...] [-n|--dry-run]
#   bash/run-ablation.sh dataset_dir=/path/to/datasets hydra/launcher=ray_gpu
#
# Environment (defaults in brackets):
#   EXPERIMENT     [cifar10-gmchad]; "none" = the quick-start on digits
#   EPOCHS         [100]   min and max epochs (the cosine period follows min_epochs)
#   VAL_INTERVAL   [0.1]   trainer.val_check_interval: validate 10x per epoch
#   SEEDS          [1]
#   WEIGHTS_OE     [0,1e-6,...,1e-5]   (the paper's range(0,1.1e-5,1e-6), 11 values)
#   WEIGHTS_CE     [0,0.1,...,1.0]     (range(0,1.1,0.1))
#   WEIGHTS_CENTER [0,0.1,...,1.0]
#   PARAMETERS     [weight_oe weight_ce weight_center]  which ablations to run
# The alternative to grids: a search on validation data, e.g.
#   python run.py -m hydra/sweeper=optuna experiment=cifar10-gmchad hydra.sweeper.n_trials=40
# (docs/sweeps.md, "Hyperparameter search on validation data").
# Hydra's own float range() overshoots (range(0,1.1,0.1) also yields 1.1), hence the lists.
# results.csv's experiment column reads e.g. ablation-weight_oe-1e-06 (the swept value).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

EXPERIMENT="${EXPERIMENT:-cifar10-gmchad}"
EPOCHS="${EPOCHS:-100}"
VAL_INTERVAL="${VAL_INTERVAL:-0.1}"
SEEDS="${SEEDS:-1}"
TENTHS="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"
WEIGHTS_OE="${WEIGHTS_OE:-0,1e-6,2e-6,3e-6,4e-6,5e-6,6e-6,7e-6,8e-6,9e-6,1e-5}"
WEIGHTS_CE="${WEIGHTS_CE:-$TENTHS}"
WEIGHTS_CENTER="${WEIGHTS_CENTER:-$TENTHS}"
PARAMETERS="${PARAMETERS:-weight_oe weight_ce weight_center}"
experiment="$(experiment_args "$EXPERIMENT")"

for parameter in $PARAMETERS; do
    case "$parameter" in
        weight_oe) values="$WEIGHTS_OE" ;;
        weight_ce) values="$WEIGHTS_CE" ;;
        weight_center) values="$WEIGHTS_CENTER" ;;
        *) echo "error: unknown parameter $parameter (weight_oe, weight_ce, weight_center)" >&2; exit 2 ;;
    esac
    run "$PYTHON" "$ROOT/run.py" -m ${experiment:+"$experiment"} "model.$parameter=$values" "seed=$SEEDS" \
        "trainer.min_epochs=$EPOCHS" "trainer.max_epochs=$EPOCHS" "++trainer.val_check_interval=$VAL_INTERVAL" \
        "name=ablation-$parameter-\${model.$parameter}" "$@"
done
exit "$STATUS"
