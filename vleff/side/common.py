"""What every side method shares (LST, UniPT; VQT's freezing and checkpoints): reading a frozen
tower's layer outputs, feeding a correction into the tower's own final features, freezing the
backbone, refusing a configuration that would back-propagate through it, and side-only state.

**Reading.** :class:`LayerReader` is a tower hook that keeps, detached, the tokens entering
block 0 (the embeddings, after the tower's pre-norm) and every block's output:
``H = [h_0, h_1 … h_L]`` in the token state's scratch. Detached, so nothing a side network
computes from them can reach the backbone's graph, even when the backbone is trainable; the
tower's token stream is not touched.

**Lifetime.** That scratch belongs to one tower forward: it is consumed (popped) by the final
norm's hook, and :class:`SideStateEnd` hooks drop whatever is left when the tower root's forward
ends and when a block or the final norm raises. A block or the final norm called directly after
a forward therefore computes exactly what the unpatched module computes, with no correction
from an earlier forward.

**Feeding.** The side network's output is a correction ``delta`` (``[B, C]``) added to the
tower's *final features at the pooled position*: the output of the tower's final norm (timm
``norm``, open_clip ``ln_post`` / ``ln_final``, Hugging Face ``post_layernorm`` /
``final_layer_norm``) at the row the library pools (cls for image towers, the EOT token for text
towers), by a forward hook on that norm. Everything after it is the library's own: pooling, the
projection of a CLIP tower, the classifier head of a timm ViT. With a zero-initialised last
layer the model starts exactly at the frozen model. The anchor a side network may read (UniPT)
is the same pooled, normed feature, frozen.

**Freezing.** Memory is saved only if no backbone activation requires grad. The backbone is
:func:`backbone_modules`: the side towers and the image-text model holding them (both CLIP towers,
projections, ``logit_scale``), for every side method and family alike. ``apply_lst`` /
``apply_unipt`` / ``apply_vqt`` freeze it (as ``apply_lora`` freezes its model; a timm classifier
head stays trainable) and ``remove_*`` puts the flags back once no side method is left;
:func:`freeze_backbone` does it again (``train_head=False`` freezes the head too), and
:func:`refuse_unfrozen_backbone` names any backbone weight that requires grad again (the user's
code, another method) — the side callbacks call it at fit start.

**Checkpoints.** :func:`side_state_dict` is everything but the frozen backbone (side modules,
trainable heads, and the user's own modules beside the backbone, buffers included);
:func:`load_side_state_dict` puts it onto a fresh backbone of the same kind.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vleff.backbones import (
    BlockInfo,
    TokenState,
    TowerAdapter,
    TowerHook,
    find_towers,
    get_patch,
)

#: module names the side methods register on a tower root (the prompt methods' and the bottleneck
#: adapters' too, :mod:`vleff.side.prompts`, :mod:`vleff.side.bottleneck`: they train beside the
#: same frozen backbone)
SIDE_MODULES = (
    "vleff_vqt",
    "vleff_lst",
    "vleff_unipt",
    "vleff_vpt",
    "vleff_prefix",
    "vleff_aprompt",
    "vleff_serial_adapter",
    "vleff_parallel_adapter",
)


# --- reading ---------------------------------------------------------------------------------
class LayerReader(TowerHook):
    """Collects ``[h_0 … h_L]`` (detached) in ``state.scratch[name]`` for a side method."""

    #: reads detached block outputs into the token state: replays exactly, hands out no gradient
    replayable = True

    def __init__(self, name: str, adapter: TowerAdapter) -> None:
        self.name = name  # type: ignore[misc]  # one reader per method, named after it
        self.adapter = adapter

    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        state.scratch[self.name] = [x.detach()]
        return x

    def after(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        layers = state.scratch.get(self.name)
        if not isinstance(layers, list) or len(layers) != info.index + 1:
            # not inside a tower forward that started at block 0 (a block called directly after a
            # forward ended): read nothing, the block's own output passes through
            state.scratch.pop(self.name, None)
            return x
        if x.shape[1] != state.num_input_tokens:
            raise RuntimeError(
                f"{self.adapter.describe()} block {info.index}: the side method {self.name!r} reads every block's "
                "output of the full token stream, but another method changed the number of tokens (ToMe, EViT, "
                f"DynamicViT); remove it, {self.name} does not stack with token reduction"
            )
        layers.append(x.detach())
        return x


# --- lifetime of the per-forward side state ----------------------------------------------------
def clear_side_state(root: nn.Module, name: str) -> None:
    """Drop ``name``'s per-forward scratch from the tower's token state (nothing if none)."""
    patch = get_patch(root)
    if patch is not None and patch.state is not None:
        patch.state.scratch.pop(name, None)


class SideStateEnd:
    """Forward hook registered with ``always_call=True``: ends ``name``'s per-forward scratch.

    On the tower root it runs when the root's forward returns or raises (``on_error_only=False``);
    on each block only when the block raised (``on_error_only=True``: torch then passes
    ``output=None``), which covers entry points that bypass the root's ``forward``
    (``encode_text``, ``forward_features``). A plain object so the model deep-copies and pickles."""

    def __init__(self, root: nn.Module, name: str, on_error_only: bool) -> None:
        self.root, self.name, self.on_error_only = root, name, on_error_only

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if output is None or not self.on_error_only:
            clear_side_state(self.root, self.name)


def watch_forward_end(tower: TowerAdapter, name: str) -> None:
    """Register the :class:`SideStateEnd` hooks of ``name`` on the tower root and its blocks."""
    tower.root.register_forward_hook(SideStateEnd(tower.root, name, False), always_call=True)
    for block in tower.blocks():
        block.register_forward_hook(SideStateEnd(tower.root, name, True), always_call=True)


def unwatch_forward_end(tower: TowerAdapter, name: str) -> None:
    """Remove exactly the hooks :func:`watch_forward_end` registered for ``name``."""
    for module in (tower.root, *tower.blocks()):
        for key in [k for k, h in module._forward_hooks.items() if isinstance(h, SideStateEnd) and h.name == name]:
            module._forward_hooks.pop(key)
            module._forward_hooks_always_called.pop(key, None)


# --- where the tower's final features are ----------------------------------------------------
def final_norm(tower: TowerAdapter) -> tuple[nn.Module, bool]:
    """``(module, tokens)``: the tower's final norm, and whether its output holds every token
    (``[B, N, C]``; else the pooled ``[B, C]``). ``TypeError`` for towers whose pooling a side
    method cannot feed (distilled DeiT's two tokens, average or attention pooling)."""
    return tower.side_final_norm()  # the adapter owns the family knowledge; unsupported towers raise there


def pooled_rows(tower: TowerAdapter, state: TokenState, batch: int, device: torch.device) -> torch.Tensor:
    """``[B]`` the row each sample is pooled at: 0 (cls) for image towers, the EOT for text."""
    if tower.modality == "text":
        from vleff.backbones.text import eot_rows

        return eot_rows(state).to(device)
    return torch.zeros(batch, dtype=torch.long, device=device)


def token_mask(tower: TowerAdapter, state: TokenState, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """``[B, N]`` 1 for real tokens, 0 for a text tower's padding after the EOT."""
    if tower.modality == "text":
        from vleff.backbones.text import PAD

        pad = state.get(PAD)
        return (1 - pad).to(device=device, dtype=torch.float32)
    return torch.ones(batch, n, device=device)


class SideModule(nn.Module):
    """Base of a side network registered on a tower root: ``correction(H, anchor, mask, rows)``
    returns the ``[B, C]`` delta added to the pooled final features."""

    norm_hook_id: int | None = None
    head_pre_hook_id: int | None = None

    def correction(
        self, layers: list[torch.Tensor], anchor: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class FinalFeatures:
    """Forward hook on the tower's final norm (registered with ``always_call=True``): adds the side
    network's correction at the pooled row, consuming the scratch of the forward that filled it.
    Without such a scratch (the norm called directly, after that forward ended) the norm's own
    output passes through; when the norm raises, the scratch is dropped all the same. A plain
    object (not a closure) so the model deep-copies and pickles with it."""

    def __init__(self, root: nn.Module, name: str, module_name: str, tokens: bool) -> None:
        self.root, self.name, self.module_name, self.tokens = root, name, module_name, tokens

    def __call__(self, norm: nn.Module, args: tuple[Any, ...], out: torch.Tensor | None) -> torch.Tensor | None:
        patch = get_patch(self.root)
        layers = None if patch is None or patch.state is None else patch.state.scratch.pop(self.name, None)
        if out is None or not layers:
            return None
        assert patch is not None and patch.state is not None
        module = self.root.get_submodule(self.module_name)
        assert isinstance(module, SideModule)
        b = out.shape[0]
        rows = pooled_rows(patch.adapter, patch.state, b, out.device)
        mask = token_mask(patch.adapter, patch.state, b, layers[0].shape[1], out.device)
        batch = torch.arange(b, device=out.device)
        anchor = (out[batch, rows] if self.tokens else out).detach()
        delta = module.correction(layers, anchor, mask, rows).to(out.dtype)
        if not self.tokens:
            return out + delta
        return torch.index_put(out, (batch, rows), delta, accumulate=True)


class CompactHeadInput:
    """Forward pre-hook on a trainable timm head: its input, the pooled cls token, is a view of
    the final norm's whole ``[B, N, C]`` output, which a saved view keeps alive; a ``[B, C]``
    copy (same values) keeps only itself. Always copied under grad (``B·C`` floats; storage sizes
    cannot be read inside ``torch.compile``)."""

    def __call__(self, head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and torch.is_grad_enabled():
            return (x.clone(), *args[1:])
        return None


# --- apply / remove (the pieces LST and UniPT share) ------------------------------------------
def attach_side(tower: TowerAdapter, name: str, module_name: str, module: SideModule) -> None:
    """Register ``module`` on the tower root, the layer reader on the tower, the final-norm hook
    (and the compact head input on a timm head)."""
    from vleff.tokens.common import attach_hooks

    norm, tokens = final_norm(tower)
    ref = next(tower.root.parameters())
    module.to(device=ref.device, dtype=ref.dtype)
    attach_hooks([tower], [LayerReader(name, tower)])
    tower.root.add_module(module_name, module)
    module.norm_hook_id = norm.register_forward_hook(
        FinalFeatures(tower.root, name, module_name, tokens), always_call=True
    ).id
    watch_forward_end(tower, name)
    head = tower.classifier_head()
    if head is not None:
        module.head_pre_hook_id = head.register_forward_pre_hook(CompactHeadInput()).id


def detach_side(model: nn.Module, name: str, module_name: str) -> None:
    """Undo :func:`attach_side` on every tower of ``model``."""
    from vleff.tokens.common import hooks_named, remove_hooks

    if not hooks_named(model, name):
        raise ValueError(f"{name} is not applied to this {type(model).__name__}; nothing to remove")
    for tower in find_towers(model):
        module = tower.root._modules.get(module_name)
        if isinstance(module, SideModule):
            norm, _ = final_norm(tower)
            if module.norm_hook_id is not None:
                norm._forward_hooks.pop(module.norm_hook_id, None)
                norm._forward_hooks_always_called.pop(module.norm_hook_id, None)
            if module.head_pre_hook_id is not None:
                tower.classifier_head()._forward_pre_hooks.pop(module.head_pre_hook_id, None)
            unwatch_forward_end(tower, name)
            clear_side_state(tower.root, name)
            del tower.root._modules[module_name]
    remove_hooks(model, name)


# --- freezing ---------------------------------------------------------------------------------
def side_towers(model: nn.Module) -> list[TowerAdapter]:
    """The towers of ``model`` that hold a side module."""
    try:
        towers = find_towers(model)
    except TypeError:
        return []
    return [t for t in towers if any(isinstance(t.root._modules.get(n), nn.Module) for n in SIDE_MODULES)]


def side_modules(model: nn.Module) -> list[nn.Module]:
    return [
        t.root._modules[n]
        for t in side_towers(model)
        for n in SIDE_MODULES
        if isinstance(t.root._modules.get(n), nn.Module)
    ]


def _heads(model: nn.Module) -> list[nn.Module]:
    """The classifier heads of timm side towers (trainable with ``train_head``)."""
    return [h for h in (t.classifier_head() for t in side_towers(model)) if h is not None]


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """The frozen backbone of the side methods applied in ``model``: every side tower's root,
    and the image-text model holding it (open_clip / Hugging Face CLIP, BLIP: both towers, the
    projections, ``logit_scale``) when that model is inside ``model``.

    Why the whole image-text model: a side method on one tower of a CLIP must leave the other
    tower and the contrastive pieces as frozen as the tower it reads (Hugging Face keeps the
    projections and ``logit_scale`` outside the tower roots, open_clip inside), so the rule is
    the same for every family and every side method. Modules of ``model`` outside these (a
    user's BatchNorm or classifier after the backbone, a teacher) are not the backbone: they
    are neither frozen nor left out of side-only state."""
    from vleff.backbones import find_pair

    roots = [t.root for t in side_towers(model)]
    if not roots:
        return []
    found: dict[int, nn.Module] = {id(r): r for r in roots}
    root_ids = set(found)
    for module in model.modules():
        try:
            pair = find_pair(module)
        except TypeError:
            continue
        if any(id(m) in root_ids for m in pair.model.modules()):
            found[id(pair.model)] = pair.model
    return list(found.values())


def _kept(model: nn.Module, train_head: bool) -> set[int]:
    keep = {id(p) for m in side_modules(model) for p in m.parameters()}
    for tower in side_towers(model):  # backbone weights a side module trains (Houlsby's layer norms)
        for n in SIDE_MODULES:
            own = getattr(tower.root._modules.get(n), "backbone_trainable", None)
            if own is not None:
                keep |= {id(p) for p in own(tower.root)}
    if train_head:
        keep |= {id(p) for h in _heads(model) for p in h.parameters()}
    return keep


def _backbone_parameters(model: nn.Module, train_head: bool) -> set[int]:
    return {id(p) for m in backbone_modules(model) for p in m.parameters()} - _kept(model, train_head)


def train_only(model: nn.Module, parameters: list[nn.Parameter]) -> list[str]:
    """``requires_grad`` on exactly ``parameters`` (by identity), off on every other weight of
    ``model``; returns the trainable names. For hosts whose whole body is frozen (MemVP)."""
    keep = {id(p) for p in parameters}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            trainable.append(name)
    return trainable


#: why a side method that freezes the backbone (adapters, prompts) and a ``peft`` tuner refuse each
#: other (registry ``Refusal`` on the ``peft_tuner`` trait): applied after the tuner it would freeze the
#: tuner's parameters inside the blocks, and a tuner applied after it freezes all but its own
FREEZES_PEFT_TUNERS = (
    "each freezes what the other trains (the side method freezes the backbone with the tuner's parameters in it, "
    "the peft tuner freezes all but its own)"
)


#: where ``apply_lst`` / ``apply_unipt`` / ``apply_vqt`` keep the ``requires_grad`` flags they
#: changed (name -> flag before), so ``remove_*`` puts them back (as ``apply_lora`` does)
FLAGS_ATTR = "_vleff_side_requires_grad"


def freeze_on_apply(model: nn.Module) -> None:
    """What every ``apply_*`` of a side method does last: note the flags (once, before the first
    side method) and freeze the backbone (:func:`freeze_backbone`, timm heads trainable)."""
    if FLAGS_ATTR not in model.__dict__:
        object.__setattr__(model, FLAGS_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    freeze_backbone(model, train_head=True)


def restore_on_remove(model: nn.Module) -> None:
    """What every ``remove_*`` of a side method does last: once no side method is left, the
    ``requires_grad`` flags as they were before the first ``apply_*``."""
    if side_towers(model) or FLAGS_ATTR not in model.__dict__:
        return
    flags = model.__dict__.pop(FLAGS_ATTR)
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def freeze_backbone(model: nn.Module, train_head: bool = True) -> list[str]:
    """``requires_grad = False`` on every weight of the backbone (:func:`backbone_modules`: the
    side towers and the image-text model holding them) except the side modules (and timm
    classifier heads when ``train_head``: a head reads only the pooled features, so training it
    saves one ``[B, C]`` tensor). Weights outside the backbone keep their flags. Returns the
    names of the trainable parameters of the side modules and heads."""
    if not side_towers(model):
        raise ValueError(f"no side method is applied to this {type(model).__name__}; apply one first")
    keep = _kept(model, train_head)
    backbone = _backbone_parameters(model, train_head)
    trainable = []
    for name, p in model.named_parameters():
        if id(p) in backbone:
            p.requires_grad_(False)
        elif id(p) in keep:
            p.requires_grad_(True)
            trainable.append(name)
    return trainable


def unfrozen_backbone_parameters(model: nn.Module, train_head: bool = True) -> list[str]:
    """Names of backbone weights (:func:`backbone_modules`) that require grad."""
    backbone = _backbone_parameters(model, train_head)
    return [n for n, p in model.named_parameters() if id(p) in backbone and p.requires_grad]


def refuse_unfrozen_backbone(model: nn.Module, method: str, train_head: bool = True) -> None:
    """``RuntimeError`` naming the backbone weights that require grad under a side method."""
    unfrozen = unfrozen_backbone_parameters(model, train_head)
    if unfrozen:
        shown = ", ".join(unfrozen[:5]) + (f" (+{len(unfrozen) - 5} more)" if len(unfrozen) > 5 else "")
        raise RuntimeError(
            f"{method} needs a frozen backbone, but {len(unfrozen)} backbone weight(s) require grad: {shown}. "
            "Something unfroze them after the callback froze the backbone (the module's own code, another "
            f"method); a trainable backbone makes its activations part of the graph and removes {method}'s memory "
            f"saving. Set requires_grad=False on them, or fine-tune without {method}"
        )


def backbone_eval(model: nn.Module) -> None:
    """The side towers in eval mode (dropout, drop-path off), their side modules in train mode."""
    for tower in side_towers(model):
        tower.root.eval()
        for n in SIDE_MODULES:
            module = tower.root._modules.get(n)
            if isinstance(module, nn.Module):
                module.train()


# --- side-only state ---------------------------------------------------------------------------
def backbone_keys(model: nn.Module) -> set[str]:
    """The ``state_dict`` keys of ``model`` that belong to the frozen backbone
    (:func:`backbone_modules`), side modules excluded: the keys a side-only state leaves out."""
    prefixes = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    heads = [f"{prefixes[id(m)]}." if prefixes[id(m)] else "" for m in backbone_modules(model)]
    return {k for k in model.state_dict() if not is_side_key(k) and any(k.startswith(h) for h in heads)}


def side_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a side run trained or may have changed: everything of ``model`` but the frozen
    backbone (:func:`backbone_keys`) — the side modules, every parameter that requires grad (a
    trained head), and every entry of the user's own modules outside the backbone (a BatchNorm's
    running statistics, a frozen projection of the user's). Loading it onto a fresh backbone of
    the same kind with :func:`load_side_state_dict` reproduces the trained model."""
    if not side_towers(model):
        raise ValueError(f"no side method is applied to this {type(model).__name__}; apply one first")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = backbone_keys(model) - trainable
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def is_side_key(key: str) -> bool:
    return any(key.startswith(f"{m}.") or f".{m}." in key for m in SIDE_MODULES)


def load_side_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`side_state_dict` output onto ``model`` (the side method applied, same
    settings). ``KeyError`` when an entry the side state must hold (side modules, the user's
    own modules) is missing or a key is unknown."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    expected = side_state_dict(model) if side_towers(model) else {}  # none applied: the side keys are unknown
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise KeyError(
            f"side state does not fit this {type(model).__name__}: unknown keys {unknown[:5]}, missing "
            f"keys {missing[:5]}; apply the same side method with the same settings first"
        )
    model.load_state_dict(state, strict=False)
