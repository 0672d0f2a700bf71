"""MuE's layer-wise loss for image-text models trained contrastively (CLIP): vleff's addition.

MuE trains its exits with the task loss summed, unweighted, over every layer through the shared
head (``MuE_Task_Loss``: the decoder's language-model loss of ``output_layer(layer_norm(h_l))``).
A CLIP tower's "head" is its own pooling, final norm and projection, and its task loss is the
symmetric contrastive loss (InfoNCE over the batch, at the model's learned temperature). So an
exit after block ``l`` of a tower MuE is on is trained with that loss between the embedding the
tower would return from block ``l`` (:meth:`vleff.backbones.ModelPair.embed_block_output`, exactly
what the exit returns at inference) and the other tower's final embedding of the same step; the
last block's loss is the user's own and is not added again. Without it a CLIP fine-tuned for its
last layer gives early exits whose embeddings the other tower does not match (Digits-CLIP:
``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones.pairs import contrastive_loss, hold, pairs_in, partner
from vleff.backbones.patch import in_backward
from vleff.methods.mue.core import HOOK_NAME
from vleff.tokens.aux import set_module_aux_loss
from vleff.tokens.common import hooks_named


def _pair_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss of ``[B, D]`` embeddings (row ``i`` of each is pair ``i``), in float32."""
    normed = (F.normalize(t.float(), dim=-1) for t in (image, text))
    return contrastive_loss(*normed, logit_scale.float())


def exit_contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The unweighted sum of :func:`contrastive_loss` over every early exit of both towers.

    ``image`` ``[Li, B, D]`` and ``text`` ``[Lt, B, D]``: a tower's embeddings from each block it
    can exit after, its final embedding last (a tower without exits: just the final one); ``logit_scale``
    the learned log temperature. Each exit is paired with the other tower's final embedding; the two
    final embeddings are not paired (that is the user's loss)."""
    total = image.new_zeros((), dtype=torch.float32)
    for exit_embedding in image[:-1]:
        total = total + _pair_loss(exit_embedding, text[-1], logit_scale)
    for exit_embedding in text[:-1]:
        total = total + _pair_loss(image[-1], exit_embedding, logit_scale)
    return total


def require_grad(hint: str = "") -> None:
    """``RuntimeError`` for a training forward run without gradients (re-entrant gradient
    checkpointing does that): a layer-wise loss there would get none. Both layer-wise losses check it."""
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "MuE layerwise_loss: a training forward ran without gradients (re-entrant gradient checkpointing "
            f"does that), so the layer-wise loss would get none. Use non-re-entrant checkpointing{hint} or turn "
            "checkpointing off"
        )


class ContrastiveLayerwiseLoss:
    """Forward hooks that add :func:`exit_contrastive_loss` to the model's aux losses in training.

    On every block of each tower MuE is on (and the last block of the other tower) the block's
    output is embedded as the library would embed the tower's output; a tower's text ids are read
    where the tower takes them (its id embedding), as they say where the text is pooled. When a
    tower's last block has run, its embeddings wait for the other tower's of the same step (the
    pair rule of :func:`vleff.backbones.pairs.hold`: a forward whose partner never comes is
    dropped once a backward passes through it), and the loss is added as ``mue/layerwise``.
    Training forwards only; a block recomputed by gradient checkpointing adds nothing."""

    def __init__(self, model: nn.Module, loss_name: str) -> None:
        found = pairs_in(model)
        if len(found) != 1:
            raise ValueError(
                f"MuE's contrastive layer-wise loss needs one image-text model; {type(model).__name__} holds "
                f"{len(found)} ({', '.join(n or '(itself)' for n, _ in found)}): pass the callback module=<one of them>"
            )
        pair = found[0][1]
        if pair.logit_scale is None or not pair.has_contrastive_projections:
            raise TypeError(
                f"MuE's contrastive layer-wise loss trains exits with the model's contrastive loss at its learned "
                f"temperature; {type(model).__name__} has no logit_scale (supported: open_clip CLIP, transformers "
                "CLIPModel)"
            )
        self.pair, self.loss_name = pair, loss_name
        self.exiting = {hook.modality for hook in hooks_named(pair.model, HOOK_NAME) if hook.decoder is None}
        self.store: dict[str, Any] = {}
        self.embeddings: dict[str, list[torch.Tensor]] = {"image": [], "text": []}
        self.ids: torch.Tensor | None = None
        self.handles = []
        for tower in (pair.image_tower, pair.text_tower):
            blocks = tower.blocks()
            hooked = range(len(blocks)) if tower.modality in self.exiting else [len(blocks) - 1]
            for index in hooked:
                hook = functools.partial(self._block_hook, tower.modality, index == hooked[0], index == len(blocks) - 1)
                self.handles.append(blocks[index].register_forward_hook(hook))
        self.handles.append(pair.text_tower.id_embedding().register_forward_pre_hook(self._ids_hook))

    def _ids_hook(self, module: nn.Module, args: tuple) -> None:
        if module.training and not in_backward() and args:
            self.ids = args[0]

    def _block_hook(self, modality: str, first: bool, last: bool, block: nn.Module, args: Any, output: Any) -> None:
        if not block.training or in_backward():
            return
        require_grad()
        tokens = output[0] if isinstance(output, tuple) else output
        if first:
            self.embeddings[modality] = []
        ids = self.ids if modality == "text" else None
        self.embeddings[modality].append(self.pair.embed_block_output(modality, tokens, ids))
        if not last:
            return
        mine = torch.stack(self.embeddings[modality])
        self.embeddings[modality] = []
        other = partner(self.store, modality)  # a stale one (its forward backpropagated) is dropped
        self.store.clear()
        if other is None or other.shape[1] != mine.shape[1]:
            hold(self.store, modality, mine, tokens)
            return
        image, text = (mine, other) if modality == "image" else (other, mine)
        loss = exit_contrastive_loss(image, text, self.pair.logit_scale)
        set_module_aux_loss(self.pair.model, self.loss_name, loss)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.store.clear()
