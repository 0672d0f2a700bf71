"""Parallel adapter (He et al., ICLR 2022) / AdaptFormer (Chen et al., NeurIPS 2022): a scaled
bottleneck beside every block's MLP.

The MLP's output becomes ``MLP(norm2(x)) + s·U·ReLU(D·x')`` (``D``: ``d -> m``, ``U``: ``m -> d``,
dropout on the hidden activation), before the block's layer scale, drop path and residual add
(:mod:`vleff.side.bottleneck`, the generic block's ``branch`` seam). ``x'`` is what the adapter
reads: ``reads="stream"`` the residual stream before ``norm2`` (AdaptFormer's ``Block.forward``:
the adapter reads ``x`` unnormalised), ``reads="mlp_input"`` the MLP's own input ``norm2(x)`` (He et
al.'s ``Adapter_Layer`` at the FFN reads the FFN's input). On BLIP's post-norm text layers both are
the FFN's input (the attention output after its LayerNorm), as in BART.

Defaults as AdaptFormer's ViT code (``main_image.py``): ``m`` = 64, ``s`` = 0.1, dropout 0.1, init
"lora" (``D`` Kaiming-uniform, ``U`` and both biases zero: the adapted model starts exactly at the
frozen one); trained: the adapters and the head. He et al.'s FFN adapter is ``bottleneck=512,
scale=4, dropout=0, reads="mlp_input"``.

>>> vleff.apply_parallel_adapter(model)                   # ViT-B/16: 1,189,632 trainable adapter weights
>>> vleff.apply_parallel_adapter(model, bottleneck=512, scale=4.0, dropout=0.0, reads="mlp_input")  # 9,452,544
>>> vleff.remove_parallel_adapter(model)                  # the original model and flags, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TowerAdapter
from vleff.checks import check_bool, check_choice, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side.bottleneck import (
    AdapterModule,
    Bottleneck,
    adapter_modules,
    attach_adapters,
    bottleneck_num_parameters,
    detach_adapters,
)
from vleff.tokens.common import hooks_named

HOOK_NAME = "parallel_adapter"
MODULE_NAME = "vleff_parallel_adapter"
TOWERS = ("image", "text")
READS = ("stream", "mlp_input")


@dataclass
class ParallelAdapterConfig(MethodConfig):
    """The parallel adapter's settings (AdaptFormer's defaults).

    Attributes:
        bottleneck: the adapter's hidden width ``m`` (AdaptFormer's 64; He et al.'s 512).
        scale: ``s``, the branch's fixed scale (AdaptFormer's 0.1; He et al.'s 4).
        dropout: dropout on the hidden activation in training (AdaptFormer's 0.1).
        reads: ``"stream"`` (the residual stream before ``norm2``, AdaptFormer) or ``"mlp_input"``
            (the MLP's input, He et al.).
        train_norms: train every LayerNorm of the adapted towers too (neither reference does).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "parallel_adapter"
    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    reads: str = "stream"
    train_norms: bool = False
    towers: str = "image"

    def __post_init__(self) -> None:
        self.bottleneck = check_int("bottleneck", self.bottleneck, low=1)
        self.scale = check_number("scale", self.scale)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        self.reads = check_choice("reads", self.reads, READS)
        self.train_norms = check_bool("train_norms", self.train_norms)
        check_towers(self.towers, TOWERS)


class ParallelAdapters(AdapterModule):
    """``mlp[i]``: block ``i``'s bottleneck (ReLU) beside its MLP."""

    def __init__(self, depth: int, dim: int, cfg: ParallelAdapterConfig) -> None:
        super().__init__(cfg.train_norms)
        self.scale, self.reads = cfg.scale, cfg.reads
        self.mlp = nn.ModuleList(Bottleneck(dim, cfg.bottleneck, "relu", dropout=cfg.dropout) for _ in range(depth))

    def adapt(
        self, adapter: TowerAdapter, name: str, x: torch.Tensor, out: torch.Tensor, info: BlockInfo
    ) -> torch.Tensor:
        if name != "mlp":
            return out
        if self.reads == "mlp_input" and adapter.layout != "post_norm_cross":  # post-norm: x is the FFN's input
            x = adapter.parts(info.block).norm2(x)
        return out + self.scale * self.mlp[info.index](x)


def apply_parallel_adapter(model: nn.Module, config: ParallelAdapterConfig | None = None, **settings: Any) -> nn.Module:
    """Add a scaled bottleneck beside every block's MLP in every tower ``towers`` names (in place)
    and freeze the backbone but the adapters and a timm head (and the LayerNorms with
    ``train_norms``); applying again replaces the adapters (drawn anew).
    :func:`remove_parallel_adapter` undoes it exactly.

    Raises:
        TypeError: no supported tower.
        ValueError: a conflicting method is applied.
    """
    cfg = ParallelAdapterConfig.build(config, **settings)

    def make(tower: TowerAdapter) -> ParallelAdapters:
        return ParallelAdapters(len(tower.blocks()), tower.embed_dim, cfg)

    return attach_adapters(model, HOOK_NAME, MODULE_NAME, cfg, make, refuse_applied_conflicts)


def remove_parallel_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_parallel_adapter`: no hooks, no ``vleff_parallel_adapter`` module, the flags as before."""
    return detach_adapters(model, HOOK_NAME, MODULE_NAME)


def parallel_adapter_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def parallel_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters, over every tower."""
    return [p for m in adapter_modules(model, MODULE_NAME) for p in m.parameters()]


def parallel_adapter_num_parameters(depth: int, dim: int, bottleneck: int) -> int:
    """Adapter parameters on one tower: one bottleneck per block, ``depth·(2·d·m + m + d)``."""
    return depth * bottleneck_num_parameters(dim, bottleneck)
