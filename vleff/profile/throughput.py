"""Throughput as a ratio measured in one process: interleaved rounds, warm-up, median.

Why interleaved: on a shared or thermally throttled machine the speed drifts over minutes.
Timing the baseline for a minute and then the method for a minute puts that drift into the
ratio; running one call of each candidate per round (in a rotating order) exposes all of them
to the same conditions, and the median over rounds discards the odd slow round.
Absolute items/s are only meaningful on a quiet GPU; on a CPU report the speedup.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ThroughputResult", "measure_throughput", "progress_bar"]


@dataclass(frozen=True)
class ThroughputResult:
    """Timing of one candidate.

    Attributes:
        name: the candidate's key.
        times_s: seconds of each timed repeat (one call each), in round order.
        items_per_call: items (images, samples) one call processes.
        median_s: median of ``times_s``.
        items_per_s: ``items_per_call / median_s``.
        speedup: ``items_per_s`` divided by the first candidate's (1.0 for the first).
    """

    name: str
    times_s: list[float] = field(repr=False)
    items_per_call: int
    median_s: float
    items_per_s: float
    speedup: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_s": self.median_s,
            "items_per_s": self.items_per_s,
            "speedup": self.speedup,
            "items_per_call": self.items_per_call,
            "times_s": list(self.times_s),
        }


def _sync() -> None:
    """Wait for queued CUDA work so the timer measures the work, not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """A transient rich progress bar; yields ``advance()`` to call once per finished unit.

    With ``enabled=False`` it draws nothing (tests, logs, non-interactive runs).
    """
    if not enabled:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def measure_throughput(
    candidates: Mapping[str, Callable[[], object]],
    items_per_call: int,
    warmup: int = 2,
    repeats: int = 5,
    progress: bool = True,
) -> dict[str, ThroughputResult]:
    """Time each zero-argument callable ``repeats`` times, interleaved, after ``warmup`` calls.

    Round ``i`` calls every candidate once, starting at candidate ``i mod n`` (a rotating
    order, so no candidate always runs right after the same other one). Returns results in
    the candidates' order; ``speedup`` is relative to the first key.
    """
    if not candidates:
        raise ValueError("candidates is empty; pass at least one name -> callable")
    if items_per_call < 1:
        raise ValueError(f"items_per_call must be >= 1, got {items_per_call}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for name, fn in candidates.items():
        if not callable(fn):
            raise TypeError(f"candidate {name!r} must be a zero-argument callable, got {type(fn).__name__}")
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    total = len(names) * (warmup + repeats)
    with progress_bar(progress, "measuring throughput", total) as advance:
        for _ in range(warmup):
            for name in names:
                candidates[name]()
                advance()
        _sync()
        for i in range(repeats):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                _sync()
                start = time.perf_counter()
                candidates[name]()
                _sync()
                times[name].append(time.perf_counter() - start)
                advance()
    results: dict[str, ThroughputResult] = {}
    base_rate: float | None = None
    for name in names:
        median = statistics.median(times[name])
        rate = items_per_call / median if median > 0 else float("inf")
        if base_rate is None:
            base_rate = rate
        results[name] = ThroughputResult(
            name=name,
            times_s=times[name],
            items_per_call=items_per_call,
            median_s=median,
            items_per_s=rate,
            speedup=rate / base_rate,
        )
    return results
