"""Per-family LoRA targets: the one table saying which attention input projections of a block
an adapter method (LoRA via peft) wraps, keyed by tower-adapter class name.

Why a table: which sub-modules are "the attention input projection" is family knowledge; keeping
it as data beside the adapters means methods never branch on a family, and adding a family is one
row. Each row is ``(module suffixes, parameter suffixes)`` relative to a block: peft wraps whole
``nn.Linear`` modules (``target_modules``) or bare parameters (``target_parameters``, open_clip's
fused ``in_proj_weight`` of ``nn.MultiheadAttention``).
"""

from __future__ import annotations

LORA_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "TimmViTAdapter": (("attn.qkv",), ()),
    "HFCLIPAdapter": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ()),
    "OpenClipVisionAdapter": ((), ("attn.in_proj_weight",)),
    "OpenClipTextAdapter": ((), ("attn.in_proj_weight",)),
}

#: Per-family targets of the ``peft`` tuners beyond LoRA (DoRA, IA³, AdaLoRA), by *role*: which
#: sub-modules of a block play that role. ``"attention_in"`` is :data:`LORA_TARGETS` (the attention
#: input projections); ``"mlp_out"`` is the MLP's output projection (IA³'s feed-forward target, whose
#: *input* it scales: timm ``mlp.fc2``, Hugging Face CLIP ``mlp.fc2``, open_clip ``mlp.c_proj``).
#: Same row layout as :data:`LORA_TARGETS`; a family without a row for a role is not supported for it.
PEFT_TARGETS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "attention_in": LORA_TARGETS,
    #: the attention output projection (QLoRA wraps every Linear of a block). open_clip's
    #: ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and never calls the module's
    #: forward, so its row is the bare parameter (a tuner that cannot wrap one refuses the tower)
    "attention_out": {
        "TimmViTAdapter": (("attn.proj",), ()),
        "HFCLIPAdapter": (("self_attn.out_proj",), ()),
        "OpenClipVisionAdapter": ((), ("attn.out_proj.weight",)),
        "OpenClipTextAdapter": ((), ("attn.out_proj.weight",)),
    },
    #: the MLP's input projection (timm / Hugging Face CLIP ``mlp.fc1``, open_clip ``mlp.c_fc``)
    "mlp_in": {
        "TimmViTAdapter": (("mlp.fc1",), ()),
        "HFCLIPAdapter": (("mlp.fc1",), ()),
        "OpenClipVisionAdapter": (("mlp.c_fc",), ()),
        "OpenClipTextAdapter": (("mlp.c_fc",), ()),
    },
    "mlp_out": {
        "TimmViTAdapter": (("mlp.fc2",), ()),
        "HFCLIPAdapter": (("mlp.fc2",), ()),
        "OpenClipVisionAdapter": (("mlp.c_proj",), ()),
        "OpenClipTextAdapter": (("mlp.c_proj",), ()),
    },
}
