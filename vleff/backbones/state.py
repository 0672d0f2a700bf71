"""Per-forward token state and the hook protocol that token methods implement.

A :class:`TokenState` lives for one forward pass of one tower. It is created when the
tower's first block runs, so it is fresh for every forward however the tower is called
(``model(x)``, ``forward_features``, ``encode_image`` ...), and it stays readable after the
forward for monitoring and visualisation (:func:`vleff.backbones.last_token_state`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class TokenState:
    """What token methods know about the current sequence of one tower forward.

    Attributes:
        num_prefix: leading tokens that methods must keep (cls, distillation, registers).
        num_input_tokens: tokens entering the first block.
        size: ``[B, N, 1]`` float32 count of input tokens each token stands for; ``None``
            while every token still stands for itself.
        source: ``[B, N, N0]`` which input tokens each token holds (only when a method asks
            for source tracking).
        keep: ``[B, N]`` soft/hard keep decisions for methods that mask instead of drop
            (DynamicViT training); dropped tokens receive no attention but attend to themselves.
        prop_attn: add ``log(size)`` to attention logits (proportional attention).
        token_counts: tokens entering each block, in order.
        aux_losses: auxiliary losses produced during this forward, by name.
        scratch: free space for methods (per-layer decisions etc.).
    """

    num_prefix: int
    num_input_tokens: int
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    prop_attn: bool = False
    token_counts: list[int] = field(default_factory=list)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    scratch: dict[str, object] = field(default_factory=dict)

    def sizes_or_ones(self, x: torch.Tensor) -> torch.Tensor:
        """Token sizes, materialising ones (float32) when no merge has happened yet."""
        if self.size is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
        return self.size

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive key bias ``[B, 1, 1, N]`` from token sizes, or ``None``."""
        if not self.prop_attn or self.size is None:
            return None
        return self.size[..., 0].log().to(dtype)[:, None, None, :]

    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        """Accumulate an auxiliary loss under ``name`` (summed if added twice)."""
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value


@dataclass
class BlockInfo:
    """What a hook sees between the attention and the MLP of one block.

    Attributes:
        index: block index in the tower.
        depth: number of blocks in the tower.
        keys: ``[B, H, N, Dh]`` attention keys of this block (after q/k norm).
        cls_attention: ``[B, N]`` attention from the first token to every token, averaged
            over heads; computed only when some hook asks for it.
    """

    index: int
    depth: int
    keys: torch.Tensor
    cls_attention: torch.Tensor | None = None


@runtime_checkable
class TokenHook(Protocol):
    """A token method's entry points into the generic block forward.

    Hooks run in installation order. ``start`` runs once per tower forward (before block 0),
    ``needs_cls_attention`` tells the block to compute the cls attention row, and
    ``between`` may change the token sequence (merge, prune, mask) between attention and MLP.

    Optional: a hook may also define ``before(x, index, depth, state) -> x``, which runs at the
    start of block ``index`` before its attention (used by methods that decide on the block's
    input, e.g. DynamicViT's predictors, so the whole block runs on the kept tokens).
    """

    name: str

    def start(self, state: TokenState, x: torch.Tensor) -> None: ...

    def needs_cls_attention(self, index: int) -> bool: ...

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor: ...
