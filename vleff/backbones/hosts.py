"""Host adapters: what a method that acts on a whole vision-language model (a *host*) may ask of it.

Tower adapters (:mod:`vleff.backbones.base`) describe one encoder; a host method (MemVP) reads
visual features and changes the language model's feed-forward layers, so it needs a different
view: where the FFN sites are and in which layout, the LM's width, where the visual tokens come
from, and which modules read the image by cross-attention. The family knowledge for that view
lives here (Hugging Face BLIP captioning/VQA, Hugging Face causal LMs, and any model that
describes itself through the :class:`HostModel` protocol, as ``vleff.models.VisionLanguageModel``
does), so host methods contain no family branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

SUPPORTED_FFN = (
    "gated MLP with gate_proj/up_proj/down_proj (Llama family), plain MLP with c_fc/c_proj (GPT-2) "
    "or fc1/fc2, and Hugging Face BLIP text layers (intermediate/output)"
)
SUPPORTED_HOSTS = (
    "Hugging Face BlipForConditionalGeneration / BlipForQuestionAnswering, "
    "vleff.models.VisionLanguageModel, or a Hugging Face causal LM with such FFNs"
)


class Slot:
    """Holds a per-forward tensor (the current memory, a stashed read). Never copied or pickled:
    the tensors belong to one forward's graph (``deepcopy`` of a non-leaf tensor fails)."""

    def __init__(self) -> None:
        self.value: Any = None

    def __deepcopy__(self, memo: dict) -> Slot:
        return Slot()

    def __reduce__(self) -> tuple:
        return (Slot, ())


@dataclass(frozen=True)
class FFNSite:
    """One feed-forward layer of the language model.

    Pre-norm layers (``norm is None``): ``ffn`` is the FFN module; its input is the FFN input and
    a method's read joins its output. Post-norm layers (BLIP text): ``ffn`` is the module whose
    forward input is the FFN input (``intermediate``) and the read joins the residual sum that
    enters ``norm`` (``output.LayerNorm``), as the FFN's own output does.
    """

    name: str  # qualified name in the host
    ffn: nn.Module
    norm: nn.Module | None = None


@dataclass(frozen=True)
class CrossReader:
    """A text model that reads the image by cross-attention (BLIP): the states it is called with
    (``encoder_hidden_states``) are what it sees of the image, or of the encoded question."""

    module: nn.Module
    role: str  # "image": reads the vision tower's states; "answer": reads the question encoder's


@dataclass
class Host:
    """A vision-language host as host methods see it."""

    sites: list[FFNSite]
    width: int  # the language model's hidden width
    source: nn.Module | None = None  # its forward output holds the visual tokens (None: cross readers)
    visual_dim: int | None = None  # width of the visual tokens
    prefix_tokens: int = 0  # leading non-patch tokens of the visual source (class token)
    num_visual_tokens: int | None = None  # tokens per image, where fixed
    vision_tower: Any = None  # the vision TowerAdapter (methods that also adapt the vision tower)
    cross_readers: list[CrossReader] = field(default_factory=list)
    #: one forward of this module is one image-text call (its end closes per-call state); ``None``:
    #: each cross reader's call is one
    call: nn.Module | None = None


@runtime_checkable
class HostModel(Protocol):
    """A model that describes itself as a host (``vleff.models.VisionLanguageModel``)."""

    def vleff_host(self) -> Host: ...


def _ffn_kind(mlp: nn.Module) -> str | None:
    names = set(mlp._modules)
    if {"gate_proj", "up_proj", "down_proj"} <= names:
        return "gated"
    if {"c_fc", "c_proj"} <= names or {"fc1", "fc2"} <= names:
        return "plain"
    return None


