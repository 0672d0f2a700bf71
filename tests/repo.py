"""Where the repository is, for tests that read its files (README, notebooks, benchmarks)."""

from __future__ import annotations

from pathlib import Path

#: the repository root
ROOT = Path(__file__).resolve().parents[1]
