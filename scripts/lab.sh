#!/usr/bin/env bash
# The lab: install what is missing, then `fabmesh lab up|status|down` (default: up).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >&2
eval "$(.venv/bin/python -m fabmesh.testenv.assets 2>/dev/null | sed 's/^/export /')"
exec .venv/bin/fabmesh lab "${@:-up}"
