"""Per-block sharding of supported towers (FSDP1 wrap policies and FSDP2 ``fully_shard``).

Fully sharded data parallel pays one all-gather per wrapped unit: one unit per transformer block
keeps a single block's full weights alive at a time and overlaps the next block's gather with the
current block's compute. The tower adapters already know which modules are the blocks of every
supported family, so the wrap policy is read from them rather than named per model class.

vleff's methods patch blocks through instance attributes (``block.forward``) and hooks, which
``fully_shard``'s class swap keeps; the methods are applied *before* sharding (Lightning runs
callbacks' ``setup`` before ``configure_model``), so the parameters they add are sharded with the
block or the root they live in.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = [
    "FORWARD_METHODS",
    "block_classes",
    "blocks_of",
    "fsdp_modules",
    "is_dtensor",
    "library_type",
    "placed_like",
    "shard_blocks",
]

#: methods of image-text models that run a forward without ``__call__`` (FSDP2 must be told to
#: gather the root's parameters around them: ``register_fsdp_forward_method``)
FORWARD_METHODS = ("encode_image", "encode_text", "get_image_features", "get_text_features", "generate")


def library_type(module: nn.Module) -> type:
    """The class ``module`` was built as: FSDP2's ``fully_shard`` swaps a module's class for a
    subclass (``FSDPBlock``, bases ``FSDPModule`` and ``Block``), which the adapters' exact class
    checks (a subclass of a block may compute something else) must see through."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return cls
    if issubclass(cls, FSDPModule):
        library = [base for base in cls.__bases__ if base is not FSDPModule]
        if len(library) == 1:
            return library[0]
    return cls


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every supported tower in ``model`` (``TypeError`` naming the
    supported families when ``model`` holds none)."""
    from vleff.backbones.towers import find_towers

    blocks: list[nn.Module] = []
    for tower in find_towers(model):
        blocks.extend(b for b in tower.blocks() if all(b is not seen for seen in blocks))
    return blocks


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The block classes of every tower in ``model``: Lightning's ``FSDPStrategy(auto_wrap_policy=...,
    activation_checkpointing_policy=...)`` takes this set as its per-block policy."""
    return {library_type(block) for block in blocks_of(model)}


def shard_blocks(model: nn.Module, mesh: Any = None, **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2: ``fully_shard`` every tower block of ``model``, then ``model`` itself (embeddings,
    heads, side networks and whatever else lives outside the blocks), and register the image-text
    forward methods (:data:`FORWARD_METHODS`) the model has. Call it in a LightningModule's
    ``configure_model`` under Lightning's ``ModelParallelStrategy``, with
    ``self.device_mesh["data_parallel"]`` as ``mesh``. Returns ``model``.

    ``fully_shard`` refuses 0-dim parameters (CLIP's ``logit_scale``): they stay whole on every
    rank (``ignored_params``), and their gradients are averaged over the ranks as DDP would."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh is not None:
        fully_shard_kwargs["mesh"] = mesh
    scalars = {p for p in model.parameters() if p.dim() == 0}
    if scalars:
        fully_shard_kwargs["ignored_params"] = scalars | set(fully_shard_kwargs.get("ignored_params") or ())
        group = mesh.get_group() if mesh is not None else None
        for p in scalars:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p, group=group: _average_grad(p, group))
    for block in blocks_of(model):
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    for name in FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    return model


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules in ``model``, ``model`` included; empty when none is.

    Their ``reshard()`` frees the parameters a forward gathered. A forward without a backward
    (MeZO's two losses) leaves the root's gathered: ``fully_shard`` keeps the root's parameters
    after forward for the backward it expects, so a later forward would run on that copy and not
    on shards changed in place since. Resharding after each forward makes the next one gather."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or state sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def placed_like(whole: Any, like: Any) -> Any:
    """``whole`` (a tensor of ``like``'s whole shape, the same on every rank) as ``like`` holds it:
    for a ``DTensor`` ``like``, a ``DTensor`` with its mesh and placements, each rank cutting its
    own piece out of ``whole`` (no communication: every rank has it); otherwise ``whole``. A
    method that draws or computes something whole (a mask, a direction, a projection's rows)
    thereby acts on exactly the entries of its shard that one process would."""
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def _average_grad(param: nn.Parameter, group: Any) -> None:
    """Average a replicated (unsharded) parameter's gradient over the ranks of ``group`` (gloo has
    no ``AVG``: a sum, then a division)."""
    import torch.distributed as dist

    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
    param.grad.div_(dist.get_world_size(group))
