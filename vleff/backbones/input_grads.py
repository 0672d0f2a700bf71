"""Gradients into a frozen tower under re-entrant gradient checkpointing: the one home of the
hooks every method needs that freezes a tower and trains something inside its blocks (LoRA, the
peft tuners, adapters, prompts, selective tuning).

Two problems, one per kind of library:

* **The block input must require gradients.** Re-entrant checkpointing recomputes a block in
  backward only if one of the block's *inputs* requires gradients. A frozen tower's block input
  does not, so whatever trains inside the blocks silently gets no gradient. Hugging Face fixes
  this with ``enable_input_require_grads`` (called by its ``gradient_checkpointing_enable``);
  timm does not, so vleff makes the output of the module feeding the first block
  (:meth:`TowerAdapter.blocks_input_module`) require gradients: :class:`InputNeedsGrad`.
* **Hugging Face BLIP's text embeddings add in place.** Hugging Face's fix makes the frozen word
  embedding's output a *leaf* that requires gradients, and ``BlipTextEmbeddings`` then adds the
  position embeddings to it in place (``embeddings += position_embeddings``): "a leaf Variable
  that requires grad is being used in an in-place operation", on the unpatched model too.
  :class:`WordEmbeddingsOutOfPlace` looks the words up itself ahead of the embeddings module and
  hands them over as ``inputs_embeds``, copied when they are such a leaf — the values are the
  same, and the in-place add then acts on the copy.

Each tower adapter says which hooks its tower needs (:meth:`TowerAdapter.input_grad_hooks`);
methods call :func:`attach_input_grads` when applying and :func:`detach_input_grads` when
removing. Handles are plain ``(module, kind, hook id)`` tuples, so a model holding them
deep-copies and pickles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from vleff.backbones.base import TowerAdapter

#: kinds of hook :func:`attach_input_grads` registers: a forward hook, or a forward pre-hook
#: that sees and rewrites keyword arguments
FORWARD = "forward"
FORWARD_PRE_KWARGS = "forward_pre_kwargs"
KINDS = (FORWARD, FORWARD_PRE_KWARGS)

#: what :func:`attach_input_grads` returns and :func:`detach_input_grads` takes
InputGradHandles = list[tuple[nn.Module, str, int]]


class InputNeedsGrad:
    """Forward hook on the module feeding a tower's first block: while the tower runs under the
    library's re-entrant checkpointing with gradients on, its output is made to require them
    (a frozen module's output is a leaf without ``grad_fn``, so ``requires_grad_`` is allowed)."""

    def __init__(self, adapter: TowerAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if (
            isinstance(output, torch.Tensor)
            and not output.requires_grad
            and torch.is_grad_enabled()
            and self.adapter.gradient_checkpointing()
        ):
            return output.requires_grad_(True)
        return None


class WordEmbeddingsOutOfPlace:
    """Forward pre-hook (with keyword arguments) on a BERT-style embeddings module that adds its
    position embeddings in place (Hugging Face BLIP's text): the word embeddings are looked up
    here and passed as ``inputs_embeds``, copied when the lookup returned a leaf that requires
    gradients (what Hugging Face's ``enable_input_require_grads`` hook makes of a frozen
    embedding's output). Calls it leaves alone: no gradients, ``inputs_embeds`` given, or
    positional arguments beyond ``input_ids``."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        if not torch.is_grad_enabled() or len(args) > 1 or kwargs.get("inputs_embeds") is not None:
            return None
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            return None
        embeds = module.word_embeddings(input_ids)
        if embeds.is_leaf and embeds.requires_grad:
            embeds = embeds.clone()
        return (), {**kwargs, "input_ids": None, "inputs_embeds": embeds}


def attach_input_grads(towers: list[TowerAdapter]) -> InputGradHandles:
    """Register the hooks each tower needs (:meth:`TowerAdapter.input_grad_hooks`) so that what
    trains inside its frozen blocks gets gradients under re-entrant checkpointing."""
    handles: InputGradHandles = []
    for tower in towers:
        for module, kind, hook in tower.input_grad_hooks():
            if kind == FORWARD:
                handle = module.register_forward_hook(hook)
            elif kind == FORWARD_PRE_KWARGS:
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                raise ValueError(f"input_grad_hooks of {type(tower).__name__} gave kind={kind!r}; allowed: {KINDS}")
            handles.append((module, kind, handle.id))
    return handles


def detach_input_grads(handles: InputGradHandles) -> None:
    """Remove hooks :func:`attach_input_grads` registered (ids already gone are ignored)."""
    for module, kind, hook_id in handles:
        if kind == FORWARD:
            module._forward_hooks.pop(hook_id, None)
        else:
            module._forward_pre_hooks.pop(hook_id, None)
            module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
