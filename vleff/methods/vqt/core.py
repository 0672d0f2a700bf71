"""Visual Query Tuning (VQT, Tu et al., CVPR 2023) beside a frozen image tower.

Per block ``l`` a few learnable query tokens ``P_l`` (``[T, C]``) pass through that block
*beside* the frozen token stream: normed with the block's ``norm1``, projected with the
block's own query projection, they attend to **the frozen tokens' keys and values only** (the
paper adds the queries to Q alone; andytu28/VQT ``Head2ToeAttention.forward`` computes K/V from
the rows after the query prompts). The frozen keys and values are the ones the block just
computed, **sliced** into the queries' rows, not a ``-inf``-masked joint attention, so the
frozen tokens never see the queries and the token stream stays bit-identical to the plain
forward. Out projection, residual, MLP branch; the outputs ``o_l`` are collected and never fed
to the next block.

Why sliced: a masked joint attention computes the same forward but makes every frozen
token's activation part of the queries' graph, so autograd keeps the whole backbone's
activations (the failure the reference code shows: ~71 % of full fine-tuning's saved
activations). Here the frozen K/V are detached copies, the only per-token tensors the query
path saves; with the backbone frozen (:func:`freeze_backbone_for_vqt`, or the
``VisualQueryTuning`` callback) nothing of the token stream is saved for backward.

Features: each block's ``T`` outputs are flattened to ``T·C`` values and L2-normalised
together (the reference's ``F.normalize(q.view(B, -1))`` with ``NORMALIZE_FEATS=True``; for
``T = 1`` the same as per token).

Head (vleff's choice, documented): the output is ``head(pooled) + proj(concat_l l2norm(o_l))``
with ``proj`` a zero-initialised ``Linear(depth·T·C → head output)``, added by a forward hook
on the tower's classifier head. That is the paper's linear head over
``concat(cls, l2norm(o_1..L))`` split in two (the model's own head keeps the cls part, un-normalised),
with the query part zero-initialised so the model starts exactly at the frozen model; it costs
``depth·T·C·classes`` weights (ViT-B/16, T=1, 10 classes: 92 k), not a projection back into the
``C``-wide head input (7 M).

>>> vleff.apply_vqt(model, num_queries=1)   # timm ViT: queries + zero-init projection
>>> vleff.side.freeze_backbone_for_vqt(model, train_head=False)  # apply froze the backbone; this the head too
>>> vleff.remove_vqt(model)                 # the original model, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import (
    BlockInfo,
    TokenState,
    TowerAdapter,
    TowerHook,
    find_towers,
    get_patch,
)
from vleff.backbones.block import mlp_branch
from vleff.checks import check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side.common import (
    FinalFeatures,
    SideModule,
    clear_side_state,
    final_norm,
    freeze_backbone,
    freeze_on_apply,
    restore_on_remove,
    unwatch_forward_end,
    watch_forward_end,
)
from vleff.tokens.common import hooks_named, install_hooks, remove_hooks, select_towers

HOOK_NAME = "vqt"
MODULE_NAME = "vleff_vqt"
TOWERS = ("image",)
#: families VQT feeds: a timm head's output, or a CLIP image tower's pooled final feature
SUPPORTED = (
    "timm VisionTransformer (ViT/DeiT with one head; registers allowed), open_clip and Hugging Face "
    "CLIP image towers (class-token pooled)"
)


@dataclass
class VQTConfig(MethodConfig):
    """VQT's settings.

    Attributes:
        num_queries: query tokens per block (``T``; the paper's default is 1).
        dropout: dropout on the query tokens in training (the paper uses 0.1; 0 keeps runs
            deterministic by default).
        towers: only ``"image"``.
    """

    method = "vqt"
    num_queries: int = 1
    dropout: float = 0.0
    towers: str = "image"

    def __post_init__(self) -> None:
        self.num_queries = check_int("num_queries", self.num_queries, low=1)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_towers(self.towers, TOWERS)


class VQTModule(SideModule):
    """The trained parts of one tower, registered on the tower root as ``vleff_vqt`` (so they
    are in ``parameters()`` and ``state_dict``): per-block queries and the zero-init projection
    of their collected outputs, added to the head output (timm) or, on a CLIP image tower, to
    the pooled final feature (:class:`vleff.side.common.FinalFeatures`, before the tower's
    projection; ``head_dim`` is then the tower width)."""

    def __init__(self, depth: int, num_queries: int, width: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(depth, num_queries, width))
        nn.init.trunc_normal_(self.queries, std=0.02)  # small: the queries start near "no token"
        self.proj = nn.Linear(depth * num_queries * width, head_dim)
        nn.init.zeros_(self.proj.weight)  # zero: the model starts exactly at the frozen model
        nn.init.zeros_(self.proj.bias)
        self.dropout = dropout
        #: forward hook and pre-hook ids on the tower's head (to remove them exactly)
        self.head_hook_id: int | None = None
        self.head_pre_hook_id: int | None = None

    def features(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """``[B, depth·T·C]``: each block's ``[B, T, C]`` query outputs flattened and
        l2-normalised over all ``T·C`` values (the reference's per-layer normalisation: it keeps
        layers of different scale comparable while the T queries of a layer keep their relative
        norms), concatenated."""
        return torch.cat([F.normalize(o.flatten(1), dim=-1) for o in outputs], dim=1)

    def correction(
        self, layers: list[torch.Tensor], anchor: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """CLIP towers: ``layers`` are the collected query outputs (the scratch this method's
        hook fills); the projection of their features is added to the pooled final feature."""
        return self.proj(self.features(layers))


class VQTHook(TowerHook):
    """Runs each block's queries beside the frozen stream (in ``between``: the block's K/V are
    fresh there) and collects their outputs in the token state's scratch."""

    name = HOOK_NAME
    #: its query outputs go to the token state's scratch (replays exactly), and from there, with
    #: their gradients, to the head after the forward: non-re-entrant checkpointing only
    replayable = True
    side_outputs = True

    def __init__(self, adapter: TowerAdapter, module: VQTModule, config: VQTConfig) -> None:
        self.adapter, self.module, self.config = adapter, module, config

    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        state.scratch[HOOK_NAME] = []
        return x

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        scratch = state.scratch.get(HOOK_NAME)
        if not isinstance(scratch, list) or len(scratch) != info.index:
            # not inside a tower forward that started at block 0 (a block called directly after a
            # forward ended): no queries, the block's own output passes through
            state.scratch.pop(HOOK_NAME, None)
            return x
        n = state.num_input_tokens
        if info.stale or x.shape[1] != n or info.keep is not None or info.bias is not None:
            raise RuntimeError(
                f"{self.adapter.describe()} block {info.index}: VQT reads the block's keys/values of the full "
                "frozen token stream, but another method changed the tokens or the attention (token reduction, "
                "keep masks or attention biases: ToMe, EViT, DynamicViT); remove it, VQT does not stack with them"
            )
        out = query_path(
            self.adapter,
            info.block,
            self.module.queries[info.index],
            info.keys,
            info.v,
            x.shape[0],
            self.module.dropout if self.module.training else 0.0,
        )
        scratch.append(out)
        return x


