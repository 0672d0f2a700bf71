"""QLoRA (Dettmers et al., NeurIPS 2023): the frozen base's linear layers stored in 4-bit NF4 with
double-quantised scales (:mod:`.nf4`, on ``torchao``), and ``peft`` LoRA adapters on top of them.

Where: every ``nn.Linear`` of every block, as the paper puts LoRA on all linear layers — the roles
``"attention_in"``, ``"attention_out"``, ``"mlp_in"``, ``"mlp_out"`` of
:data:`vleff.backbones.targets.PEFT_TARGETS` (timm ``attn.qkv``/``attn.proj``/``mlp.fc1``/``mlp.fc2``;
Hugging Face CLIP ``q/k/v_proj``/``out_proj``/``fc1``/``fc2``). **open_clip is refused**: its
``nn.MultiheadAttention`` keeps q/k/v and the output projection as bare parameters it reads
directly, so there is no ``nn.Linear`` to replace by an NF4 layer. Hugging Face BLIP has no row:
refused too. Embeddings, norms and the classifier head stay in full precision (the paper keeps
everything but the Linear weights in 16 bits and trains no head; vleff's ``train_head`` keeps a
timm head trainable, as its other tuners).

The LoRA starts with ``B = 0``: the applied model equals the *quantised* model (not the fp32 one;
the quantisation error, about 9 % relative per weight, is the price of the 4-bit base).

Removal: the fp32 layers are kept aside (a plain attribute, not in ``state_dict``) unless
``keep_original=False``, and put back — exactly the original modules and weights. Keeping them
costs the full-precision bytes of every target weight (on ViT-B/16, 339.7 MB fp32 for 43.8 MB of
NF4): to *save* memory, pass ``keep_original=False``; removal then rebuilds ``nn.Linear`` layers
from the dequantised NF4 weights (names, flags and keys restored, values those of the 4-bit base).

Trainable parameters per target ``W: out × in``: ``r·(in + out)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.methods.qlora.nf4 import NF4Linear, check_quantizable, nf4_storage_bytes, torchao_nf4
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "qlora"
LABEL = "QLoRA"
TOWERS = ("image", "text")
ROLES = ("attention_in", "attention_out", "mlp_in", "mlp_out")
SUPPORTED = "timm ViT and Hugging Face CLIP towers (image and text)"
WHY_NOT_OPEN_CLIP = (
    "open_clip's nn.MultiheadAttention keeps q/k/v and the output projection as bare parameters it reads "
    "directly, so they cannot be replaced by 4-bit NF4 linear layers"
)
#: where :func:`apply_qlora` keeps the layers it replaced: ``{name: (original module or None,
#: its weight's requires_grad)}``
#: and the block sizes (a plain attribute, so it deep-copies and pickles with the model)
QUANT_ATTR = "_vleff_qlora_base"


@dataclass
class QLoRAConfig(MethodConfig):
    """QLoRA's settings (defaults: the paper's code, ``artidoro/qlora``).

    Attributes:
        r: LoRA rank (64 in the paper's code).
        alpha: scale ``alpha / r`` of ``BA`` (16).
        dropout: dropout on the adapter input in training (0.0; 0.1 for its 7B/13B runs).
        block_size: weights per NF4 absmax block (64).
        scaler_block_size: absmax constants per double-quantisation block (256).
        keep_original: keep the fp32 layers aside so removal restores them exactly (costs their bytes).
        train_head: keep a timm classifier head trainable.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.0
    block_size: int = 64
    scaler_block_size: int = 256
    keep_original: bool = True
    train_head: bool = True
    towers: str = "all"

    def __post_init__(self) -> None:
        self.r = check_int("r", self.r, low=1)
        self.alpha = check_number("alpha", self.alpha, low=0.0, low_open=True)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        self.block_size = check_int("block_size", self.block_size, low=2)
        if self.block_size % 2:  # two 4-bit codes per byte
            raise ValueError(f"block_size={self.block_size} must be even (two 4-bit codes share a byte)")
        self.scaler_block_size = check_int("scaler_block_size", self.scaler_block_size, low=1)
        self.keep_original = check_bool("keep_original", self.keep_original)
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)


def _peft_config(cfg: QLoRAConfig, targets: dict[str, list[str]]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, **targets)


TUNER = pt.PeftTuner(
    NAME, LABEL, SUPPORTED, WHY_NOT_OPEN_CLIP, _peft_config, roles=ROLES, refuse_conflicts=refuse_applied_conflicts
)


def qlora_targets(model: nn.Module, towers: str = "all") -> list[str]:
    """Full names (relative to ``model``) of the ``nn.Linear`` layers QLoRA quantises and adapts;
    ``TypeError`` naming the tower and what is supported for a tower it cannot wrap."""
    return TUNER.targets(model, towers)


