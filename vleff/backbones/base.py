"""The adapter contract: how vleff reads one pre-norm transformer tower of a library.

Every supported tower computes, per block::

    x = x + drop_path1(ls1(attn_out(attention(qkv(norm1(x))))))
    x = x + drop_path2(ls2(mlp(norm2(x))))

An adapter exposes those pieces for one family (timm, open_clip, Hugging Face CLIP/BLIP);
:mod:`vleff.backbones.block` runs them generically so that every token method is written
once for all families.

A second layout, ``"post_norm_cross"`` (:attr:`TowerAdapter.layout`), covers BERT-style text
towers with image cross-attention (Hugging Face BLIP's text encoder and decoder)::

    x = norm1(x + attn_out(attention(qkv(x))))     # self-attention, padding/causal mask
    x = cross_attention(x, image_embeds)            # only when the library passes image embeds
    x = norm2(x + ffn(x))

:func:`vleff.backbones.block.run_post_norm_block` runs it with the same hook entry points;
``between`` falls after the self-attention, before the cross-attention.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from vleff.backbones.hooks import TowerHook

Modality = Literal["image", "text"]
Pooling = Literal["cls", "avg", "eot", "map", "none"]
#: how a tower's blocks compose their branches (see the module docstring)
Layout = Literal["pre_norm", "post_norm_cross"]
LAYOUTS: tuple[str, ...] = ("pre_norm", "post_norm_cross")


@dataclass(frozen=True)
class BlockParts:
    """The residual-branch modules of one block (``nn.Identity`` where a library has none)."""

    norm1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls1: nn.Module
    ls2: nn.Module
    drop_path1: nn.Module
    drop_path2: nn.Module


@dataclass(frozen=True)
class AttentionWeights:
    """A block's attention projections as live parameters (methods that copy or read them, LST):
    the fused ``[3C, C]`` query/key/value weight and bias (concatenated where the library keeps
    three ``nn.Linear``), the output ``nn.Linear``, and ``sources``: the parameters they come from,
    by role (``qkv`` or ``q``/``k``/``v``, ``out``)."""

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: nn.Linear
    sources: dict[str, torch.Tensor]


@dataclass(frozen=True)
class CrossAttentionParts:
    """A block's cross-attention (its tokens reading another tower's): the query, key, value and
    output projections, and the norm after its residual add (``None`` where the library has none).
    Selective methods that train cross-attention only (Xattn) ask for these modules instead of
    naming a library's attributes."""

    projections: tuple[nn.Module, ...]
    norm: nn.Module | None


@dataclass(frozen=True)
class AttentionConfig:
    """How a block's own attention computes, so the generic path reproduces it exactly.

    Attributes:
        num_heads: attention heads.
        scale: logit scale (usually ``head_dim ** -0.5``).
        dropout_p: attention-probability dropout in training.
        fused: the library calls ``F.scaled_dot_product_attention`` (else explicit softmax).
        softmax_fp32: the explicit path computes the softmax in float32 (Hugging Face eager).
    """

    num_heads: int
    scale: float
    dropout_p: float
    fused: bool
    softmax_fp32: bool = False