def query_path(
    adapter: TowerAdapter,
    block: nn.Module,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    batch: int,
    dropout: float = 0.0,
) -> torch.Tensor:
    """One block's query tokens ``[T, C]`` through ``block`` beside the frozen tokens whose keys
    and values (``[B, H, N, Dh]``) the block computed: ``[B, T, C]``. The queries attend to
    those frozen keys/values only, not to each other (the reference's attention).

    The frozen K/V are detached and copied (``contiguous``): the copies are what the query
    path saves for backward (2·N·C per sample), not the ``qkv`` output they are views of
    (3·N·C), and no gradient can reach the token stream through them.
    """
    parts = adapter.parts(block)
    cfg = adapter.attention_config(block)
    # no grad (inference, FLOP counting): a view of the trainable queries would still "require
    # grad" with no grad_fn, which torch's module tracker (FlopCounterMode) cannot hook; detach it
    source = queries if torch.is_grad_enabled() else queries.detach()
    p = source.unsqueeze(0).expand(batch, -1, -1)
    if dropout > 0:
        p = F.dropout(p, p=dropout, training=True)
    h = parts.norm1(p)
    q = adapter.qkv(block, h)[0]  # [B, H, T, Dh]; the queries' own keys/values are not attended to
    k_frozen = keys.detach().to(q.dtype).contiguous()
    v_frozen = values.detach().to(q.dtype).contiguous()
    logits = (q * cfg.scale) @ k_frozen.transpose(-2, -1)  # [B, H, T, N]
    # at least float32 (half-precision logits), float64 kept
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    if block.training and cfg.dropout_p > 0:
        probs = F.dropout(probs, p=cfg.dropout_p)
    o = (probs @ v_frozen).transpose(1, 2).reshape(batch, queries.shape[0], -1)
    p = p + parts.drop_path1(parts.ls1(adapter.attn_out(block, o, h)))
    return p + mlp_branch(adapter, block, p)