def causal_lm_sites(lm: nn.Module, prefix: str = "") -> tuple[list[FFNSite], int]:
    """The FFN sites of a Hugging Face causal LM (decoder layers under ``base_model.layers`` or
    ``.h``) and its width; ``TypeError`` naming the module type of an unsupported FFN (its message
    reads after the method's name: "does not support ...")."""
    base = getattr(lm, "base_model", lm)
    layers = getattr(base, "layers", None)
    attr = "layers"
    if layers is None:
        layers, attr = getattr(base, "h", None), "h"
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(
            f"does not support {type(lm).__name__}: no decoder layers found "
            f"(base_model.layers or .h); supported hosts: {SUPPORTED_HOSTS}"
        )
    base_name = next((n for n, m in lm.named_modules() if m is base), "")
    sites = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        where = ".".join(p for p in (prefix, base_name, attr, str(i), "mlp") if p)
        if not isinstance(mlp, nn.Module) or _ffn_kind(mlp) is None:
            kind = type(mlp).__name__ if mlp is not None else f"{type(layer).__name__} without .mlp"
            raise TypeError(f"does not support the FFN module type {kind} ({where}); supported: {SUPPORTED_FFN}")
        sites.append(FFNSite(where, mlp))
    config = getattr(lm, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if width is None:
        raise TypeError(
            f"does not support {type(lm).__name__}: no config.hidden_size; supported hosts: {SUPPORTED_HOSTS}"
        )
    return sites, int(width)


def _blip_host(model: nn.Module) -> Host:
    from transformers.models.blip.modeling_blip_text import BlipTextLayer, BlipTextModel

    from vleff.backbones.towers import find_tower

    sites: list[FFNSite] = []
    widths = set()
    for name, module in model.named_modules():
        if isinstance(module, BlipTextModel):
            widths.add(int(module.config.hidden_size))
            for i, layer in enumerate(module.encoder.layer):
                if not isinstance(layer, BlipTextLayer):
                    raise TypeError(
                        f"does not support the FFN module type {type(layer).__name__} ({name}.encoder.layer.{i}); "
                        f"supported: {SUPPORTED_FFN}"
                    )
                sites.append(FFNSite(f"{name}.encoder.layer.{i}", layer.intermediate, layer.output.LayerNorm))
    if not sites or len(widths) != 1:
        raise TypeError(
            f"does not support {type(model).__name__}: no BLIP text model of one width found; "
            f"supported hosts: {SUPPORTED_HOSTS}"
        )
    vision = model.vision_model
    n = (int(vision.config.image_size) // int(vision.config.patch_size)) ** 2
    # VQA: the question encoder reads the image, the answer decoder reads the encoded question;
    # captioning: the decoder reads the image
    readers = [CrossReader(model.text_encoder, "image")] if hasattr(model, "text_encoder") else []
    readers.append(CrossReader(model.text_decoder.bert, "answer" if readers else "image"))
    return Host(
        sites,
        widths.pop(),
        None,
        int(vision.config.hidden_size),
        1,
        n + 1,
        find_tower(vision, "image"),
        cross_readers=readers,
    )


def _host_kind(model: nn.Module) -> str | None:
    if isinstance(model, HostModel):
        return "self"
    try:
        from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of every supported host
        return None
    if isinstance(model, (BlipForConditionalGeneration, BlipForQuestionAnswering)):
        return "blip"
    name = type(model).__name__
    if isinstance(model, PreTrainedModel) and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        return "causal_lm"
    return None


def is_host(model: nn.Module) -> bool:
    """Whether ``model`` itself is a host."""
    return _host_kind(model) is not None


def holds_host(module: nn.Module) -> bool:
    """Whether ``module`` holds a host (itself or a submodule)."""
    return any(is_host(m) for m in module.modules())


def locate_host(model: nn.Module, method: str) -> nn.Module:
    """``model`` itself when it is a host, else its one outermost host submodule (a
    LightningModule holding a VisionLanguageModel or a BLIP model); ``TypeError`` naming
    ``method`` and what is supported otherwise."""
    if is_host(model):
        return model
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_host(module) and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    if len(found) != 1:
        what = "none" if not found else ", ".join(f"{n} ({type(m).__name__})" for n, m in found)
        raise TypeError(
            f"{method} does not support {type(model).__name__}: it needs one host model inside, found "
            f"{what}; supported hosts: {SUPPORTED_HOSTS}"
        )
    return found[0][1]


def find_host(model: nn.Module, method: str) -> Host:
    """The :class:`Host` of ``model`` (itself a host), or ``TypeError`` naming ``method`` and
    what is supported."""
    kind = _host_kind(model)
    try:
        if kind == "self":
            return model.vleff_host()  # type: ignore[union-attr]
        if kind == "blip":
            return _blip_host(model)
        if kind == "causal_lm":
            sites, width = causal_lm_sites(model)
            return Host(sites, width)
    except TypeError as error:
        raise TypeError(f"{method} {error}") from None
    raise TypeError(f"{method} does not support {type(model).__name__}; supported hosts: {SUPPORTED_HOSTS}")
