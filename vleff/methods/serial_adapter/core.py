"""Serial adapter (Houlsby et al., ICML 2019): a bottleneck after the attention and after the MLP.

Each adapted sublayer output ``h`` becomes ``h + U·GELU(D·h + b_D) + b_U`` (``D``: ``d -> m``,
``U``: ``m -> d``; the adapter's own residual inside), before the block's layer scale, drop path
and residual add (:mod:`vleff.side.bottleneck`, the generic block's ``branch`` seam). That is the
official code's place (adapter-bert ``feedforward_adapter`` on the attention output and on the FFN
output, after their projection and dropout, before ``LayerNorm(x + ·)``): on BLIP's post-norm text
layers exactly there; on pre-norm ViT/CLIP blocks on ``attn(norm1(x))`` and ``mlp(norm2(x))``.

Settings as the official code: ``m`` = 64, ``D`` truncated normal with std 1e-3, biases zero;
trained: the adapters, **every LayerNorm of the tower** (its optimizer collection "layer_norm";
``train_norms=False`` leaves them frozen) and the head. One deliberate difference: ``U`` starts at
zero (the official code draws it like ``D``, a near-identity start) so the adapted model starts
exactly at the frozen one (``docs/fidelity.md``).

>>> vleff.apply_serial_adapter(model)   # ViT-B/16, m=64: 2,379,264 adapter weights (+ 38,400 LayerNorm)
>>> vleff.remove_serial_adapter(model)  # the original model and flags, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TowerAdapter
from vleff.checks import check_bool, check_int, check_number, check_towers
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

HOOK_NAME = "serial_adapter"
MODULE_NAME = "vleff_serial_adapter"
TOWERS = ("image", "text")


@dataclass
class SerialAdapterConfig(MethodConfig):
    """The serial adapter's settings.

    Attributes:
        bottleneck: the adapters' hidden width ``m`` (the official code's 64; the paper sweeps 8-256).
        init_std: std of the down-projection's truncated-normal init (the official 1e-3).
        train_norms: train every LayerNorm of the adapted towers too (the official code does).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "serial_adapter"
    bottleneck: int = 64
    init_std: float = 1e-3
    train_norms: bool = True
    towers: str = "image"

    def __post_init__(self) -> None:
        self.bottleneck = check_int("bottleneck", self.bottleneck, low=1)
        self.init_std = check_number("init_std", self.init_std, low=0.0, low_open=True)
        self.train_norms = check_bool("train_norms", self.train_norms)
        check_towers(self.towers, TOWERS)


class SerialAdapters(AdapterModule):
    """``attention[i]`` and ``mlp[i]``: block ``i``'s two bottlenecks (GELU)."""

    def __init__(self, depth: int, dim: int, cfg: SerialAdapterConfig) -> None:
        super().__init__(cfg.train_norms)
        make = lambda: nn.ModuleList(  # noqa: E731
            Bottleneck(dim, cfg.bottleneck, "gelu", down_std=cfg.init_std) for _ in range(depth)
        )
        self.attention, self.mlp = make(), make()

    def adapt(
        self, adapter: TowerAdapter, name: str, x: torch.Tensor, out: torch.Tensor, info: BlockInfo
    ) -> torch.Tensor:
        sites = self.attention if name == "attention" else self.mlp
        return out + sites[info.index](out)


def apply_serial_adapter(model: nn.Module, config: SerialAdapterConfig | None = None, **settings: Any) -> nn.Module:
    """Add a serial bottleneck adapter after every block's attention and MLP in every tower
    ``towers`` names (in place) and freeze the backbone but the adapters, a timm head and (with
    ``train_norms``) the towers' LayerNorms; applying again replaces the adapters (drawn anew).
    :func:`remove_serial_adapter` undoes it exactly.

    Raises:
        TypeError: no supported tower.
        ValueError: a conflicting method is applied.
    """
    cfg = SerialAdapterConfig.build(config, **settings)

    def make(tower: TowerAdapter) -> SerialAdapters:
        return SerialAdapters(len(tower.blocks()), tower.embed_dim, cfg)

    return attach_adapters(model, HOOK_NAME, MODULE_NAME, cfg, make, refuse_applied_conflicts)


def remove_serial_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_serial_adapter`: no hooks, no ``vleff_serial_adapter`` module, the flags as before."""
    return detach_adapters(model, HOOK_NAME, MODULE_NAME)


def serial_adapter_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def serial_adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters, over every tower (the LayerNorms it trains are not among them)."""
    return [p for m in adapter_modules(model, MODULE_NAME) for p in m.parameters()]


def serial_adapter_num_parameters(depth: int, dim: int, bottleneck: int) -> int:
    """Adapter parameters on one tower: two bottlenecks per block, ``2·depth·(2·d·m + m + d)``."""
    return 2 * depth * bottleneck_num_parameters(dim, bottleneck)