def apply_qlora(model: nn.Module, config: QLoRAConfig | None = None, **settings: Any) -> nn.Module:
    """Replace the blocks' linear layers of ``towers`` by frozen 4-bit NF4 layers and add ``peft``
    LoRA adapters on them, in place; only the adapters (and a timm head with ``train_head``) train.
    The model starts at the quantised model. Applying again replaces both. :func:`remove_qlora`
    undoes it (exactly with ``keep_original``).

    Raises:
        ImportError: ``torchao`` is missing (what to install).
        TypeError: a tower QLoRA cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: a target weight that is not whole blocks of ``block_size·scaler_block_size``
            (naming the layer), or another method wrapping the projections is applied.
    """
    cfg = QLoRAConfig.build(config, **settings)
    torchao_nf4()  # the backend first: say what to install before anything changes
    if qlora_applied(model):
        remove_qlora(model)
    names = TUNER.targets(model, cfg.towers)  # refuses a tower before anything changes
    refuse_applied_conflicts(model, NAME)
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"QLoRA: {name} is a {type(layer).__name__}, not an nn.Linear; it cannot be quantised")
        check_quantizable(name, layer.weight, cfg.block_size, cfg.scaler_block_size)
    originals: dict[str, tuple[nn.Module | None, bool]] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        layer = modules[name]
        setattr(parent, child, NF4Linear(layer, cfg.block_size, cfg.scaler_block_size))
        originals[name] = (layer if cfg.keep_original else None, layer.weight.requires_grad)
    try:
        TUNER.apply(model, cfg)
    except Exception:
        _put_back(model, originals)
        raise
    object.__setattr__(model, QUANT_ATTR, originals)
    return model


def _put_back(model: nn.Module, originals: dict[str, tuple[nn.Module | None, bool]]) -> None:
    modules = dict(model.named_modules())
    for name, (original, trains) in originals.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        quantised = getattr(parent, child)
        if original is None:  # rebuilt from the 4-bit weights (keep_original=False)
            weight = quantised.dequantized()
            original = nn.Linear(quantised.in_features, quantised.out_features, bias=quantised.bias is not None)
            original.weight = nn.Parameter(weight, requires_grad=trains)
            original.bias = quantised.bias
        setattr(parent, child, original)


def remove_qlora(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_qlora`: the LoRA layers removed, the NF4 layers replaced by the original
    full-precision layers (with ``keep_original``; otherwise ``nn.Linear`` layers holding the
    dequantised weights), flags and ``state_dict`` keys as before."""
    target = pt.holder(model, NAME)
    TUNER.remove(model)  # raises naming QLoRA when it is not applied
    assert target is not None
    _put_back(target, target.__dict__.pop(QUANT_ATTR))
    return model


def qlora_weight_bytes(model: nn.Module) -> dict[str, float]:
    """What the 4-bit base stores, measured on the applied model: ``{"params": weights quantised,
    "nf4_bytes": bytes of their NF4 tensors (codes, absmax codes, scales, level tables),
    "fp32_bytes", "bf16_bytes": the same weights in 32 / 16 bits, "bits_per_param":
    8·nf4_bytes / params, "kept_bytes": bytes of the fp32 layers kept for an exact removal}``."""
    target = pt.holder(model, NAME)
    if target is None:
        raise ValueError(f"QLoRA is not applied to this {type(model).__name__}")
    layers = [m for m in target.modules() if isinstance(m, NF4Linear)]
    params = sum(m.in_features * m.out_features for m in layers)
    nf4 = sum(nf4_storage_bytes(m) for m in layers)
    kept_layers = [o for o, _ in target.__dict__[QUANT_ATTR].values() if o is not None]
    kept = sum(o.weight.numel() * o.weight.element_size() for o in kept_layers)
    return {
        "params": params,
        "nf4_bytes": nf4,
        "fp32_bytes": 4 * params,
        "bf16_bytes": 2 * params,
        "bits_per_param": 8 * nf4 / params,
        "kept_bytes": kept,
    }


def qlora_quantization_error(model: nn.Module) -> float:
    """``‖W − deq(NF4(W))‖ / ‖W‖`` over every quantised weight (needs ``keep_original``)."""
    target = pt.holder(model, NAME)
    if target is None:
        raise ValueError(f"QLoRA is not applied to this {type(model).__name__}")
    originals = target.__dict__[QUANT_ATTR]
    if any(o is None for o, _ in originals.values()):
        raise ValueError("QLoRA was applied with keep_original=False: the fp32 weights to compare with are gone")
    modules = dict(target.named_modules())
    num = den = 0.0
    for name, (original, _) in originals.items():
        assert original is not None
        layer = modules[name]
        while hasattr(layer, "base_layer"):
            layer = layer.base_layer
        w = original.weight.detach().double()
        num += float((layer.dequantized().double() - w).pow(2).sum())
        den += float(w.pow(2).sum())
    return (num / den) ** 0.5


qlora_applied = TUNER.applied
qlora_parameters = TUNER.parameters
qlora_state_dict = TUNER.state_dict
qlora_settings = TUNER.settings

__all__ = [
    "QLoRAConfig",
    "apply_qlora",
    "qlora_applied",
    "qlora_parameters",
    "qlora_quantization_error",
    "qlora_settings",
    "qlora_state_dict",
    "qlora_targets",
    "qlora_weight_bytes",
    "remove_qlora",
]
