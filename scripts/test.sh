#!/usr/bin/env bash
# The whole check: set up .venv if needed, lint and format check (ruff), then pytest (extra arguments go to
# pytest; the suite includes the import-layering contracts, tests/conformance/test_import_contracts.py).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
ruff check --quiet .
ruff format --check --quiet .
exec python -m pytest -n 2 --dist loadfile "$@"
