#!/usr/bin/env bash
# Regenerate requirements-lock.txt, the one tested set of versions that `pip install -r requirements.txt`
# installs: resolve setup.cfg's ranges (with bash/lock-holds.txt) in a brand-new virtual environment
# and write what pip chose. Refuses a pre-release that the holds do not name on purpose.
#   bash/lock-requirements.sh            # then run the suite (pytest) and commit the lock
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q -c bash/lock-holds.txt -e ".[test]"
frozen=$("$tmp/venv/bin/python" -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)==')
# named on purpose: these publish only pre-releases (ray[default]'s metrics exporter needs them)
PRE_OK='^(opentelemetry-exporter-prometheus|opentelemetry-semantic-conventions)=='
pre=$(grep -E '==[0-9.]+(a|b|rc|\.dev)[0-9]*' <<<"$frozen" | grep -v -E "$PRE_OK" || true)
if [ -n "$pre" ]; then
  echo "error: the resolved set holds pre-releases; add a hold to bash/lock-holds.txt or name them on purpose:" >&2
  echo "$pre" >&2
  exit 1
fi
{
  echo "# The tested versions: made by bash/lock-requirements.sh on $(date -u +%F) with $("$tmp/venv/bin/python" -V)."
  echo "# Do not edit by hand; requirements.txt applies it with -c."
  echo "$frozen"
} >requirements-lock.txt
echo "wrote requirements-lock.txt ($(wc -l <<<"$frozen") packages); now run the suite and commit it"
