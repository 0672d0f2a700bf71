#!/usr/bin/env bash
# The whole check: set up .venv if needed, lint and format check (ruff), the docs site's strict build (mkdocs),
# then pytest (extra arguments go to
# pytest; the suite includes the import-layering contracts, tests/conformance/test_import_contracts.py).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
ruff check --quiet .
ruff format --check --quiet .
# the documentation site: broken links, missing pages and docstring errors fail (mkdocs.yml: strict)
site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
exec python -m pytest -n 2 --dist loadfile "$@"
