#!/usr/bin/env bash
# Check the next releases before they reach users: build a virtual environment with the newest
# release of every dependency (no lock), the Hydra family's pre-releases included, then run the
# default test suite and the quick start in it.
#
#   bash/check-newest.sh [pytest arguments...]
#
# Environment (defaults in brackets):
#   VENV    [a new temporary folder, removed at the end]  reuse a folder to keep the environment
#   PYTHON  [python3]
#   NEWEST  [hydra-core>=1.4.0rc1 omegaconf>=2.4.1rc1 hydra-optuna-sweeper>=1.4.0rc1 hydra-ray-launcher>=1.4.0rc1]
#           requirements that admit pre-releases (pip takes a pre-release only where a requirement names one)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
NEWEST=${NEWEST:-"hydra-core>=1.4.0rc1 omegaconf>=2.4.1rc1 hydra-optuna-sweeper>=1.4.0rc1 hydra-ray-launcher>=1.4.0rc1"}
if [ -z "${VENV:-}" ]; then
  VENV=$(mktemp -d)/venv
  trap 'rm -rf "$(dirname "$VENV")"' EXIT
fi
[ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
# shellcheck disable=SC2086  # NEWEST is a list of requirements
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" $NEWEST
echo "+ newest set:"
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -i -E '^(torch|torchvision|pytorch-lightning|torchmetrics|hydra-core|omegaconf|hydra-optuna-sweeper|hydra-ray-launcher|ray|optuna|pytorch-ood|pandas|tensorboard)=='
echo "+ pytest $*"
"$VENV/bin/python" -m pytest -q "$@"
echo "+ quick start: python run.py"
out=$(mktemp -d)
"$VENV/bin/python" run.py paths.log_dir="$out"
ls "$out"/runs/*/*/results.csv
