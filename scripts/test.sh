#!/usr/bin/env bash
# The whole test suite, every tier (unit, api, dataplane, e2e, kernel), after installing what is missing.
# With CI=true a skipped test fails the run, and so does a run that collects no test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
printf '\n==> ruff check\n' >&2
.venv/bin/ruff check fabmesh tests bench
printf '\n==> import contracts\n' >&2
.venv/bin/lint-imports --no-logo
printf '\n==> pytest (all tiers)\n' >&2
eval "$(.venv/bin/python -m fabmesh.testenv.assets | sed 's/^/export /')"
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi
exit "$rc"
