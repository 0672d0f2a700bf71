#!/usr/bin/env bash
# The prepared GPU run (issue 28): kernels, token-method throughput and training memory on one CUDA GPU,
# written to docs/data/gpu/<date>.json and .md. Arguments go to benchmarks/gpu_suite.py
# (--budget-s, --jobs, --out; --device cpu --tiny for a dry run of the plumbing).
# Uses the current python when it already imports vleff's dependencies (a GPU machine's own image),
# else the project's .venv (scripts/env.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import torch, timm, open_clip, hydra, vleff" 2>/dev/null; then
  source "$ROOT/scripts/env.sh"
  PY=python
fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_suite.py "$@"
