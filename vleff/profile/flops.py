"""FLOP counting: :mod:`vleff.flops` (the counter itself sits below the methods, which use it —
MADTP calibrates τ to a measured FLOPs target); re-exported here beside the other meters."""

from __future__ import annotations

from vleff.flops import *  # noqa: F403
from vleff.flops import __all__  # noqa: F401
