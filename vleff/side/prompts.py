"""What the prompt methods share (VPT-deep, prefix-tuning / P-tuning v2, APrompt): learned keys and
values in front of every block's self-attention, through the generic block's seam
:meth:`vleff.backbones.TowerHook.attention_prefix`.

**Where the parameters live.** Each method registers one :class:`PromptModule` per tower on the
tower root (``vleff_vpt``, ``vleff_prefix``, ``vleff_aprompt``), so the prompts are in the model's
``parameters()`` and ``state_dict`` under the tower's own prefix, deep-copy and pickle with it, and
the shared side machinery (:mod:`vleff.side.common`: backbone freezing, eval mode, side-only state,
the unfrozen-backbone refusal) treats them as it treats VQT's queries. A :class:`PromptHook` on the
tower asks its module for block ``i``'s keys and values (``[1 or B, H, P, Dh]``); the block puts
them in front of the tokens' own, where every query sees them (causal and padding masks cover the
tokens only), and nothing reads them as tokens: no output row, no pooling change, the EOT index and
the positions of a text tower stay where the library put them.

**Why a prefix rather than inserted tokens.** VPT-deep's reference inserts the prompt tokens after
the class token and overwrites their slots before every later block: their outputs are never read,
so they act on the other tokens only through their keys and values in each block's attention. Those
keys and values are the block's own projections of the block's prompts (pre-norm: after its
``norm1``), which is what :class:`vleff.methods.vpt` returns here; the result is the reference's
(``tests/methods/vpt``: equal to the inserted-token forward to 1e-10 in float64) without shifting
any token, so pooling, registers, distillation tokens and token methods keep working.

**Gradient checkpointing.** The prompt parameters are used inside the blocks. Under the library's
*re-entrant* checkpointing a frozen tower's block input does not require grad, so the block is not
recomputed in backward and its prompts would silently get no gradient (tested: they get ``None``).
:func:`attach_prompts` therefore attaches the tower's input-gradient hooks
(:func:`vleff.backbones.input_grads.attach_input_grads`, as LoRA and the peft tuners do: timm's
block input made to require grad, Hugging Face BLIP text's embeddings computed out of place); with
them the gradients equal the run without checkpointing (the conformance suite checks both kinds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerAdapter, TowerHook
from vleff.backbones.input_grads import InputGradHandles
from vleff.side.hooked import attach_hooked, detach_hooked, hooked_modules


class PromptModule(nn.Module):
    """Base of a prompt method's trained parts on one tower: :meth:`prefix` gives block ``index``'s
    extra keys and values. Subclasses hold their parameters ``[depth, ...]``."""

    #: the hooks that let the prompts get gradients under re-entrant checkpointing
    #: (:func:`vleff.backbones.input_grads.attach_input_grads`; plain tuples: deep-copies and pickles)
    input_hooks: InputGradHandles | None = None

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout

    def prefix(
        self, adapter: TowerAdapter, info: BlockInfo, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        raise NotImplementedError

    def source(self, p: torch.Tensor, batch: int) -> torch.Tensor:
        """``p`` (``[P, ...]``) ready to use: ``[1, P, ...]``, or per sample ``[B, P, ...]`` with the
        method's dropout when training (each sample its own mask, as the references draw it on the
        batch-expanded prompts). Without gradients a view of a trainable parameter would still
        "require grad" with no ``grad_fn``, which torch's module tracker (``FlopCounterMode``) cannot
        hook: it is detached then."""
        if not torch.is_grad_enabled():
            p = p.detach()
        if self.training and self.dropout > 0:
            return F.dropout(p.unsqueeze(0).expand(batch, *p.shape), p=self.dropout, training=True)
        return p.unsqueeze(0)


def token_keys_values(
    adapter: TowerAdapter, block: nn.Module, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[B, H, P, Dh]`` the block computes for ``tokens`` (``[B, P, C]``) as if they
    were in its input: pre-norm blocks norm them first (``norm1``), post-norm blocks (BLIP's text
    layers) project the stream directly."""
    h = tokens if adapter.layout == "post_norm_cross" else adapter.parts(block).norm1(tokens)
    _, k, v = adapter.qkv(block, h)
    return k, v


def head_split(adapter: TowerAdapter, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, P, C]`` keys or values in the attention's width -> ``[B, H, P, Dh]`` (heads split as the
    block splits its own: contiguous ``Dh``-wide slices of ``C``)."""
    heads = adapter.attention_config(block).num_heads
    b, p, c = x.shape
    return x.reshape(b, p, heads, c // heads).transpose(1, 2)


def patch_fan_in(adapter: TowerAdapter) -> int | None:
    """``in_channels · p · p`` of the tower's patch embedding (its first ``Conv2d``), ``None`` for a
    tower without one (text): the fan-in VPT's and E2VPT's uniform init bounds are computed from."""
    conv = next((m for m in adapter.root.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.weight[0].numel())


def uniform_bound(fan_in: int, fan_out: int) -> float:
    """Xavier's uniform bound ``√(6 / (fan_in + fan_out))``."""
    return math.sqrt(6.0 / (fan_in + fan_out))


def token_bound(tower: TowerAdapter) -> float:
    """VPT's init bound for prompt *tokens* (``C`` wide): ``√(6 / (3·p·p + C))``, the patch
    embedding's fan-in and the width (±0.0625 on ViT-B/16); ``√(6 / (C + C))`` on a tower without a
    patch embedding (text: vleff's choice, the references are image-only)."""
    width = tower.embed_dim
    fan_in = patch_fan_in(tower) if tower.modality == "image" else None
    return uniform_bound(fan_in or width, width)


class PromptHook(TowerHook):
    """Hands the tower's :class:`PromptModule`'s keys and values to every block's attention. A plain
    object (the module is the tower root's submodule): the model deep-copies and pickles."""

    #: reads its module's parameters and writes nothing: a replayed block computes the same prefix
    replayable = True

    def __init__(self, name: str, adapter: TowerAdapter, module: PromptModule, config: Any) -> None:
        self.name = name  # type: ignore[misc]  # one hook per method, named after it
        #: ``config``: the method's settings, read back by the registry (``applied_settings``)
        self.adapter, self.module, self.config = adapter, module, config

    def attention_prefix(
        self, info: BlockInfo, state: TokenState, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.module.prefix(self.adapter, info, h)


def attach_prompts(
    model: nn.Module,
    name: str,
    module_name: str,
    config: Any,
    make_module: Callable[[TowerAdapter], PromptModule],
    refuse_conflicts: Callable[[nn.Module, str], None],
) -> nn.Module:
    """Apply a prompt method (:func:`vleff.side.hooked.attach_hooked` with :class:`PromptHook`):
    one ``make_module(tower)`` per tower the config names, the backbone frozen as every side method
    freezes it (:func:`detach_prompts` restores the flags)."""
    return attach_hooked(model, name, module_name, config, make_module, PromptHook, refuse_conflicts, PromptModule)


def detach_prompts(model: nn.Module, name: str, module_name: str) -> nn.Module:
    """Undo :func:`attach_prompts` exactly: no hook, no module, no input hook, the flags as before."""
    return detach_hooked(model, name, module_name, PromptModule)


def prompt_modules(model: nn.Module, module_name: str) -> list[PromptModule]:
    """The method's modules, one per tower that carries it."""
    return hooked_modules(model, module_name, PromptModule)