@dataclass(frozen=True)
class CrossInputs:
    """What a ``post_norm_cross`` block gets besides its tokens, read from the library's call.

    Attributes:
        encoder_hidden_states: ``[B, M, C]`` image embeddings the cross-attention reads (``None``:
            the library skips cross-attention, e.g. BLIP's text-only ITC path).
        encoder_attention_mask: the library's additive mask over those ``M`` keys, or ``None``.
        cache: the library's key/value cache (generation), or ``None``.
        rows: under a cache, when only part of the batch runs the block (early exit): the ``[b]``
            batch rows that run it (the cache holds every row; the other inputs hold these rows).
        skipped: then the rows that skip it and their self-attention cache entries for the new
            positions, ``(rows, keys, values)`` (:meth:`TowerHook.skipped_cache`).
    """

    encoder_hidden_states: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    cache: object | None = None
    rows: torch.Tensor | None = None
    skipped: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class TowerAdapter(ABC):
    """Access to one transformer tower (an image or a text encoder) of a supported family.

    Subclasses set ``family`` and implement the abstract methods; they never change the
    model. Instances are cheap and hold only a reference to the tower's root module.
    """

    family: str = ""
    modality: Modality = "image"
    #: block layout; ``"post_norm_cross"`` adapters also implement the post-norm methods below
    layout: Layout = "pre_norm"

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    # --- tower level -------------------------------------------------------------------
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order."""

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """Leading tokens that are not patches/words (cls, distillation, registers)."""

    @property
    def has_cls_token(self) -> bool:
        """Whether token 0 is a class token that pooling reads."""
        return self.pooling == "cls"

    @property
    @abstractmethod
    def pooling(self) -> Pooling:
        """How the tower pools its output tokens."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Token width."""

    # --- block level -------------------------------------------------------------------
    @abstractmethod
    def parts(self, block: nn.Module) -> BlockParts:
        """The norm / MLP / layer-scale / drop-path modules of ``block``."""

    @abstractmethod
    def attention_config(self, block: nn.Module) -> AttentionConfig:
        """How ``block`` computes attention."""

    @abstractmethod
    def qkv(self, block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[B, H, N, Dh]`` from the normed input ``h``."""

    @abstractmethod
    def attn_out(self, block: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Output projection (and dropout) of the head-merged attention output ``o``."""

    #: blocks take ``[N, B, C]`` (open_clip with ``batch_first=False``)
    sequence_first: bool = False

    @abstractmethod
    def block_inputs(self, block: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Read ``(x, attention mask or None, is_causal)`` from the arguments of ``block.forward``."""

    # --- text towers -------------------------------------------------------------------------
    def id_embedding(self) -> nn.Module | None:
        """Text towers: the module that receives the token ids (the patch reads the ids from it
        to find the EOT); ``None`` for image towers."""
        return None

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` position of each sample's EOT token, by the library's own pooling rule."""
        raise NotImplementedError(f"{self.describe()} is not a text tower")

    def causal_decoder_in(self, model: nn.Module) -> bool:
        """Whether ``model`` runs this tower as a *causal decoder*: a tower whose every output
        position is a prediction under a causal mask (BLIP's captioning/answer decoder,
        teacher-forced in training). Token methods that decide a reduction on the whole
        sequence refuse such a tower: an earlier position's output would depend on later tokens.
        A causal *encoder* pooled at its EOT (CLIP's text tower) is not a decoder: only its pooled
        output, which sees every real token anyway, is its result. Default: ``False``."""
        return False

    def unsupported_reason(self) -> str | None:
        """Why vleff cannot run this tower although its class matched (a variant the adapter's
        layout does not cover), or ``None``. Asked before any hook attaches, so such a tower is
        refused when a method is applied, never at its first forward."""
        return None

    def entry_guards(self) -> dict[str, Any]:
        """Callables set on the tower root (instance attributes, removed with the patch) in place
        of library entry points whose output is wrong once tokens are reduced; each calls the
        class's own method and refuses what it cannot give. Default: none."""
        return {}

    def blocks_input_module(self) -> nn.Module | None:
        """The module whose output the library hands to the first block (timm's ``norm_pre``), for
        methods that must make that input require gradients: under re-entrant checkpointing a
        frozen tower's blocks give trainable adapters inside them no gradient otherwise.
        ``None``: the library needs nothing (its checkpointing is non-re-entrant or handles it)."""
        return None

    def input_grad_hooks(self) -> list[tuple[nn.Module, str, Callable[..., Any]]]:
        """``(module, kind, hook)`` triples that let what trains inside this frozen tower's blocks
        get gradients under re-entrant checkpointing (:mod:`vleff.backbones.input_grads`; ``kind``
        one of its ``KINDS``). Default: make the output of :meth:`blocks_input_module` require
        gradients, where there is one."""
        from vleff.backbones.input_grads import FORWARD, InputNeedsGrad

        feeder = self.blocks_input_module()
        return [] if feeder is None else [(feeder, FORWARD, InputNeedsGrad(self))]

    def skipped_companions(self) -> list[str]:
        """Towers of the same model that vleff recognises but cannot run (an open_clip CLIP's
        convolutional image tower), described for a warning when ``towers="all"`` meets them."""
        return []

    def layout_hook(self) -> TowerHook | None:
        """A tower-level hook the patch runs ahead of every method's hooks (text towers that keep
        their padding mask right under reductions); ``None`` when the tower needs none. Towers
        with an :meth:`id_embedding` get :class:`vleff.backbones.text.TextLayout` instead."""
        return None

    # --- post-norm towers (layout "post_norm_cross") ------------------------------------------
    def cross_inputs(self, block: nn.Module, *args, **kwargs) -> CrossInputs:
        """Read the image embeddings, their mask and the cache from the arguments of ``block.forward``."""
        raise NotImplementedError(f"{self.describe()} has layout {self.layout!r}; it has no cross inputs")

    def cached_kv(
        self, block: nn.Module, k: torch.Tensor, v: torch.Tensor, cross: CrossInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention keys and values with the library's cache applied (past keys in front;
        the cache is updated as the library would). Without a cache: ``k, v`` unchanged."""
        return k, v

    def cache_length(self, cache: Any) -> int:
        """How many positions the library's key/value ``cache`` holds before this forward's (the
        decoder's generation step). Towers without a cache: ``0``."""
        return 0

    def cache_entries(
        self, cache: Any, block: nn.Module, rows: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``block``'s self-attention cache entries (keys, values) of the last ``count`` positions
        for the samples ``rows``."""
        raise self.unsupported("reading key/value cache entries")

    def append_cache(self, cache: Any, block: nn.Module, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Add new positions to ``block``'s self-attention cache when no sample runs it: every row
        of the batch gets ``keys``/``values`` (``rows``: all the batch's rows, in that order)."""
        raise self.unsupported("adding key/value cache entries")

    def cross_attention(self, block: nn.Module, x: torch.Tensor, cross: CrossInputs) -> torch.Tensor:
        """The block's cross-attention sub-layer, residual and norm included (``x`` unchanged
        when the library passes no image embeddings)."""
        return x

    def ffn(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward branch output before its residual add and norm (a method that wraps
        the FFN, MemVP, wraps this)."""
        return self.parts(block).mlp(x)

    def gradient_checkpointing(self) -> bool:
        """Whether the library recomputes blocks in backward (timm/open_clip ``grad_checkpointing``,
        Hugging Face ``gradient_checkpointing``). The libraries keep the flag on the tower root
        (timm) or on its block container, a direct child (open_clip ``transformer``, HF
        ``encoder``); only those are looked at, so the check stays cheap enough for every forward."""
        return any(
            getattr(m, "grad_checkpointing", False) is True or getattr(m, "gradient_checkpointing", False) is True
            for m in (self.root, *self.root.children())
        )

    def block_checkpoint(self, block: nn.Module) -> Callable[..., Any] | None:
        """The library's checkpoint function for one call of ``block``, where the library
        checkpoints each block by wrapping its class's ``forward`` (transformers 5:
        ``GradientCheckpointingLayer``), which the patched block's own ``forward`` bypasses; the
        patched forward then calls it around the block, under the library's conditions. ``None``
        (the default): the library checkpoints around the block call (timm, open_clip), so the
        patched forward already runs inside its checkpoint."""
        return None

    # --- model-level seams (methods ask these instead of branching on the family) ------------
    def classifier_head(self) -> nn.Module | None:
        """The tower's own classifier head when it has one a method may train or compact (timm's
        ``head``); ``None`` for towers without one (CLIP/BLIP towers project, they do not classify)."""
        return None

    def task_heads(self, model: nn.Module) -> list[nn.Module]:
        """The heads of ``model`` that read this tower's output and train with it under a selective
        method's ``train_head`` (default: the tower's :meth:`classifier_head`, if any)."""
        head = self.classifier_head()
        return [] if head is None else [head]

    def cross_attention_parts(self, block: nn.Module) -> CrossAttentionParts | None:
        """``block``'s cross-attention modules (:class:`CrossAttentionParts`), or ``None`` for a
        block that reads no other tower (every pre-norm tower: ViT, CLIP)."""
        return None

    def attention_weights(self, block: nn.Module) -> AttentionWeights:
        """``block``'s attention projections (:class:`AttentionWeights`)."""
        raise self.unsupported("reading attention projections")

    def block_container(self) -> nn.Module | None:
        """The module whose ``forward`` runs every block in order with the library's call convention
        (timm ``blocks``, open_clip ``Transformer``, Hugging Face CLIP ``encoder``): methods that
        replace the whole stack (reversible) patch its ``forward``. ``None`` where vleff has not
        verified that convention for the family (BLIP)."""
        return None

    def container_output(self, out: torch.Tensor) -> object:
        """Wrap a replacement stack's output ``[B, N, C]`` as :meth:`block_container` returns it
        (default: the tensor itself)."""
        return out

    @property
    def classifier_heads(self) -> int:
        """How many classifier heads read the pooled feature: 0 (the feature leaves through the
        final norm, CLIP/BLIP), 1 (timm's ``head``), 2 (distilled DeiT's ``head`` and ``head_dist``).
        Methods that add to "the" head's output refuse more than one."""
        return 0

    def side_final_norm(self) -> tuple[nn.Module, bool]:
        """``(module, tokens)``: the final norm whose output a side method reads, and whether that
        output holds every token (``[B, N, C]``; else the pooled ``[B, C]``). Families that side
        tuning cannot feed raise ``TypeError`` (this default, or an override for unsupported pooling)."""
        raise self.unsupported("side tuning")

    def lora_targets(self, block: str) -> tuple[list[str], list[str]]:
        """``(module names, parameter names)`` LoRA wraps in the block named ``block`` (relative to
        the model), read from the one per-family table :data:`vleff.backbones.targets.LORA_TARGETS`."""
        from vleff.backbones.targets import LORA_TARGETS

        row = LORA_TARGETS.get(type(self).__name__)
        if row is None:
            raise self.unsupported("LoRA", "timm ViT, open_clip and Hugging Face CLIP towers")
        return [f"{block}.{m}" for m in row[0]], [f"{block}.{p}" for p in row[1]]

    def peft_targets(self, block: str, role: str) -> tuple[list[str], list[str]]:
        """``(module names, parameter names)`` of the block named ``block`` that play ``role``
        (``"attention_in"``, ``"mlp_out"``) for a ``peft`` tuner, read from the per-family table
        :data:`vleff.backbones.targets.PEFT_TARGETS`; ``([], [])`` when the family has no row."""
        from vleff.backbones.targets import PEFT_TARGETS

        row = PEFT_TARGETS[role].get(type(self).__name__)
        if row is None:
            return [], []
        return [f"{block}.{m}" for m in row[0]], [f"{block}.{p}" for p in row[1]]

    def unsupported(
        self, what: str, supported: str = "timm ViT, open_clip and Hugging Face CLIP towers (image and text)"
    ) -> TypeError:
        """The one error for a tower a method cannot use: names the model class and what is supported."""
        return TypeError(
            f"{what} does not support {self.describe()} (model class {type(self.root).__name__}); "
            f"it supports {supported}"
        )

    def describe(self) -> str:
        return f"{self.family} {self.modality} tower ({type(self.root).__name__}, {len(self.blocks())} blocks)"
