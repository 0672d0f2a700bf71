#!/usr/bin/env bash
# The main job: set up .venv if needed, then vleff-train (extra arguments are Hydra overrides).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec vleff-train "$@"
