#!/usr/bin/env bash
# Sets up everything, then runs ruff, mypy and every test tier (unit, integration, e2e, slow; gpu skips without CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PY="${VSEG_VENV:-.venv}/bin/python"
"$PY" -m ruff check schemas runtime producer worker tests bench || exit 1
"$PY" -m mypy || exit 1
"$PY" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi
exit "$rc"
