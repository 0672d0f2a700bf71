#!/usr/bin/env bash
# Serve the documentation site locally (MkDocs, live reload) at http://127.0.0.1:8000; extra arguments go
# to `mkdocs serve` (e.g. --dev-addr 0.0.0.0:8000). `bash scripts/docs.sh build` writes the static site to site/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
export NO_MKDOCS_2_WARNING=1
if [[ "${1:-}" == "build" ]]; then
  shift
  exec mkdocs build --strict "$@"
fi
exec mkdocs serve "$@"
