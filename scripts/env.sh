#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv; idempotent and quick when up to date.
# Sourced by scripts/train.sh and scripts/test.sh. Override the interpreter with PYTHON=python3.11.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLEFF_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.vleff-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[vleff] creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  echo "[vleff] installing vleff and its dependencies (about two minutes the first time)" >&2
  # torch's x86_64 wheel is the CUDA build: the environment takes about 6 GB. Say so before pip
  # fails half-way with "No space left on device".
  free_kb="$(df -Pk "$(dirname "$VENV")" 2>/dev/null | awk 'NR==2 {print $4}' || true)"
  if [[ -n "$free_kb" && "$free_kb" -lt 7340032 ]]; then
    echo "[vleff] warning: $((free_kb / 1048576)) GiB free where $VENV is made; the install needs about 7 GiB" >&2
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import vleff, torch, lightning, timm, open_clip, transformers, hydra, pytest" \
    || { echo "[vleff] installation failed" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
