"""LoRA through Hugging Face ``peft`` (the baseline side tuning is compared with; vleff does not
implement LoRA itself): ``peft.inject_adapter_in_model`` adds the adapters in place, so the
user's model keeps its class and attribute names (a LightningModule keeps working).

Targets per family (the attention input projections, the usual LoRA choice for ViTs):

* timm ViT: every block's fused ``attn.qkv`` ``nn.Linear`` (``target_modules``);
* Hugging Face CLIP (both towers): ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` ``nn.Linear``;
* open_clip (both towers): the blocks' ``nn.MultiheadAttention`` keeps q/k/v in one raw
  parameter, ``in_proj_weight``, with no ``nn.Linear`` to wrap. ``peft`` 0.21 reaches it through
  ``target_parameters=["attn.in_proj_weight"]`` (its ``ParamWrapper``: ``W + BA`` substituted for
  the parameter while the module's forward runs); tested here to equal the model exactly at init.

Where ``peft`` cannot wrap (said here so nobody relies on it):

* ``peft``'s own ``nn.MultiheadAttention`` LoRA layer (``target_modules=["attn"]``) is **not
  used**: on an open_clip block it changes the output of an untrained adapter (measured here:
  max |Δ| ≈ 3.6 on the tiny test CLIP with ``B = 0``), so vleff uses ``target_parameters``.
* open_clip's ``out_proj`` is not adapted: ``nn.MultiheadAttention`` never calls its forward.
* open_clip towers with LoRA and a vleff tower hook (ToMe, EViT, LST ...) do not combine: vleff's
  generic block reads ``in_proj_weight`` directly, without ``peft``'s substitution, so the
  adapter would be silently ignored; :func:`apply_lora` refuses a patched open_clip tower.
"""
from __future__ import annotations

import torch
from torch import nn

from vleff.backbones import find_towers, get_patch
from vleff.checks import check_bool, check_int, check_number

ADAPTER = "default"


def lora_targets(model: nn.Module) -> dict[str, list[str]]:
    """``{"target_modules": [...], "target_parameters": [...]}`` for the towers of ``model``
    (``TypeError`` when none is supported)."""
    towers = find_towers(model)
    modules: set[str] = set()
    params: set[str] = set()
    for tower in towers:
        if tower.family == "timm":
            modules.add("attn.qkv")
        elif tower.family == "transformers" and type(tower.root).__name__ in ("CLIPVisionModel", "CLIPTextModel"):
            modules.update(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        elif tower.family == "open_clip":
            params.add("attn.in_proj_weight")
        else:
            raise TypeError(f"LoRA does not support {tower.describe()} yet; it supports timm ViT, open_clip and "
                            "Hugging Face CLIP towers")
    return {"target_modules": sorted(modules), "target_parameters": sorted(params)}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               train_head: bool = True) -> nn.Module:
    """Inject ``peft`` LoRA adapters (rank ``r``, scale ``alpha / r``) into the attention input
    projections of every supported tower, in place, and train only them (and a timm classifier
    head when ``train_head``). ``B`` starts at zero: the model starts at the frozen model."""
    from peft import LoraConfig, inject_adapter_in_model

    r = check_int("r", r, low=1)
    alpha = check_number("alpha", alpha, low=0.0, low_open=True)
    dropout = check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
    train_head = check_bool("train_head", train_head)
    if lora_applied(model):
        raise ValueError(f"LoRA is already applied to this {type(model).__name__}; build the model again to change it")
    towers = find_towers(model)
    targets = lora_targets(model)
    for tower in towers:
        if tower.family == "open_clip" and get_patch(tower.root) is not None:
            raise ValueError(f"cannot apply LoRA to {tower.describe()} while a vleff tower hook is applied "
                             f"({', '.join(h.name for h in get_patch(tower.root).hooks)}): vleff's generic block reads "
                             "in_proj_weight without peft's substitution and would ignore the adapter; remove it first")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets["target_modules"] or None,
                        target_parameters=targets["target_parameters"] or None)
    if not targets["target_modules"]:
        config.target_modules = []  # parameters only (peft: an empty list, not None)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    heads = {id(p) for t in towers if t.family == "timm" and train_head for p in t.root.head.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or id(p) in heads)
    return model


def lora_applied(model: nn.Module) -> bool:
    return any("lora_A" in n for n, _ in model.named_parameters())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_num_parameters(r: int, pairs: list[tuple[int, int]]) -> int:
    """Parameters of rank-``r`` adapters on weights of shapes ``(out, in)``: ``r·(in + out)`` each."""
    return sum(r * (i + o) for o, i in pairs)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' (and trainable heads') state."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or k in trainable}


__all__ = ["apply_lora", "lora_applied", "lora_num_parameters", "lora_parameters", "lora_state_dict", "lora_targets"]
