"""Ladder Side-Tuning (LST, Sung et al., NeurIPS 2022) beside a frozen tower.

A side network — the tower's own stack with every width divided by ``r`` — runs beside the
frozen tower, fed by **ladders** from the embeddings and every block's output (read detached,
:class:`vleff.side.common.LayerReader`)::

    s = Down_0(h_0)
    for block i:   g = sigmoid(alpha_i / T)
                   s = g * s + (1 - g) * Down_{i+1}(h_{i+1})          # h_{i+1}: block i's output
                   s = SideBlock_i(s)
    delta = Up(LayerNorm(s)[pooled row])                            # added to the tower's final feature

The ladder merges block ``i``'s output *before* side block ``i`` runs: the reference's default
(``add_residual_after=False`` in ylsung/Ladder-Side-Tuning's ``T5Stack.forward`` and in every
``ladder_side_tuning_*.sh`` script), so side block ``i`` already sees what backbone block ``i``
computed. ``add_residual_after=True`` keeps the other order the reference also offers (run side
block ``i``, then merge; the order vleff used before), an option measured in docs/fidelity.md.

``alpha_i = 0`` and ``T = 0.1`` (each gate starts at 0.5), ``Down`` default-initialised, ``Up``
(``C/r → C``) zero-initialised so the model starts at the frozen model; ``delta`` is added to the
final norm's output at the pooled row, so the model's own pooling, projection and head follow
(vleff's choice: the reference feeds only the side output to the head; the residual keeps the
frozen features and gives one insertion point for every family).

**Side initialisation** from the backbone (the reference's point: init matters): every side
weight keeps ``1/r`` of the backbone weight's channels, chosen by importance — one set ``S`` of
residual-stream channels for the whole side network, and per block a set of attention channels
(the same for q, k, v, so q·k still pairs matched channels) and of MLP hidden channels. The
importance of a channel is the sum over the weights that read or write it of the squared entries
(``init="magnitude"``), or of the accumulated squared gradients (``init="fisher"``: Fisher
information from a few batches, :func:`fisher_information`).

**Side heads**: ``C/r`` with the backbone's head count can leave heads too narrow (ViT-B, r=8:
96 channels, 12 heads → 8 per head). ``side_heads=None`` picks the most heads, at most the
backbone's, that divide ``C/r`` into heads of at least 16 channels (or 1 head when ``C/r < 16``).
Text towers' side blocks are causal, like the tower.

>>> vleff.apply_lst(model, reduction=8)
>>> vleff.side.freeze_backbone(model, train_head=False)  # apply froze the backbone; this the head too
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import TowerAdapter, find_towers
from vleff.checks import check_bool, check_choice, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side.common import (
    SideModule,
    attach_side,
    detach_side,
    final_norm,
    freeze_on_apply,
    restore_on_remove,
    side_modules,
)
from vleff.tokens.common import hooks_named, select_towers

HOOK_NAME = "lst"
MODULE_NAME = "vleff_lst"
TOWERS = ("image", "text")
INITS = ("magnitude", "fisher")
MIN_HEAD_DIM = 16


@dataclass
class LSTConfig(MethodConfig):
    """LST's settings.

    Attributes:
        reduction: ``r``; the side width is ``C / r`` (must divide the tower width) and the side
            MLP hidden width ``hidden / r``.
        side_heads: attention heads of the side blocks (``None``: as many as the backbone's that
            keep at least 16 channels per head; must divide ``C / r``).
        init: channel importance for the side initialisation: ``"magnitude"`` or ``"fisher"``
            (``apply_lst(..., fisher=fisher_information(...))``).
        temperature: gate temperature ``T`` (``g = sigmoid(alpha / T)``; the reference's 0.1).
        add_residual_after: ``False`` (the reference's default): merge block ``i``'s output
            into the side state, then run side block ``i``. ``True``: run side block ``i``, then
            merge (the reference's other setting, vleff's order before issue 23).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "lst"
    reduction: int = 8
    side_heads: int | None = None
    init: str = "magnitude"
    temperature: float = 0.1
    add_residual_after: bool = False
    towers: str = "all"

    def __post_init__(self) -> None:
        self.reduction = check_int("reduction", self.reduction, low=1)
        if self.side_heads is not None:
            self.side_heads = check_int("side_heads", self.side_heads, low=1)
        check_choice("init", self.init, INITS)
        self.temperature = check_number("temperature", self.temperature, low=0.0, low_open=True)
        self.add_residual_after = check_bool("add_residual_after", self.add_residual_after)
        check_towers(self.towers, TOWERS)


# --- the backbone's weights, read per family ----------------------------------------------------
@dataclass
class BlockWeights:
    """One block's weights in one layout: q/k/v ``[C, C]`` each (+ biases), out ``[C, C]``,
    fc1 ``[D, C]``, fc2 ``[C, D]``, the two norms, and the MLP activation module."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    fc1: nn.Linear
    fc2: nn.Linear
    act: nn.Module
    norm1: nn.Module
    norm2: nn.Module
    heads: int
    #: the parameters the weights come from (for Fisher importance: their accumulated grad²)
    sources: dict[str, nn.Parameter]


def _mlp_parts(mlp: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    for fc1, act, fc2 in (("fc1", "act", "fc2"), ("c_fc", "gelu", "c_proj"), ("fc1", "activation_fn", "fc2")):
        if all(hasattr(mlp, n) for n in (fc1, act, fc2)):
            return getattr(mlp, fc1), getattr(mlp, act), getattr(mlp, fc2)
    raise TypeError(f"LST does not support MLP {type(mlp).__name__} (expected fc1/act/fc2)")


def block_weights(tower: TowerAdapter, block: nn.Module) -> BlockWeights:
    parts = tower.parts(block)
    fc1, act, fc2 = _mlp_parts(parts.mlp)
    heads = tower.attention_config(block).num_heads
    aw = tower.attention_weights(block)  # family knowledge stays in the adapter
    w, b, out, sources = aw.qkv_weight, aw.qkv_bias, aw.out, dict(aw.sources)
    sources.update(fc1=fc1.weight, fc2=fc2.weight)
    q, k, v = w.detach().chunk(3)
    return BlockWeights(
        q,
        k,
        v,
        None if b is None else b.detach(),
        out.weight.detach(),
        None if out.bias is None else out.bias.detach(),
        fc1,
        fc2,
        act,
        parts.norm1,
        parts.norm2,
        heads,
        sources,
    )


def _importance(weights: BlockWeights, fisher: dict[int, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Squared entries (magnitude) or accumulated squared gradients (Fisher) of every weight,
    as ``[rows, cols]`` matrices in the q/k/v/out/fc1/fc2 layout."""

    def score(name: str, value: torch.Tensor) -> torch.Tensor:
        if fisher is None:
            return value.detach().float().square()
        src = weights.sources
        if name in ("q", "k", "v") and "qkv" in src:
            g = fisher[id(src["qkv"])].float()
            return g.chunk(3)[("q", "k", "v").index(name)]
        return fisher[id(src[name])].float()

    return {
        "q": score("q", weights.q),
        "k": score("k", weights.k),
        "v": score("v", weights.v),
        "out": score("out", weights.out),
        "fc1": score("fc1", weights.fc1.weight),
        "fc2": score("fc2", weights.fc2.weight),
    }


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing channel order (keeps head grouping)."""
    return scores.topk(k).indices.sort().values


# --- the side network -------------------------------------------------------------------------
class SideBlock(nn.Module):
    """A pre-norm transformer block of width ``C/r``: self-attention (causal for text), MLP."""

    def __init__(self, width: int, heads: int, hidden: int, act: nn.Module, eps: float, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class LSTModule(SideModule):
    """Side blocks, ladders (``Down_0 … Down_L``, gates), final norm and zero-init ``Up``."""

    def __init__(
        self,
        blocks: list[SideBlock],
        width: int,
        side_width: int,
        eps: float,
        temperature: float,
        add_residual_after: bool = False,
    ) -> None:
        super().__init__()
        self.add_residual_after = add_residual_after
        self.blocks = nn.ModuleList(blocks)
        self.downs = nn.ModuleList(nn.Linear(width, side_width) for _ in range(len(blocks) + 1))
        self.gates = nn.Parameter(torch.zeros(len(blocks)))  # alpha_i = 0: g starts at 0.5
        self.temperature = temperature
        self.norm = nn.LayerNorm(side_width, eps=eps)
        self.up = nn.Linear(side_width, width)
        nn.init.zeros_(self.up.weight)  # zero: the model starts exactly at the frozen model
        nn.init.zeros_(self.up.bias)

    def correction(
        self, layers: list[torch.Tensor], anchor: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        if len(layers) != len(self.downs):
            raise RuntimeError(f"lst: read {len(layers)} layer outputs, the side network has {len(self.downs)} ladders")
        dtype = self.up.weight.dtype
        s = self.downs[0](layers[0].to(dtype))
        gates = torch.sigmoid(self.gates / self.temperature)
        for i, block in enumerate(self.blocks):
            if self.add_residual_after:
                s = block(s)
            g = gates[i].to(s.dtype)
            s = g * s + (1 - g) * self.downs[i + 1](layers[i + 1].to(dtype))  # layers[i + 1]: block i's output
            if not self.add_residual_after:
                s = block(s)
        pooled = s[torch.arange(s.shape[0], device=s.device), rows]
        return self.up(self.norm(pooled))


def choose_side_heads(side_width: int, backbone_heads: int) -> int:
    """The most heads ``<= backbone_heads`` dividing ``side_width`` with ``>= 16`` channels each
    (1 head when ``side_width < 16``)."""
    for h in range(min(backbone_heads, side_width), 0, -1):
        if side_width % h == 0 and side_width // h >= min(MIN_HEAD_DIM, side_width):
            return h
    return 1


def _copy_norm(dst: nn.LayerNorm, src: nn.Module, idx: torch.Tensor) -> None:
    if getattr(src, "weight", None) is not None:
        dst.weight.copy_(src.weight.detach()[idx])
    if getattr(src, "bias", None) is not None:
        dst.bias.copy_(src.bias.detach()[idx])


@torch.no_grad()
def build_side_network(tower: TowerAdapter, cfg: LSTConfig, fisher: dict[int, torch.Tensor] | None = None) -> LSTModule:
    """The side network of ``tower``, initialised from its weights by channel importance."""
    width, r = tower.embed_dim, cfg.reduction
    side_width = width // r
    blocks = tower.blocks()
    weights = [block_weights(tower, b) for b in blocks]
    imps = [_importance(w, fisher) for w in weights]
    # one residual channel set for the whole side network: columns read + rows written, all blocks
    stream = sum(
        i["q"].sum(0) + i["k"].sum(0) + i["v"].sum(0) + i["fc1"].sum(0) + i["out"].sum(1) + i["fc2"].sum(1)
        for i in imps
    )
    keep = _top(stream, side_width)
    heads = cfg.side_heads if cfg.side_heads is not None else choose_side_heads(side_width, weights[0].heads)
    if side_width % heads:
        raise ValueError(
            f"side_heads={heads} does not divide the side width {side_width} (= {width} / reduction "
            f"{r}) of {tower.describe()}; use a divisor of {side_width}"
        )
    norm, _ = final_norm(tower)
    eps = float(getattr(weights[0].norm1, "eps", 1e-6))
    side_blocks = []
    for w, imp in zip(weights, imps):
        hidden = w.fc1.out_features
        side_hidden = max(1, hidden // r)
        block = SideBlock(side_width, heads, side_hidden, _fresh_act(w.act), eps, causal=tower.modality == "text")
        attn = _top(imp["q"].sum(1) + imp["k"].sum(1) + imp["v"].sum(1) + imp["out"].sum(0), side_width)
        mlp = _top(imp["fc1"].sum(1) + imp["fc2"].sum(0), side_hidden)
        block.qkv.weight.copy_(torch.cat([m[attn][:, keep] for m in (w.q, w.k, w.v)]))
        if w.qkv_bias is not None:
            block.qkv.bias.copy_(torch.cat([part[attn] for part in w.qkv_bias.chunk(3)]))
        block.proj.weight.copy_(w.out[keep][:, attn])
        if w.out_bias is not None:
            block.proj.bias.copy_(w.out_bias[keep])
        block.fc1.weight.copy_(w.fc1.weight.detach()[mlp][:, keep])
        if w.fc1.bias is not None:
            block.fc1.bias.copy_(w.fc1.bias.detach()[mlp])
        block.fc2.weight.copy_(w.fc2.weight.detach()[keep][:, mlp])
        if w.fc2.bias is not None:
            block.fc2.bias.copy_(w.fc2.bias.detach()[keep])
        _copy_norm(block.norm1, w.norm1, keep)
        _copy_norm(block.norm2, w.norm2, keep)
        side_blocks.append(block)
    module = LSTModule(side_blocks, width, side_width, eps, cfg.temperature, cfg.add_residual_after)
    _copy_norm(module.norm, norm, keep)
    return module


def _fresh_act(act: nn.Module) -> nn.Module:
    """A new instance of the backbone's activation (the side network owns its modules)."""
    import copy

    return copy.deepcopy(act)


def _check_tower(tower: TowerAdapter, cfg: LSTConfig) -> None:
    final_norm(tower)  # TypeError for unsupported families / pooling
    for block in tower.blocks():
        _mlp_parts(tower.parts(block).mlp)
    width, r = tower.embed_dim, cfg.reduction
    if width % r or width // r < 1:
        divisors = [d for d in range(2, min(width, 64) + 1) if width % d == 0]
        raise ValueError(
            f"reduction={r} does not divide the width {width} of {tower.describe()}; use a divisor of "
            f"{width} (e.g. {divisors})"
        )
    if cfg.side_heads is not None and (width // r) % cfg.side_heads:
        raise ValueError(
            f"side_heads={cfg.side_heads} does not divide the side width {width // r} (= {width} / "
            f"reduction {r}) of {tower.describe()}; use a divisor of {width // r}"
        )


def fisher_information(
    model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Squared gradients of every parameter, summed over ``batches`` (the empirical Fisher the
    reference ranks channels by); keyed by ``id(parameter)`` for :func:`apply_lst`'s ``fisher``.

    ``loss_fn(model, batch)`` returns the loss. The model's ``requires_grad`` flags and its
    ``.grad`` are restored afterwards; run it *before* freezing nothing matters either way.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    total = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    n = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            for p in params:
                p.grad = None
            loss_fn(model, batch).backward()
            for p in params:
                if p.grad is not None:
                    total[id(p)] += p.grad.detach().float().square()
            n += 1
    finally:
        for p, flag, g in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = g
    if n == 0:
        raise ValueError("fisher_information: batches is empty; pass a few batches of training data")
    return total


def apply_lst(
    model: nn.Module, config: LSTConfig | None = None, fisher: dict[int, torch.Tensor] | None = None, **settings: Any
) -> nn.Module:
    """Add a ladder side network to every tower ``towers`` names (in place). Applying again
    replaces it. Freezes the backbone
    (:func:`vleff.side.common.backbone_modules`; a timm head stays trainable); ``remove_*`` restores the flags.

    Args:
        fisher: :func:`fisher_information` output, required with ``init="fisher"``.

    Raises:
        TypeError: no supported tower (timm cls-pooled ViT, open_clip and Hugging Face CLIP towers).
        ValueError: ``reduction`` does not divide a tower's width, ``side_heads`` does not divide
            the side width, ``init="fisher"`` without ``fisher``, a token method is applied.
    """
    cfg = LSTConfig.build(config, **settings)
    if cfg.init == "fisher" and fisher is None:
        raise ValueError(
            "init='fisher' needs fisher=vleff.methods.lst.core.fisher_information(model, batches, loss_fn); "
            "or use init='magnitude'"
        )
    if cfg.init == "magnitude" and fisher is not None:
        raise ValueError("fisher= was given but init='magnitude'; pass init='fisher' to use it")
    towers = select_towers(model, cfg.towers)
    for tower in towers:  # every tower checked before any change
        _check_tower(tower, cfg)
    if lst_applied(model):
        remove_lst(model)
    refuse_applied_conflicts(model, HOOK_NAME)
    for tower in towers:
        if fisher is not None:
            missing = [n for n, p in tower.root.named_parameters() if p.dim() == 2 and id(p) not in fisher]
            if missing:
                raise ValueError(f"fisher holds no entry for {missing[:3]}; compute it on this model")
        attach_side(tower, HOOK_NAME, MODULE_NAME, build_side_network(tower, cfg, fisher))
    freeze_on_apply(model)  # the backbone frozen, as apply_lora does (remove_* restores the flags)
    return model


def remove_lst(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lst`: no hooks, no ``vleff_lst`` modules, the library's forward."""
    detach_side(model, HOOK_NAME, MODULE_NAME)
    restore_on_remove(model)
    return model


def lst_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def lst_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in side_modules(model) if isinstance(m, LSTModule) for p in m.parameters()]


def lst_gate_values(model: nn.Module) -> list[torch.Tensor]:
    """Each tower's gates ``g_i = sigmoid(alpha_i / T)`` (for logging)."""
    return [torch.sigmoid(m.gates.detach() / m.temperature) for m in side_modules(model) if isinstance(m, LSTModule)]


def lst_reapply_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings to apply LST again before trained weights load: the side weights come from the
    checkpoint, so the Fisher initialisation (which needs data) is replaced by the magnitude one."""
    return {**settings, "init": "magnitude"} if settings.get("init") == "fisher" else settings


def lst_settings(model: nn.Module) -> dict[str, Any]:
    """LST's settings as applied to ``model``, read back from its side networks (``init`` leaves no trace)."""
    towers = [t for t in find_towers(model) if isinstance(t.root._modules.get(MODULE_NAME), LSTModule)]
    if not towers:
        return {}
    side: Any = towers[0].root._modules[MODULE_NAME]
    out: dict[str, Any] = {
        "towers": frozenset(t.modality for t in towers),
        "reduction": towers[0].embed_dim // side.downs[0].out_features,
        "temperature": side.temperature,
    }
    if len(side.blocks):
        out["side_heads"] = side.blocks[0].heads
    return out