class _CompactHeadInput:
    """Forward pre-hook on the head: a trainable head saves its input for backward, and the
    pooled cls token is a view of the final norm's whole ``[B, N, C]`` output, which that view
    would keep alive; a ``[B, C]`` copy (same values) keeps only itself. Always copied under
    grad (storage sizes cannot be read inside ``torch.compile``; the copy is ``B·C`` floats)."""

    def __call__(self, head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and torch.is_grad_enabled():
            return (x.clone(), *args[1:])
        return None


class _HeadOutput:
    """Forward hook on the tower's classifier head (``always_call=True``): ``head(pooled) +
    proj(query features)``, consuming the query outputs of the forward that collected them.
    Without them (the head called directly after that forward ended) the head's own output
    passes through; when the head raises they are dropped all the same. ``forward_features``
    then ``forward_head`` is one forward here: the outputs wait for the head.

    A plain object (not a closure) so the model deep-copies and pickles with it."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __call__(self, head: nn.Module, args: tuple[Any, ...], output: torch.Tensor | None) -> torch.Tensor | None:
        patch = get_patch(self.root)
        outputs = None if patch is None or patch.state is None else patch.state.scratch.pop(HOOK_NAME, None)
        if output is None or not outputs:
            return None
        module = self.root.get_submodule(MODULE_NAME)
        assert isinstance(module, VQTModule)
        return output + module.proj(module.features(outputs)).to(output.dtype)


def _check_supported(tower: TowerAdapter) -> nn.Module | None:
    """The timm head module VQT feeds (``None`` for a CLIP image tower, fed at its final norm),
    or ``TypeError`` naming what is supported."""
    if tower.classifier_heads == 0 and tower.modality == "image":  # a CLIP-style image tower
        try:
            final_norm(tower)
        except TypeError as e:
            raise TypeError(f"VQT does not support {tower.describe()}: {e}; it supports {SUPPORTED}") from None
        return None
    if tower.classifier_heads != 1:
        raise TypeError(f"VQT does not support {tower.describe()} yet; it supports {SUPPORTED}")
    head = tower.classifier_head()
    if head is None:
        raise TypeError(f"VQT: {tower.describe()} has no head module to feed the query outputs into")
    return head


def apply_vqt(model: nn.Module, config: VQTConfig | None = None, **settings: Any) -> nn.Module:
    """Add per-block query tokens to every image tower of ``model`` (in place).

    Applying twice replaces the earlier queries (drawn anew). The backbone
    (:func:`vleff.side.common.backbone_modules`: the tower and, on a CLIP, the whole image-text
    model) is frozen here, as ``apply_lora`` freezes its model, so the frozen stream builds no
    graph (a timm head stays trainable); :func:`remove_vqt` restores the flags.

    Raises:
        TypeError: no supported image tower (timm ViT, open_clip and Hugging Face CLIP image towers are).
        ValueError: a token-reduction method is applied (VQT reads the full stream's K/V).
    """
    cfg = VQTConfig.build(config, **settings)
    if vqt_applied(model):
        remove_vqt(model)
    refuse_applied_conflicts(model, HOOK_NAME)
    for tower in select_towers(model, cfg.towers):  # every tower checked before any is changed
        _check_supported(tower)
    modules: dict[int, VQTModule] = {}

    def make_hook(tower: TowerAdapter) -> VQTHook:
        head = _check_supported(tower)
        width = tower.embed_dim
        head_out = (
            width if head is None else int(getattr(head, "out_features", getattr(tower.root, "num_features", width)))
        )
        module = VQTModule(len(tower.blocks()), cfg.num_queries, width, head_out, cfg.dropout)
        ref = next(tower.root.parameters())
        module.to(device=ref.device, dtype=ref.dtype)
        modules[id(tower.root)] = module
        return VQTHook(tower, module, cfg)

    installed = install_hooks(model, make_hook, cfg.towers)
    for tower in installed:
        module = modules[id(tower.root)]
        tower.root.add_module(MODULE_NAME, module)
        head = tower.classifier_head() if tower.classifier_heads else None
        if head is None:  # CLIP image tower: added to the pooled final feature
            norm, tokens = final_norm(tower)
            module.norm_hook_id = norm.register_forward_hook(
                FinalFeatures(tower.root, HOOK_NAME, MODULE_NAME, tokens), always_call=True
            ).id
            watch_forward_end(tower, HOOK_NAME)
            continue
        module.head_hook_id = head.register_forward_hook(_HeadOutput(tower.root), always_call=True).id
        watch_forward_end(tower, HOOK_NAME)
        module.head_pre_hook_id = head.register_forward_pre_hook(_CompactHeadInput()).id
    freeze_on_apply(model)  # the backbone frozen, as apply_lora does (remove_vqt restores the flags)
    return model


def remove_vqt(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_vqt`: no hooks, no ``vleff_vqt`` module, the head's own input."""
    if not vqt_applied(model):
        raise ValueError(f"VQT is not applied to this {type(model).__name__}; nothing to remove")
    for tower in find_towers(model):
        module = tower.root._modules.get(MODULE_NAME)
        if isinstance(module, VQTModule):
            if module.norm_hook_id is not None:
                final_norm(tower)[0]._forward_hooks.pop(module.norm_hook_id, None)
                final_norm(tower)[0]._forward_hooks_always_called.pop(module.norm_hook_id, None)
            if module.head_hook_id is not None:
                tower.classifier_head()._forward_hooks.pop(module.head_hook_id, None)
                tower.classifier_head()._forward_hooks_always_called.pop(module.head_hook_id, None)
            unwatch_forward_end(tower, HOOK_NAME)
            clear_side_state(tower.root, HOOK_NAME)
            if module.head_pre_hook_id is not None:
                tower.classifier_head()._forward_pre_hooks.pop(module.head_pre_hook_id, None)
            del tower.root._modules[MODULE_NAME]
    remove_hooks(model, HOOK_NAME)
    restore_on_remove(model)
    return model


def vqt_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def vqt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters VQT adds (queries and the head projection), over every tower."""
    return [p for t in _vqt_towers(model) for p in t.root.get_submodule(MODULE_NAME).parameters()]


def _vqt_towers(model: nn.Module) -> list[TowerAdapter]:
    try:
        towers = find_towers(model)
    except TypeError:
        return []
    return [t for t in towers if isinstance(t.root._modules.get(MODULE_NAME), VQTModule)]


def freeze_backbone_for_vqt(model: nn.Module, train_head: bool = True) -> list[str]:
    """``requires_grad = False`` on every backbone weight of the side towers except the side
    parameters (and timm classifier heads when ``train_head``): the shared
    :func:`vleff.side.common.freeze_backbone`, after checking that VQT is applied. Returns the
    names of the parameters left trainable, relative to ``model``."""
    if not _vqt_towers(model):
        raise ValueError(f"VQT is not applied to this {type(model).__name__}; call apply_vqt first")
    return freeze_backbone(model, train_head=train_head)


def vqt_num_parameters(depth: int, num_queries: int, width: int, head_out: int) -> int:
    """Parameters VQT adds: ``depth·T·C`` queries and the ``depth·T·C → head_out`` projection."""
    n = depth * num_queries * width
    return n + n * head_out + head_out
