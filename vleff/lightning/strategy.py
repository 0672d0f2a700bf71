"""The one home of vleff's checks on Lightning strategies.

Single device and DDP replicate every parameter; FSDP (Lightning's ``FSDPStrategy``, FSDP1, and
``ModelParallelStrategy``, FSDP2 ``fully_shard``), DeepSpeed and XLA's FSDP shard or flatten
them. Most methods do not notice (their parameters live in blocks or at the root and are
gathered around the forward; ``tests/lightning/test_fsdp.py`` trains every one of them sharded
and compares with one process). A method that cannot declares why in its registry entry
(``Method.unsharded``), and its callback calls :func:`check_strategy` in ``setup``, before the
model is touched, so the pair fails with that reason instead of a DTensor error or a hang.
"""

from __future__ import annotations

import lightning.pytorch as pl

__all__ = [
    "DTENSOR_STRATEGIES",
    "SHARDING_STRATEGIES",
    "check_strategy",
    "shards_as_dtensors",
    "shards_parameters",
    "whole_checkpoint",
]

#: class-name parts of the Lightning strategies that shard or flatten parameters
SHARDING_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")
#: those of them whose shards are ``DTensor`` parameters of the original shapes (FSDP2)
DTENSOR_STRATEGIES = ("ModelParallel",)


def _named(strategy: object, keys: tuple[str, ...]) -> bool:
    """Whether ``strategy``'s class or any base class (users' subclasses count) has one of ``keys`` in its name."""
    return any(key in cls.__name__ for cls in type(strategy).__mro__ for key in keys)


def shards_parameters(strategy: object) -> bool:
    """Whether ``strategy`` (a Lightning strategy object) shards or flattens the parameters."""
    return _named(strategy, SHARDING_STRATEGIES)


def shards_as_dtensors(strategy: object) -> bool:
    """Whether ``strategy`` shards each parameter as a ``DTensor`` of its own shape (FSDP2's
    ``fully_shard`` under ``ModelParallelStrategy``), not into flat buffers."""
    return _named(strategy, DTENSOR_STRATEGIES)


def check_strategy(trainer: pl.Trainer | None, method: str) -> None:
    """``RuntimeError`` naming the method, the strategy and the reason when ``trainer``'s strategy
    shards parameters and registered method ``method`` declares that it cannot train them (or
    cannot train them flattened, ``Method.needs_dtensor``). A
    callback's hook called without a trainer (a unit test, a hand-driven setup) has no strategy
    to refuse."""
    from vleff.registry import get_method

    entry = get_method(method)
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or not shards_parameters(strategy):
        return
    if entry.unsharded:
        raise RuntimeError(
            f"{entry.display_name} cannot run under {type(strategy).__name__}, which shards the "
            f"parameters: {entry.unsharded}. Use a single device or DDP (strategy='ddp')"
        )
    if entry.needs_dtensor and not shards_as_dtensors(strategy):
        raise RuntimeError(
            f"{entry.display_name} cannot run under {type(strategy).__name__}, which flattens the "
            f"parameters into shards: {entry.needs_dtensor}. Use ModelParallelStrategy with "
            "vleff.shard_blocks in configure_model (FSDP2), DDP (strategy='ddp') or a single device"
        )


def whole_checkpoint(trainer: pl.Trainer) -> bool:
    """Whether the tuners' side-only / adapter-only checkpoints must keep every key under
    ``trainer``'s strategy: a sharding strategy's distributed checkpoint is loaded by planning a
    read for every key of the sharded module, so a checkpoint without the frozen weights failed
    to resume (``Missing key in checkpoint state_dict: state_dict.model.cls_token``); each rank
    writes only its shard of them, so keeping them costs no rank the whole model."""
    return shards_parameters(trainer.strategy)
