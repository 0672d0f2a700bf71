"""``EfficiencyMonitor``: FLOPs, tokens per layer, samples/s and activation memory while training.

Add it to any ``Trainer``; it needs nothing from the module except a ``forward`` that accepts
what ``example_input_fn(batch)`` returns::

    trainer = L.Trainer(callbacks=[TokenMerging(r=16), EfficiencyMonitor(), ThroughputMonitor(...)])

What it logs (``pl_module.log``, on step, never synced across processes):

* ``eff/gflops_per_sample`` — one training-mode, no-grad forward of the current batch shape
  (what training computes: DynamicViT's masked training forward runs every token, its
  eval-mode forward drops them),
  counted with :func:`vleff.profile.count_flops`, divided by the batch size. Counted on the
  first training batch and again whenever the tokens per layer change (a token-merging
  schedule), at most every ``recount_interval`` steps.
* ``eff/tokens_layer{i}`` — tokens entering block ``i`` of the image tower in the latest
  training forward (``eff/{modality}_tokens_layer{i}`` for other towers), when a token
  method is installed (:func:`vleff.backbones.token_counts`).
* ``eff/samples_per_s`` — this process's samples per second of compute (from batch start to
  batch end: forward, backward, optimizer; data loading and the monitor's own measurement
  excluded), over the last ``window`` steps. Under DDP it is per process, not global.
* ``eff/activation_mib`` — MiB saved for backward by one training-mode forward of the batch
  (:func:`vleff.profile.saved_activation_bytes`, parameters excluded), measured once, in the
  trainer's precision context.

It also sets ``pl_module.flops_per_batch`` = ``training_flops_factor`` (3, Lightning's and
the usual convention: backward ≈ 2× forward) × the forward FLOPs of one training batch, so
Lightning's :class:`~lightning.pytorch.callbacks.ThroughputMonitor` reports FLOP/s and MFU.

Measurement forwards run on ``pl_module`` itself (not the DDP wrapper, so no collective is
involved) with its train/eval flags, buffers and RNG state restored afterwards: adding the
monitor does not change what training computes. Every process measures for itself (the
numbers are identical; ``ThroughputMonitor`` needs ``flops_per_batch`` on every rank) and
logs with ``sync_dist=False``, so nothing can deadlock; the logger writes rank 0's values.
If a measurement fails (a forward that does not take the batch as given), the monitor warns
once, naming ``example_input_fn``, and keeps logging what it can.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from vleff.profile.compare import preserved_state
from vleff.profile.flops import count_flops
from vleff.profile.memory import saved_activation_bytes

__all__ = ["EfficiencyMonitor", "default_example_input"]

_INPUT_KEYS = ("pixel_values", "images", "image", "x", "inputs", "input")
MIB = 2**20

ExampleInput = tuple[tuple[Any, ...], dict[str, Any]]


def default_example_input(batch: Any) -> Any:
    """The forward input of a batch: ``batch[0]`` for a tuple/list (``(images, labels)``), the
    first of ``pixel_values``/``images``/``image``/``x``/``inputs``/``input`` for a mapping,
    else the batch itself."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("the batch is an empty sequence; pass example_input_fn")
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(
            f"cannot find the model input in a batch with keys {sorted(map(str, batch))}; "
            f"expected one of {_INPUT_KEYS} or pass example_input_fn=lambda batch: (...,)"
        )
    return batch


def forward_kwargs_from_batch(forward: Callable[..., Any], batch: Any) -> dict[str, Any] | None:
    """``{name: batch[name]}`` for ``forward``'s parameters when ``batch`` is a mapping holding
    every required one (e.g. ``forward(images, tokens)`` and a batch with those keys); else ``None``."""
    if not isinstance(batch, Mapping):
        return None
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in named if p.default is p.empty]
    if not required or not all(name in batch for name in required):
        return None
    return {p.name: batch[p.name] for p in named if p.name in batch}


def _as_call(inputs: Any) -> ExampleInput:
    """Turn ``example_input_fn``'s result into ``(args, kwargs)``: a tuple/list is positional
    arguments, a dict keyword arguments, anything else the single argument."""
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, list):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (inputs,), {}


