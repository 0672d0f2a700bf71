"""Xattn (Gheini, Ren and May, EMNLP 2021, "Cross-Attention is All You Need"): train only the
cross-attention of the towers that read another tower (and the task head).

What trains, as the official code (``fairseq_cli/train.py --only-finetune-cross-attn``: every
parameter whose name holds ``encoder_attn``): each cross-attention's query, key, value and output
projections (weights and biases) **and** the LayerNorm after its residual add. On BLIP those are
the text models' cross-attention to the image (``crossattention`` of every layer of the text
encoder, read by ITM and VQA, and of the text decoder, captioning and VQA answers):
28,366,848 parameters per BLIP-base text model (20.7 %), 28,348,416 with ``train_norms=False``.
The tower adapter names the modules (:meth:`vleff.backbones.base.TowerAdapter.cross_attention_parts`);
towers without cross-attention (ViT, CLIP) are refused.

The task head (``train_head``) is what the adapter says reads the tower (BLIP retrieval's
``itm_head``); the translation setting's new-language embeddings of the paper have no BLIP
counterpart. No parameter is added and the forward is untouched: the model starts exactly at the
frozen model, and :func:`remove_xattn` restores the ``requires_grad`` flags.

>>> vleff.apply_xattn(blip)                              # every text model's cross-attention trains
>>> vleff.apply_xattn(blip, text_models="decoder")       # captioning: the decoder's only
>>> vleff.remove_xattn(blip)                             # the flags as they were
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.backbones import TowerAdapter, find_towers
from vleff.checks import check_bool, check_choice, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import selection as sel

NAME = "xattn"
LABEL = "Xattn"
TOWERS = ("text",)
#: which of the text models that cross-attend train: all, the encoders (BLIP's ``text_encoder``:
#: ITM, VQA's question) or the causal decoders (BLIP's ``text_decoder``: captions, VQA's answers)
TEXT_MODELS = ("all", "encoder", "decoder")


@dataclass
class XattnConfig(MethodConfig):
    """Xattn's settings.

    Attributes:
        train_norms: the cross-attention's LayerNorm trains too (the official code: it matches
            ``encoder_attn``, as ``encoder_attn_layer_norm``); ``False``: the projections only.
        train_head: the task heads that read the chosen towers train (BLIP retrieval's ITM head).
        text_models: ``"all"``, ``"encoder"`` or ``"decoder"``: which text models that read the
            image by cross-attention train (VQA has both).
        towers: ``"text"``: cross-attention is in the text towers only.
    """

    method = NAME
    train_norms: bool = True
    train_head: bool = True
    text_models: str = "all"
    towers: str = "text"

    def __post_init__(self) -> None:
        self.train_norms = check_bool("train_norms", self.train_norms)
        self.train_head = check_bool("train_head", self.train_head)
        check_choice("text_models", self.text_models, TEXT_MODELS)
        check_towers(self.towers, TOWERS)


def _crosses(tower: TowerAdapter) -> bool:
    return any(tower.cross_attention_parts(b) is not None for b in tower.blocks())


def cross_attention_towers(model: nn.Module, text_models: str = "all") -> list[TowerAdapter]:
    """The towers of ``model`` whose blocks cross-attend, of the kind ``text_models`` names.

    Raises:
        TypeError: ``model`` has no tower with cross-attention (ViT, CLIP), naming its towers and
            what is supported; or none of the kind ``text_models`` names.
    """
    found = find_towers(model)
    crossing = [t for t in found if _crosses(t)]
    if not crossing:
        have = ", ".join(t.describe() for t in found) or "no tower"
        raise TypeError(
            f"{LABEL} does not support {type(model).__name__} (its towers: {have}): it tunes cross-attention "
            "only, and none of these towers reads another by cross-attention. Supported: text towers with "
            "cross-attention to the image (Hugging Face BLIP's text encoder and text decoder); ViT and CLIP "
            "towers have none (use BitFit, LoRA or a prompt method there)"
        )
    if text_models == "all":
        return crossing
    decoder = text_models == "decoder"
    chosen = [t for t in crossing if t.causal_decoder_in(model) == decoder]
    if not chosen:
        have = ", ".join(f"{t.describe()} ({'decoder' if t.causal_decoder_in(model) else 'encoder'})" for t in crossing)
        raise TypeError(
            f"text_models={text_models!r}: {type(model).__name__} has no cross-attending {text_models} "
            f"(it has: {have}); pass text_models= naming one it has, or 'all'"
        )
    return chosen


def cross_attention_names(model: nn.Module, text_models: str = "all", train_norms: bool = True) -> list[str]:
    """Full names of the cross-attention parameters Xattn trains in ``model`` (heads left out),
    in ``model.named_parameters()`` order."""
    ids: set[int] = set()
    for tower in cross_attention_towers(model, text_models):
        for block in tower.blocks():
            parts = tower.cross_attention_parts(block)
            if parts is None:
                continue
            modules = [*parts.projections, *([parts.norm] if train_norms and parts.norm is not None else [])]
            ids |= {id(p) for m in modules for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def head_names(model: nn.Module, towers: list[TowerAdapter]) -> list[str]:
    """Full names of the task heads' parameters that read ``towers`` (the adapters say which)."""
    ids = {id(p) for t in towers for head in t.task_heads(model) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def apply_xattn(model: nn.Module, config: XattnConfig | None = None, **settings: Any) -> nn.Module:
    """Train only the cross-attention of ``model``'s text models that read the image (and the
    task heads with ``train_head``), in place; applying again replaces. :func:`remove_xattn`
    undoes it exactly.

    Raises:
        TypeError: no tower of ``model`` cross-attends (ViT, CLIP), or none of ``text_models``.
        ValueError: another method that chooses the trained parameters is applied.
    """
    cfg = XattnConfig.build(config, **settings)
    if xattn_applied(model):
        remove_xattn(model)
    chosen = cross_attention_towers(model, cfg.text_models)
    names = cross_attention_names(model, cfg.text_models, cfg.train_norms)
    if cfg.train_head:
        names += [n for n in head_names(model, chosen) if n not in names]
    refuse_applied_conflicts(model, NAME)
    return sel.select_parameters(model, NAME, LABEL, chosen, names, cfg.as_dict(), train_head=False)


def remove_xattn(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_xattn`: the ``requires_grad`` flags as before, the input hooks gone."""
    return sel.release_parameters(model, NAME, LABEL)


def xattn_applied(model: nn.Module) -> bool:
    return sel.selected_in(model, NAME)


def xattn_settings(model: nn.Module) -> dict[str, Any]:
    return sel.applied_settings(model, NAME)


def xattn_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train under Xattn (cross-attention and heads)."""
    return sel.trainable_parameters(model, NAME)


def xattn_state_dict(model: nn.Module) -> dict[str, Any]:
    """The trained cross-attention's and heads' state: what an Xattn checkpoint keeps."""
    return sel.trainable_state_dict(model, NAME)
