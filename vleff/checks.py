"""Argument checks shared by every method's config (one home, one message style).

Each check returns the normalised value or raises ``ValueError`` naming the parameter, the
value it got and what is allowed, so a bad setting fails where it is written, not at fit time.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

TOWERS = ("image", "text", "all")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed; use True or False")
    return value


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    owner: str = "",
) -> float:
    """A finite real number in the given range (``low_open``: ``value > low`` instead of ``>=``);
    ``owner`` (``"MeZO"``) prefixes the message with the method the setting belongs to."""
    ok = _is_real(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low  # type: ignore[arg-type]
    if ok and high is not None:
        ok = float(value) < high if high_open else float(value) <= high  # type: ignore[arg-type]
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else (f"< {high}" if high_open else f"<= {high}")
        rule = " and ".join(p for p in (lo, hi) if p) or "finite"
        raise ValueError(
            f"{owner + ': ' if owner else ''}{name}={value!r} is not allowed; it must be a finite number {rule}"
        )
    return float(value)  # type: ignore[arg-type]


def check_ratio(name: str, value: object) -> float:
    """A number in (0, 1]."""
    if not _is_real(value) or not 0 < float(value) <= 1:  # type: ignore[arg-type]
        raise ValueError(f"{name}={value!r} is not allowed; it must be a number in (0, 1]")
    return float(value)  # type: ignore[arg-type]


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (low is not None and value < low):
        rule = f" >= {low}" if low is not None else ""
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer{rule}")
    return int(value)


def check_choice(name: str, value: object, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed; use one of {tuple(choices)}")
    return value


def check_towers(value: object, supported: Sequence[str]) -> str:
    """``towers`` is ``"image"``, ``"text"`` or ``"all"`` and the method supports what it names."""
    check_choice("towers", value, TOWERS)
    wanted = ("image", "text") if value == "all" else (value,)
    missing = [t for t in wanted if t not in supported]
    if missing:
        raise ValueError(
            f"towers={value!r} is not allowed; this method supports {' and '.join(supported)} "
            f"towers only (not {', '.join(missing)})"
        )
    return str(value)


def check_patterns(what: str, patterns: object) -> list[str]:
    """``patterns`` as a list of valid regular expressions, or ``ValueError`` naming ``what``.

    Called by the callbacks' constructors so that a bad ``targets``/``exclude``/``params``
    fails when the config is built, not at fit time after the model was set up.
    """
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ValueError(
            f"{what}={patterns!r} is not allowed; use None, a regular expression (str) or a list of "
            "them, searched in parameter names"
        )
    for pat in items:
        try:
            re.compile(pat)
        except re.error as err:
            raise ValueError(
                f"{what} pattern {pat!r} is not a valid regular expression ({err}); {what} takes "
                "regular expressions searched in parameter names, e.g. r'attn\\.qkv'"
            ) from None
    return list(items)
