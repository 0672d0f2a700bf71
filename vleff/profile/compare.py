"""Baseline against methods in one process: FLOPs, images/s, activation memory, as rows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from vleff.profile.flops import count_flops
from vleff.profile.memory import saved_activation_bytes
from vleff.profile.throughput import measure_throughput

__all__ = ["compare_models", "preserved_state"]

MIB = 2**20


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run an extra measurement forward without side effects on ``model`` or the RNG.

    Restores the train/eval flag of every submodule, the buffers (BatchNorm statistics a
    train-mode forward would update) and the CPU/CUDA random state (dropout draws), so a
    measurement does not change what training would otherwise compute.
    """
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"} - {None})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compare_models(
    models: Mapping[str, nn.Module],
    inputs: torch.Tensor,
    *,
    repeats: int = 5,
    warmup: int = 2,
    measure_memory: bool = True,
    progress: bool = True,
    compile_backend: str | None = None,
) -> list[dict[str, Any]]:
    """Measure every model on the same batch ``inputs``; the first entry is the baseline.

    Returns one row (a dict) per model with:

    * ``name``, ``batch_size``, ``params_m`` (millions of parameters)
    * ``gflops_per_sample`` — one eval-mode forward, counted (see :mod:`vleff.profile.flops`)
    * ``flops_ratio`` — this model's FLOPs divided by the baseline's (< 1 means fewer)
    * ``images_per_s`` / ``speedup`` — eval-mode, no-grad forwards timed interleaved, median of
      ``repeats`` after ``warmup`` calls; speedup = images/s over the baseline's
    * ``flop_limit_fraction`` — ``speedup × flops_ratio``: the share of the speed-up the FLOPs
      allow (``1/flops_ratio``) that the model reaches; 1.0 means the time fell as much as the
      FLOPs did (the baseline's is 1 by definition)
    * ``activation_mib`` — MiB saved for backward by one *train-mode* forward of the batch
      (what training would hold; parameters excluded), or ``None`` if ``measure_memory`` is off
    * with ``compile_backend`` (``"inductor"``, ``"eager"``...): the timed forwards run through
      ``torch.compile(model, backend=compile_backend)`` (FLOPs and memory are counted on the eager
      model, which computes the same thing), and ``compile_s`` holds the first compiled call's
      seconds (tracing and code generation)

    Each model's train/eval mode, buffers and the RNG state are restored afterwards.
    """
    if not models:
        raise ValueError("models is empty; pass at least the baseline")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise TypeError("inputs must be a batched tensor (first dimension = batch)")
    batch = int(inputs.shape[0])
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(preserved_state(model))
            model.eval()
        for name, model in models.items():
            flops = count_flops(model, inputs)
            rows.append(
                {
                    "name": name,
                    "batch_size": batch,
                    "params_m": _num_params(model) / 1e6,
                    "gflops_per_sample": flops / batch / 1e9,
                }
            )

        def forward(m: nn.Module):
            def call() -> None:
                with torch.no_grad():
                    m(inputs)

            return call

        timed = dict(models)
        if compile_backend is not None:
            timed = {name: torch.compile(m, backend=compile_backend) for name, m in models.items()}
            for row, call in zip(rows, (forward(m) for m in timed.values())):
                start = time.perf_counter()
                call()
                if inputs.is_cuda:  # the kernels queued by the first call are part of compiling
                    torch.cuda.synchronize(inputs.device)
                row["compile_s"] = time.perf_counter() - start
        timings = measure_throughput(
            {name: forward(m) for name, m in timed.items()},
            items_per_call=batch,
            warmup=warmup,
            repeats=repeats,
            progress=progress,
        )
        for row, model in zip(rows, models.values()):
            result = timings[row["name"]]
            row["images_per_s"] = result.items_per_s
            row["speedup"] = result.speedup
            row["activation_mib"] = None
            if measure_memory:
                model.train()
                with torch.enable_grad():
                    row["activation_mib"] = saved_activation_bytes(lambda m=model: m(inputs)) / MIB
                model.eval()
    base_flops = rows[0]["gflops_per_sample"]
    for row in rows:
        row["flops_ratio"] = row["gflops_per_sample"] / base_flops if base_flops > 0 else float("nan")
        row["flop_limit_fraction"] = row["speedup"] * row["flops_ratio"]
    order = [
        "name",
        "batch_size",
        "params_m",
        "gflops_per_sample",
        "flops_ratio",
        "images_per_s",
        "speedup",
        "flop_limit_fraction",
        "activation_mib",
    ]
    return [{k: row[k] for k in order} | {k: v for k, v in row.items() if k not in order} for row in rows]
