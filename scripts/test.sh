#!/usr/bin/env bash
# The whole test suite: set up .venv if needed, then pytest (extra arguments go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest -n 2 --dist loadfile "$@"
