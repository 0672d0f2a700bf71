"""Image-text model pairs: one object for the two towers of a vision-language model.

Apps (contrastive fine-tuning, retrieval) and cross-modal methods (CrossGET, MADTP) need more
than the towers: the embeddings the library compares, where the text is pooled, the
temperature, and a place where both towers meet within one step. :func:`find_pair` gives that
for every supported pair family:

* open_clip ``CLIP`` / ``CustomTextCLIP``                       (family ``"open_clip"``)
* Hugging Face ``CLIPModel``                                  (family ``"hf_clip"``)
* Hugging Face ``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration``,
  ``BlipForQuestionAnswering``                                (family ``"hf_blip"``)

>>> pair = find_pair(model)
>>> img, txt = pair.encode_image(images), pair.encode_text(ids, mask)
>>> with pair.context() as ctx:          # one training step: both towers' patches share ctx
...     loss = step(pair)                # a text-tower hook reads ctx.states["image"]

``encode_*`` return the projected embeddings as the library computes them, not normalised
(pass ``normalize=True`` for cosine similarity): open_clip ``encode_image``/``encode_text``,
Hugging Face ``get_image_features``/``get_text_features``, BLIP retrieval's contrastive (ITC)
path ``vision_proj``/``text_proj`` of token 0. BLIP captioning and VQA models have no
contrastive projection: their ``encode_*`` return token 0 of the image tower and of the text
tower (unimodal, no cross-attention), and ``logit_scale`` is ``None``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones.base import TowerAdapter
from vleff.backbones.patch import get_patch
from vleff.backbones.state import TokenState

#: key of the :class:`PairContext` in ``TokenState.scratch`` of a tower forward run inside one
PAIR_CONTEXT = "pair_context"

PAIRS_SUPPORTED = (
    "open_clip CLIP / CustomTextCLIP",
    "transformers CLIPModel",
    "transformers BlipForImageTextRetrieval / BlipForConditionalGeneration / BlipForQuestionAnswering",
)


@dataclass(eq=False)
class PairContext:
    """What both towers of a pair share during one step (one :meth:`ModelPair.context` block).

    Both towers' :class:`~vleff.backbones.TowerPatch` objects hold the same instance while the
    block is open. Each tower forward that starts inside it records its token state here (and
    the state finds the context under ``state.scratch[PAIR_CONTEXT]``), so a text-tower hook can
    read what the image tower did in the same step (CrossGET's cross token, MADTP's alignment).

    Attributes:
        states: the latest :class:`TokenState` of each tower forward in this step, by modality.
        data: free space for cross-modal methods, by method name.
    """

    states: dict[str, TokenState] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def attach(self, modality: str, state: TokenState) -> None:
        """Called by a tower's patch when its forward starts inside this context."""
        self.states[modality] = state
        state.scratch[PAIR_CONTEXT] = self


class Held:
    """A tower's training value waiting for the other tower of its pair (see :func:`hold`)."""

    __slots__ = ("spent", "value", "version", "watch")

    def __init__(self, value: torch.Tensor, watch: torch.Tensor | None) -> None:
        self.value = value
        self.watch = watch
        self.version = None if watch is None else watch._version
        self.spent = False

    def expire(self, grad: torch.Tensor) -> None:
        """Tensor hook on the forward's output: a backward pass ran through that forward."""
        self.spent = True

    @property
    def stale(self) -> bool:
        return self.spent or (self.watch is not None and self.watch._version != self.version)


def hold(
    store: dict[str, Any], modality: str, value: torch.Tensor, output: torch.Tensor, watch: torch.Tensor | None = None
) -> None:
    """Leave ``value`` (a cross-modal method's training feature) in ``store`` for the other tower.

    Why it can expire: outside a :class:`PairContext` nothing says which forwards belong to one
    step, and a value left by a forward whose partner never came (an image-only training
    forward) must not be paired with a later, unrelated forward of the other tower -- its graph
    may already be freed by that forward's backward, or its weights changed by an optimizer step
    (autograd then fails with an error naming neither method), and its samples are not the new
    ones. So the value is dropped once a backward pass runs through ``output`` (the tower output
    of the forward that left it) or once ``watch`` (the method's own trained parameter) changes
    in place. Inside a :class:`PairContext` the same rule holds, and the context bounds the step."""
    entry = Held(value, watch)
    store[modality] = entry
    if output.requires_grad:
        output.register_hook(entry.expire)