def _first_batch_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


class EfficiencyMonitor(pl.Callback):
    """Log GFLOPs/sample, tokens per layer, samples/s and activation memory during ``fit``.

    Args:
        example_input_fn: ``batch -> forward input`` (a tensor, a tuple of positional
            arguments, or a dict of keyword arguments). Default: for a dict batch holding every
            required argument of the module's ``forward`` by name, those entries as keyword
            arguments (:func:`forward_kwargs_from_batch`); otherwise :func:`default_example_input`.
        batch_size_fn: ``batch -> int``; default: first dimension of the first input tensor.
        training_flops_factor: ``flops_per_batch`` = this × forward FLOPs (3: forward +
            backward ≈ 2× forward).
        measure_activation: measure ``eff/activation_mib`` once (one extra training forward).
        log_tokens: log tokens per layer when a token method is installed.
        window: steps averaged for ``eff/samples_per_s``.
        recount_interval: when the token counts change, recount FLOPs at most every this many
            steps (a per-step schedule would otherwise add a forward to every step).
        prog_bar: also show ``eff/gflops_per_sample`` and ``eff/samples_per_s`` in the
            progress bar.
    """

    def __init__(
        self,
        example_input_fn: Callable[[Any], Any] | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        training_flops_factor: float = 3.0,
        measure_activation: bool = True,
        log_tokens: bool = True,
        window: int = 20,
        recount_interval: int = 10,
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        # checked here so that a bad config fails when it is built, not at the first batch
        for name, fn in (("example_input_fn", example_input_fn), ("batch_size_fn", batch_size_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(
                    f"EfficiencyMonitor: {name}={fn!r} is not allowed; it must be a callable "
                    f"batch -> {'forward input' if name == 'example_input_fn' else 'int'}, or None "
                    "for the default"
                )
        if (
            isinstance(training_flops_factor, bool)
            or not isinstance(training_flops_factor, (int, float))
            or not math.isfinite(training_flops_factor)
            or training_flops_factor <= 0
        ):
            raise ValueError(
                f"EfficiencyMonitor: training_flops_factor={training_flops_factor!r} is not allowed; "
                "it must be a finite number > 0 (3: backward ~ 2x forward)"
            )
        for name, value in (("window", window), ("recount_interval", recount_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"EfficiencyMonitor: {name}={value!r} is not allowed; it must be an int >= 1 "
                    f"({'steps averaged for eff/samples_per_s' if name == 'window' else 'steps'})"
                )
        self.example_input_fn = example_input_fn
        self.batch_size_fn = batch_size_fn
        self.training_flops_factor = training_flops_factor
        self.measure_activation = measure_activation
        self.log_tokens = log_tokens
        self.window = window
        self.recount_interval = recount_interval
        self.prog_bar = prog_bar
        self._reset()

    def _reset(self) -> None:
        self.flops_per_sample: float | None = None  # forward FLOPs of one sample (eval mode)
        self.activation_bytes: int | None = None
        self.token_counts: dict[str, list[int]] = {}
        self._counts_seen = False  # the first training forward's counts are not a change
        self.recounts = 0  # how many times FLOPs were counted (for tests and curiosity)
        self._dirty = True
        self._failed: set[str] = set()
        self._last_count_step = -(10**9)
        self._step_start: float | None = None
        self._steps: deque[tuple[int, float]] = deque(maxlen=self.window)

    # --- measurement ----------------------------------------------------------------------------
    def _call_args(self, batch: Any, pl_module: pl.LightningModule) -> ExampleInput:
        if self.example_input_fn is not None:
            return _as_call(self.example_input_fn(batch))
        kwargs = forward_kwargs_from_batch(pl_module.forward, batch)
        if kwargs is not None:  # a dict batch whose keys name the forward's arguments
            return (), kwargs
        return _as_call(default_example_input(batch))

    def _batch_size(self, batch: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        if self.batch_size_fn is not None:
            return int(self.batch_size_fn(batch))
        size = _first_batch_dim(args, kwargs)
        if size is None:
            raise ValueError("cannot infer the batch size from the forward inputs; pass batch_size_fn")
        return size

    def _warn_once(self, what: str, err: BaseException) -> None:
        if what not in self._failed:
            self._failed.add(what)
            rank_zero_warn(
                f"EfficiencyMonitor could not measure {what}: {type(err).__name__}: {err}. "
                "If the module's forward does not take what example_input_fn(batch) returns "
                "(default: batch[0] of a tuple batch), pass example_input_fn=lambda batch: "
                "(args...) or a dict of keyword arguments."
            )

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Count FLOPs (and, the first time, activation bytes) on ``batch``; set ``flops_per_batch``."""
        try:
            args, kwargs = self._call_args(batch, pl_module)
            size = self._batch_size(batch, args, kwargs)
            with preserved_state(pl_module), trainer.precision_plugin.forward_context():
                pl_module.train()  # what training runs: DynamicViT masks in training, drops in eval
                flops = count_flops(pl_module, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a monitor must not stop training
            self._warn_once("FLOPs", err)
            return
        self.recounts += 1
        self.flops_per_sample = flops / size
        pl_module.flops_per_batch = int(round(self.training_flops_factor * flops))
        if self.measure_activation and self.activation_bytes is None and "activation memory" not in self._failed:
            try:
                with preserved_state(pl_module), trainer.precision_plugin.forward_context(), torch.enable_grad():
                    pl_module.train()
                    self.activation_bytes = saved_activation_bytes(lambda: pl_module(*args, **kwargs))
            except Exception as err:  # noqa: BLE001
                self._warn_once("activation memory", err)

    # --- hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # no batch exists yet: the first count happens at the first training batch
        self._reset()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._dirty and step - self._last_count_step >= (
            1 if self.flops_per_sample is None else self.recount_interval
        ):
            self.measure(trainer, pl_module, batch)
            self._dirty = False
            self._last_count_step = step
        self._sync(pl_module)
        self._step_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_start is not None:
            self._sync(pl_module)
            elapsed = time.perf_counter() - self._step_start
            self._step_start = None
            try:
                args, kwargs = self._call_args(batch, pl_module)
                size = self._batch_size(batch, args, kwargs)
            except Exception:  # noqa: BLE001 - reported by measure() already
                size = None
            if size is not None:
                self._steps.append((size, elapsed))
        self._update_token_counts(pl_module)
        self._log(pl_module)

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _update_token_counts(self, pl_module: pl.LightningModule) -> None:
        from vleff.backbones import token_counts

        counts = token_counts(pl_module)
        if self._counts_seen and counts != self.token_counts:
            self._dirty = True  # the model now processes a different number of tokens
        self.token_counts = counts
        self._counts_seen = True

    @property
    def samples_per_s(self) -> float | None:
        """Samples per second of compute over the last ``window`` steps (None before the first)."""
        total = sum(t for _, t in self._steps)
        return sum(n for n, _ in self._steps) / total if self._steps and total > 0 else None

    def _log(self, pl_module: pl.LightningModule) -> None:
        metrics: dict[str, float] = {}
        if self.flops_per_sample is not None:
            metrics["eff/gflops_per_sample"] = self.flops_per_sample / 1e9
        if self.samples_per_s is not None:
            metrics["eff/samples_per_s"] = self.samples_per_s
        if self.activation_bytes is not None:
            metrics["eff/activation_mib"] = self.activation_bytes / MIB
        if self.log_tokens:
            for modality, counts in self.token_counts.items():
                prefix = "eff/tokens_layer" if modality == "image" else f"eff/{modality}_tokens_layer"
                for i, n in enumerate(counts):
                    metrics[f"{prefix}{i}"] = float(n)
        for name, value in metrics.items():
            pl_module.log(
                name,
                value,
                on_step=True,
                on_epoch=False,
                sync_dist=False,
                batch_size=1,
                prog_bar=self.prog_bar and name in ("eff/gflops_per_sample", "eff/samples_per_s"),
            )