def partner(store: dict[str, Any], modality: str) -> torch.Tensor | None:
    """The other tower's value :func:`hold` left in ``store``, or ``None`` (none, or expired:
    an expired one is removed)."""
    other = "text" if modality == "image" else "image"
    entry = store.get(other)
    if entry is None:
        return None
    if entry.stale:
        del store[other]
        return None
    return entry.value


def image_text_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
    """``(images, token ids, attention mask or None)`` of an image-text batch: a tuple/list
    ``(images, ids[, mask])`` or a dict with ``images``/``pixel_values``, ``tokens``/``input_ids``/
    ``ids`` and optionally ``attention_mask``; ``None`` when ``batch`` is none of these."""
    if isinstance(batch, dict):
        images = next((batch[k] for k in ("images", "pixel_values") if k in batch), None)
        ids = next((batch[k] for k in ("tokens", "input_ids", "ids") if k in batch), None)
        mask = batch.get("attention_mask")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        images, ids, mask = batch[0], batch[1], batch[2] if len(batch) == 3 else None
    else:
        return None
    if not isinstance(images, torch.Tensor) or not isinstance(ids, torch.Tensor):
        return None
    return images, ids, mask


class Pairing:
    """What one tower forward's cross-modal loss paired with: the other tower's value (``None``:
    it held its own for the other tower instead). Kept in the forward's token state and shared
    with its replay copies, so that gradient checkpointing, recomputing the last block (where the
    loss is computed) in backward, pairs with the same value and computes the same tensors. Never
    copied or pickled: the tensor belongs to one step's graph."""

    def __init__(self) -> None:
        self.other: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> Pairing:
        return Pairing()

    def __reduce__(self) -> tuple:
        return (Pairing, ())


def pair_or_hold(
    state: TokenState,
    store: dict[str, Any],
    pairing: Pairing,
    modality: str,
    value: torch.Tensor,
    output: torch.Tensor,
    watch: torch.Tensor | None = None,
    compatible: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor | None:
    """The other tower's value to pair ``value`` with, or ``None`` after holding ``value`` in
    ``store`` for the other tower (:func:`hold`; ``compatible(other)`` false: held too).

    A forward consumes what the store holds and notes it in ``pairing``; a replay
    (``state.replaying``) returns what its forward paired with and changes nothing outside the
    state, so the recomputed loss is the forward's."""
    if state.replaying:
        return pairing.other
    other = partner(store, modality)  # a stale one (its forward backpropagated) is dropped
    store.clear()
    if other is not None and compatible is not None and not compatible(other):
        other = None
    pairing.other = other
    if other is None:
        hold(store, modality, value, output, watch)
    return other


def pair_context(state: TokenState) -> PairContext | None:
    """The context a tower forward ran in (``None`` outside :meth:`ModelPair.context`)."""
    ctx = state.scratch.get(PAIR_CONTEXT)
    return ctx if isinstance(ctx, PairContext) else None


class ModelPair:
    """The image and text towers of one model, and the library's own contrastive pieces.

    Cheap to build; holds references only. Subclasses implement one family each.
    """

    family: str = ""

    def __init__(self, model: nn.Module, image_tower: TowerAdapter, text_tower: TowerAdapter) -> None:
        self.model = model
        self.image_tower = image_tower
        self.text_tower = text_tower

    # --- embeddings -----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``[B, D]`` image embeddings as the library computes them."""
        raise NotImplementedError

    def encode_text(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """``[B, D]`` text embeddings as the library computes them (``attention_mask``: the padding
        mask Hugging Face towers take; open_clip's causal text tower needs none and ignores it)."""
        raise NotImplementedError

    def eot_index(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B]`` position the library pools each text at (EOT for CLIP, 0 for BLIP)."""
        return self.text_tower.eot_positions(ids)

    def embed_block_output(self, modality: str, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, D]``: the embedding ``encode_image`` / ``encode_text`` would return had the tower's
        last block output ``tokens`` (a block's output, in the blocks' own layout; text: with the
        token ``ids`` the tower was given, which say where it pools). The library's own pooling,
        final norm and projection, applied to an earlier block's output: what an early exit
        returns (MuE), and what a loss on that exit trains."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality={modality!r} is not allowed; use 'image' or 'text'")
        tower = self.image_tower if modality == "image" else self.text_tower
        if tower.sequence_first:
            tokens = tokens.transpose(0, 1)
        if modality == "text" and ids is None:
            raise ValueError("embed_block_output('text', ...) needs the token ids the text tower was given")
        return self._embed_tokens(modality, tokens, ids)

    def _embed_tokens(self, modality: str, tokens: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{self.describe()} does not say how its {modality} tower pools and projects")

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """The learnable log temperature as the library stores it (``exp`` gives the scale), or
        ``None`` when the model has none."""
        return None

    # --- model-level seams (pair methods ask these instead of branching on the family) ----------
    @property
    def has_contrastive_projections(self) -> bool:
        """Whether both towers carry their contrastive projection (CLIP always; BLIP only the
        retrieval model: captioning and VQA models have none)."""
        return True

    def cross_token_norm_and_projection(
        self, modality: str
    ) -> tuple[tuple[nn.Module, str] | None, tuple[nn.Module, str]]:
        """``(norm, projection)`` as ``(module, attribute)`` pairs that map ``modality``'s tokens into
        the shared embedding space (read at call time, so a method never holds stale weights):
        image towers their input norm, text towers their final norm, each with its projection.
        ``norm`` is ``None`` where the tower has none to apply (BLIP's post-norm text tower)."""
        raise NotImplementedError(f"{self.describe()} names no projection for {modality} tokens")

    def matching_forward(
        self, images: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image feature, text feature)`` of one image-text forward as the model matches pairs:
        CLIP encodes both towers; BLIP runs the text encoder cross-attending to the image tokens (the
        image-text matching path) and returns token 0 of each."""
        return self.encode_image(images), self.encode_text(ids, attention_mask)

    # --- synthetic captions (benchmarks: no tokenizer download) -----------------------------------
    def text_layout(self) -> tuple[int, int, int, tuple[int, int]]:
        """``(context length, start id, end id, (lowest, highest) word id)`` of the family's
        tokenized captions; padding is id 0 after the end token in every family."""
        raise NotImplementedError

    def sample_text(self, batch: int, words: int, seed: int = 0) -> torch.Tensor:
        """``[batch, context]`` caption ids as the family's tokenizer lays them out: the start
        token, ``words`` random word ids, the end token, zero padding to the context length.
        What a benchmark of the text path feeds when no tokenizer can be downloaded (BLIP's
        BERT vocabulary); FLOPs and speed depend on the layout, not on which words."""
        context, start, end, (low, high) = self.text_layout()
        if isinstance(words, bool) or not isinstance(words, int) or not 1 <= words <= context - 2:
            raise ValueError(
                f"words={words!r} is not allowed for a {self.family} caption: use 1..{context - 2} "
                f"(the context is {context} tokens with the start and end tokens)"
            )
        g = torch.Generator().manual_seed(int(seed))
        ids = torch.zeros(batch, context, dtype=torch.long)
        ids[:, 0] = start
        ids[:, 1 : words + 1] = torch.randint(low, high, (batch, words), generator=g)
        ids[:, words + 1] = end
        return ids

    # --- the shared per-step context ---------------------------------------------------------------
    @contextlib.contextmanager
    def context(self) -> Iterator[PairContext]:
        """A fresh :class:`PairContext` on both towers' patches for the duration of the block.

        Only patched towers (a method applied) take part; a tower patched inside the block joins
        at its next forward only if patched before the block opened. Restores what was there."""
        ctx = PairContext()
        patches = [p for p in (get_patch(self.image_tower.root), get_patch(self.text_tower.root)) if p is not None]
        previous = [p.context for p in patches]
        for p in patches:
            p.context = ctx
        try:
            yield ctx
        finally:
            for p, prev in zip(patches, previous):
                p.context = prev

    @staticmethod
    def _normed(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        return F.normalize(x, dim=-1) if normalize else x

    def describe(self) -> str:
        towers = f"{self.image_tower.describe()}; {self.text_tower.describe()}"
        return f"{self.family} pair {type(self.model).__name__} ({towers})"


class OpenClipPair(ModelPair):
    family = "open_clip"

    def encode_image(self, images, normalize=False):
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, ids, attention_mask=None, normalize=False):
        return self.model.encode_text(ids, normalize=normalize)

    @property
    def logit_scale(self):
        return self.model.logit_scale

    def _embed_tokens(self, modality, tokens, ids):
        if modality == "image":
            visual = self.model.visual
            if not callable(getattr(visual, "_pool", None)):
                raise TypeError(f"{type(visual).__name__} (open_clip image tower) has no _pool: only VisionTransformer")
            pooled, _ = visual._pool(tokens)  # the library's own pooling and ln_post, in its order
            return pooled @ visual.proj if visual.proj is not None else pooled
        root = self.text_tower.root
        if getattr(root, "cls_emb", None) is not None:
            raise TypeError("open_clip text towers with an appended class token (CoCa) are not supported")
        eot = self.eot_index(ids).to(tokens.device)
        pooled = root.ln_final(tokens[torch.arange(tokens.shape[0], device=tokens.device), eot])
        projection = root.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection

    def cross_token_norm_and_projection(self, modality):
        if modality == "image":
            return (self.model.visual, "ln_pre"), (self.model.visual, "proj")
        root = self.text_tower.root
        return (root, "ln_final"), (root, "text_projection")

    def text_layout(self):
        vocab = self.model.vocab_size  # open_clip's tokenizer: SOT = vocab - 2, EOT = vocab - 1
        return self.model.context_length, vocab - 2, vocab - 1, (1, vocab - 2)


class HFCLIPPair(ModelPair):
    family = "hf_clip"

    def encode_image(self, images, normalize=False):
        return self._normed(_pooled(self.model.get_image_features(pixel_values=images)), normalize)

    def encode_text(self, ids, attention_mask=None, normalize=False):
        out = self.model.get_text_features(input_ids=ids, attention_mask=attention_mask)
        return self._normed(_pooled(out), normalize)

    @property
    def logit_scale(self):
        return self.model.logit_scale

    def _embed_tokens(self, modality, tokens, ids):
        if modality == "image":
            return self.model.visual_projection(self.image_tower.root.post_layernorm(tokens[:, 0]))
        eot = self.eot_index(ids).to(tokens.device)
        pooled = self.text_tower.root.final_layer_norm(tokens[torch.arange(tokens.shape[0], device=tokens.device), eot])
        return self.model.text_projection(pooled)

    def cross_token_norm_and_projection(self, modality):
        if modality == "image":
            return (self.image_tower.root, "pre_layrnorm"), (self.model, "visual_projection")
        return (self.text_tower.root, "final_layer_norm"), (self.model, "text_projection")

    def text_layout(self):
        cfg = self.model.config.text_config
        return (
            cfg.max_position_embeddings,
            cfg.bos_token_id,
            cfg.eos_token_id,
            (1, min(cfg.bos_token_id, cfg.eos_token_id)),
        )


class BlipPair(ModelPair):
    """BLIP: the retrieval model's ITC path; captioning/VQA: token 0 of each tower (no projection)."""

    family = "hf_blip"

    @property
    def has_contrastive_projections(self) -> bool:
        return getattr(self.model, "vision_proj", None) is not None

    def _embed_tokens(self, modality, tokens, ids):
        if modality == "image":
            cls, proj = self.image_tower.root.post_layernorm(tokens[:, 0]), getattr(self.model, "vision_proj", None)
        else:  # post-norm blocks: a block's output is already normed
            cls, proj = tokens[:, 0], getattr(self.model, "text_proj", None)
        return proj(cls) if proj is not None else cls

    def cross_token_norm_and_projection(self, modality):
        """Image: no input norm, the final ``post_layernorm``; text: post-norm, so no norm."""
        if modality == "image":
            return (self.image_tower.root, "post_layernorm"), (self.model, "vision_proj")
        return None, (self.model, "text_proj")

    def matching_forward(self, images, ids, attention_mask):
        image = self.model.vision_model(pixel_values=images).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        out = self.text_tower.root(
            input_ids=ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long, device=image.device),
        )
        return image[:, 0], out.last_hidden_state[:, 0]

    def encode_image(self, images, normalize=False):
        cls = self.model.vision_model(pixel_values=images).last_hidden_state[:, 0, :]
        proj = getattr(self.model, "vision_proj", None)
        return self._normed(proj(cls) if proj is not None else cls, normalize)

    def encode_text(self, ids, attention_mask=None, normalize=False):
        out = self.text_tower.root(input_ids=ids, attention_mask=attention_mask).last_hidden_state[:, 0, :]
        proj = getattr(self.model, "text_proj", None)
        return self._normed(proj(out) if proj is not None else out, normalize)

    #: BLIP's retrieval captions are tokenized to at most 35 tokens ([CLS] words [SEP])
    CAPTION_CONTEXT = 35

    def text_layout(self):
        vocab = self.text_tower.root.config.vocab_size
        # bert-base-uncased: [CLS] = 101, [SEP] = 102; word pieces from 1000 on
        return self.CAPTION_CONTEXT, 101, 102, (1000, min(30000, vocab))


def _pooled(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput


def _towers(model: nn.Module) -> tuple[TowerAdapter, TowerAdapter]:
    from vleff.backbones.towers import find_tower

    return find_tower(model, "image"), find_tower(model, "text")


def find_pair(model: nn.Module) -> ModelPair:
    """The :class:`ModelPair` of an image-text model.

    Raises:
        TypeError: ``model`` is not one of the supported pairs (the message names its class
            and lists what is supported), or one of its towers is of an unsupported kind.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "open_clip" in sys.modules:
        import open_clip

        if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            return OpenClipPair(model, *_towers(model))
    if "transformers" in sys.modules:
        from transformers import (
            BlipForConditionalGeneration,
            BlipForImageTextRetrieval,
            BlipForQuestionAnswering,
            CLIPModel,
        )

        from vleff.backbones.blip_text import HFBlipTextAdapter
        from vleff.backbones.hf import HFBlipVisionAdapter

        if isinstance(model, CLIPModel):
            return HFCLIPPair(model, *_towers(model))
        if isinstance(model, (BlipForImageTextRetrieval, BlipForQuestionAnswering)):
            return BlipPair(model, HFBlipVisionAdapter(model.vision_model), HFBlipTextAdapter(model.text_encoder))
        if isinstance(model, BlipForConditionalGeneration):
            return BlipPair(model, HFBlipVisionAdapter(model.vision_model), HFBlipTextAdapter(model.text_decoder.bert))
    raise TypeError(
        f"{type(model).__module__}.{type(model).__name__} is not an image-text model pair vleff knows; "
        f"supported: {'; '.join(PAIRS_SUPPORTED)}"
    )


def pairs_in(model: nn.Module) -> list[tuple[str, ModelPair]]:
    """``(name, pair)`` of the outermost image-text pairs in ``model``: the model itself (name ``""``)
    or the pairs its submodules are (a LightningModule's CLIP; a teacher and a student give two).
    A pair's own submodules are not searched."""
    found: list[tuple[str, ModelPair]] = []
    for name, module in model.named_modules():
        if any(not outer or name.startswith(f"{outer}.") for outer, _ in found):
            continue
        try:
            found.append((name, find_pair(module)))
        except TypeError:  # not a pair (a pair with ambiguous towers raises ValueError: shown, not skipped)
            continue
    return found


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, caption_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric CLIP loss on L2-normalised embeddings at the learned log temperature
    ``logit_scale``; repeated captions (equal ``caption_ids``) share the target mass. The one home
    of the contrastive loss: CLIP fine-tuning (:mod:`vleff.models.clip_finetuner`) and methods that
    train an embedding against it (MuE's exit loss) call it."""
    logits = logit_scale.exp() * image_emb @ text_emb.T
    if caption_ids is None:
        target = torch.eye(len(image_emb), device=logits.device, dtype=logits.dtype)
    else:
        same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)
        target = same / same.sum(dim=1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(target.T * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


def caption_mask(ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of zero-padded caption ids (:meth:`ModelPair.sample_text`, open_clip's
    tokenizer): 1 up to the end token, 0 on the padding."""
    return (ids != 0).long()


class PairEncoder(nn.Module):
    """An image-text model seen through one path: ``forward(x)`` is the library's own
    ``encode_image(images)`` (``path="image"``) or ``encode_text(ids)`` of zero-padded caption
    ids with their :func:`caption_mask` (``path="text"``). What ``vleff-bench`` measures for the
    methods that act on both towers and for ``tower=text`` (methods are applied to ``model``)."""

    def __init__(self, model: nn.Module, path: str = "image") -> None:
        super().__init__()
        if path not in ("image", "text"):
            raise ValueError(f"path={path!r} is not allowed; use 'image' or 'text'")
        find_pair(model)  # refuse a model that is not an image-text pair now, not at the first forward
        self.model = model
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = find_pair(self.model)
        return pair.encode_image(x) if self.path == "image" else pair.encode_text(x, attention_mask=caption_mask(x))


__all__ = [
    "BlipPair",
    "HFCLIPPair",
    "ModelPair",
    "OpenClipPair",
    "PAIR_CONTEXT",
    "PAIRS_SUPPORTED",
    "PairContext",
    "Held",
    "PairEncoder",
    "caption_mask",
    "contrastive_loss",
    "find_pair",
    "hold",
    "pair_context",
    "pairs_in",
    "partner",
]
