"""MemVP (Jie et al., ICML 2024): visual knowledge as extra key/value rows of a language model's FFNs.

Instead of prepending visual tokens to the text (LLaVA-style "prefix" prompting, which makes
every sequence ``N_v`` tokens longer), the visual features of a sample become ``n_mem`` extra
*memory* rows of every FFN::

    Z = pad(0.01 · W2 silu(W1 f), n_mem)       # f: the vision tower's patch tokens [N_v, D_v]
    K = Z + E_k,  V = Z + E_v                   # shared by all layers; E_k ~ N(0, 0.02²), E_v = 0
    FFN'(u) = FFN(u) + s · dropout(silu(u Kᵀ)) V

``u`` is the FFN's input (the normed hidden state of a pre-norm decoder layer; the attention
output of a post-norm BLIP text layer), so ``K`` reads like rows appended to the FFN's first
weight matrix and ``V`` like rows appended to its second. The text sequence keeps its length:
the cost is two ``[N, C] x [C, n_mem]`` products per layer, not attention over ``N_v`` more
tokens.

How it is attached: as a wrapper of the FFN (the G branch) made of module forward hooks, not
of a replacement module, so the host's own forward runs, its ``state_dict`` keys stay the same
and :func:`remove_memvp` restores it bit-exactly. The sites:

* a pre-norm decoder layer's ``mlp`` (Llama-family gated MLP: ``gate_proj``/``up_proj``/``down_proj``;
  GPT-2's plain ``c_fc``/``c_proj`` MLP; ``fc1``/``fc2``): one forward hook adds the memory
  read of its input to its output, inside the residual;
* a Hugging Face BLIP text layer (post-norm BERT): a forward hook on ``intermediate`` reads
  its input ``a`` and a pre-hook on ``output.LayerNorm`` adds the memory read to the
  residual sum, ``LN(a + FFN(a) + s·silu(a Kᵀ) V)``. Both modules are called by the library's
  layer forward *and* by vleff's generic post-norm block (when a token method patches the
  tower), so the memory works under either.

Where the visual features come from:

* BLIP (``BlipForConditionalGeneration``, ``BlipForQuestionAnswering``): a forward pre-hook on
  the text model that cross-attends to the image (the captioning decoder, the VQA question
  encoder) takes the ``encoder_hidden_states`` of that call (without the class token,
  ``visual_tokens="patch"``);
* :class:`vleff.models.VisionLanguageModel`: its visual encoder's patch tokens, the same way;
* a bare Hugging Face causal LM: :func:`set_memvp_memory` (the memory is constant per sample,
  so a library ``generate`` on the patched LM uses it at every step).

Optionally (``vision_adapter_dim > 0``, the reference uses 12) every vision block gets a small
parallel adapter beside its MLP, ``mlp(h) + s_v·up(gelu(down(h)))`` with ``up`` zero-initialised
and ``s_v = 0.1`` (``vision_adapter_scale``; the reference's ``set_Clip_Adapter(..., s=0.1)``
multiplies the adapter's output by it in ``forward_clip``), hooked on the module the tower
adapter names as the block's MLP (timm, open_clip, HF CLIP/BLIP).

The memory belongs to the call that made it and does not outlive it: a BLIP text model's call
makes it from the ``encoder_hidden_states`` it receives (the decoder reads the image it
cross-attends to; library generation passes them, beam-expanded, at every step), and the VQA
answer decoder reads the image of the question encoded last; a ``VisionLanguageModel``'s
``forward`` / ``generate`` clears it when it returns; a bare LM's memory
(:func:`set_memvp_memory`) stays until set again. An FFN batch other than the memory's is
refused, never repeated. It is never copied, pickled or saved. With ``scale=0`` the model
equals the host.

>>> vleff.apply_memvp(blip, n_mem=64)        # projector sized from the vision tower
>>> vleff.remove_memvp(blip)                 # the original model, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones.hosts import Slot, find_host, holds_host, locate_host
from vleff.checks import check_choice, check_int, check_number
from vleff.registry import MethodConfig
from vleff.side.common import train_only

MODULE_NAME = "vleff_memvp"


@dataclass
class MemVPConfig(MethodConfig):
    """MemVP's settings.

    Attributes:
        n_mem: memory rows per FFN (the visual tokens are zero-padded to it; the paper uses
            the tower's 256 patch tokens). Must be at least the number of visual tokens.
        scale: ``s``, the weight of the memory read (the paper: 0.1; 0 gives the host exactly).
        visual_dim: width of the visual features; ``None`` reads it from the host's vision tower.
        projector_hidden: hidden width of the ``Linear → SiLU → Linear`` projector (vleff's
            default; the paper does not fix it for every size).
        projector_scale: the factor on the projector output (the reference: 0.01), so the
            memory starts small and the host's behaviour is barely changed at step 0.
        key_init_std: std of the shared key offset ``E_k`` (0.02); ``E_v`` starts at 0.
        dropout: dropout on ``silu(u Kᵀ)`` in training (0 keeps runs deterministic).
        visual_tokens: ``"patch"`` drops the tower's prefix (class) tokens, as the paper's
            CLIP patch features; ``"all"`` keeps them.
        vision_adapter_dim: hidden width of the reference's small parallel adapters in every
            block of the vision tower (``mlp(h) + s_v·up(gelu(down(h)))``, ``up`` zero-initialised,
            so the tower starts unchanged; the reference: 12); 0 (default) adds none.
        vision_adapter_scale: ``s_v``, the factor on those adapters' output (the reference: 0.1).
    """

    method = "memvp"
    n_mem: int = 256
    scale: float = 0.1
    visual_dim: int | None = None
    projector_hidden: int = 128
    projector_scale: float = 0.01
    key_init_std: float = 0.02
    dropout: float = 0.0
    visual_tokens: str = "patch"
    vision_adapter_dim: int = 0
    vision_adapter_scale: float = 0.1

    def __post_init__(self) -> None:
        self.n_mem = check_int("n_mem", self.n_mem, low=1)
        self.scale = check_number("scale", self.scale, low=0.0)
        if self.visual_dim is not None:
            self.visual_dim = check_int("visual_dim", self.visual_dim, low=1)
        self.projector_hidden = check_int("projector_hidden", self.projector_hidden, low=1)
        self.projector_scale = check_number("projector_scale", self.projector_scale, low=0.0, low_open=True)
        self.key_init_std = check_number("key_init_std", self.key_init_std, low=0.0)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_choice("visual_tokens", self.visual_tokens, ("patch", "all"))
        self.vision_adapter_dim = check_int("vision_adapter_dim", self.vision_adapter_dim, low=0)
        self.vision_adapter_scale = check_number("vision_adapter_scale", self.vision_adapter_scale, low=0.0)


class VisionAdapter(nn.Module):
    """A parallel bottleneck beside one vision block's MLP: ``scale·up(dropout(gelu(down(h))))``,
    ``up`` zero-initialised (exactly zero output until trained). ``scale`` is the reference's
    ``s = 0.1``: it sets the adapter's effective learning rate relative to the backbone's MLP."""

    def __init__(self, width: int, hidden: int, dropout: float, scale: float = 0.1) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        nn.init.zeros_(self.up.weight)
        self.dropout = dropout

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = F.gelu(self.down(h))
        if self.training and self.dropout > 0:
            a = F.dropout(a, p=self.dropout)
        return self.scale * self.up(a)


class MemVPModule(nn.Module):
    """The trained parts, registered on the host as ``vleff_memvp``: the projector and the
    shared key/value offsets. Holds the current sample memory ``(K, V)`` (``[B, n_mem, C]``)."""

    def __init__(
        self, visual_dim: int, width: int, config: MemVPConfig, vision_blocks: int = 0, vision_width: int = 0
    ) -> None:
        super().__init__()
        self.visual_dim, self.width = visual_dim, width
        self.n_mem, self.scale, self.dropout = config.n_mem, config.scale, config.dropout
        self.projector_scale = config.projector_scale
        self.projector = nn.Sequential(
            nn.Linear(visual_dim, config.projector_hidden), nn.SiLU(), nn.Linear(config.projector_hidden, width)
        )
        self.key_offset = nn.Parameter(torch.randn(config.n_mem, width) * config.key_init_std)
        self.value_offset = nn.Parameter(torch.zeros(config.n_mem, width))
        self.memory = Slot()
        if config.vision_adapter_dim:
            self.adapters = nn.ModuleList(
                VisionAdapter(vision_width, config.vision_adapter_dim, config.dropout, config.vision_adapter_scale)
                for _ in range(vision_blocks)
            )

    def set_memory(self, features: torch.Tensor) -> None:
        """Project ``features`` ``[B, N_v, visual_dim]`` into this batch's memory."""
        if features.dim() != 3 or features.shape[-1] != self.visual_dim:
            raise ValueError(
                f"MemVP: visual features have shape {tuple(features.shape)}; expected "
                f"[batch, tokens, visual_dim={self.visual_dim}] (the projector's input width)"
            )
        if features.shape[1] > self.n_mem:
            raise ValueError(
                f"MemVP: n_mem={self.n_mem} is smaller than the number of visual tokens "
                f"({features.shape[1]}); use n_mem >= {features.shape[1]}"
            )
        z = self.projector(features) * self.projector_scale
        z = F.pad(z, (0, 0, 0, self.n_mem - z.shape[1]))
        self.memory.value = (z + self.key_offset.to(z.dtype), z + self.value_offset.to(z.dtype))

    def clear_memory(self) -> None:
        self.memory.value = None

    def read(self, u: torch.Tensor) -> torch.Tensor:
        """``s · dropout(silu(u Kᵀ)) V`` for an FFN input ``u`` ``[B, N, C]``.

        The memory must be of the same batch: a memory set for other samples is refused, not
        repeated (a memory of one image silently spread over a later batch of text-only prompts
        would condition them on that image). Beam search and several sequences per image read a
        memory set from the expanded batch (BLIP's cross-attention states are expanded by the
        library; a bare LM's features are the caller's to ``repeat_interleave``)."""
        kv = self.memory.value
        if kv is None:
            raise RuntimeError(
                "MemVP: an FFN ran without visual memory; run the model with its images (BLIP: "
                "encoder_hidden_states, VisionLanguageModel: images) or call "
                "vleff.methods.memvp.core.set_memvp_memory(model, features) on a bare LM"
            )
        k, v = kv
        if u.shape[-1] != k.shape[-1]:
            raise ValueError(f"MemVP: FFN input width {u.shape[-1]} differs from the memory width {k.shape[-1]}")
        if u.shape[0] != k.shape[0]:
            raise RuntimeError(
                f"MemVP: the FFN input has batch {u.shape[0]} but the visual memory was set for batch "
                f"{k.shape[0]}; set the memory for this batch (set_memvp_memory with one row of "
                "features per sequence: repeat_interleave them for beams or several sequences per "
                "image)"
            )
        a = F.silu(torch.matmul(u, k.to(u.dtype).transpose(1, 2)))
        if self.training and self.dropout > 0:
            a = F.dropout(a, p=self.dropout)
        return self.scale * torch.matmul(a, v.to(u.dtype))


# --- hooks (plain objects, so the host deep-copies and pickles with them) ------------------------------
class _MemVPHook:
    """Base of every hook MemVP registers (how :func:`remove_memvp` finds them)."""

    def __init__(self, memory: MemVPModule) -> None:
        self.memory = memory


class _FFNOutput(_MemVPHook):
    """Forward hook on a pre-norm layer's ``mlp``: ``mlp(u) + read(u)``."""

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.memory.read(args[0]).to(output.dtype)


class _FFNInput(_MemVPHook):
    """Forward hook on a BLIP text layer's ``intermediate``: reads its input ``a``, stashes ``read(a)``."""

    def __init__(self, memory: MemVPModule, stash: Slot) -> None:
        super().__init__(memory)
        self.stash = stash

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.stash.value = self.memory.read(args[0])


class _ResidualAdd(_MemVPHook):
    """Forward pre-hook on a BLIP text layer's ``output.LayerNorm``: adds the stashed read to the
    residual sum ``a + FFN(a)`` the norm receives."""

    def __init__(self, memory: MemVPModule, stash: Slot) -> None:
        super().__init__(memory)
        self.stash = stash

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        read, self.stash.value = self.stash.value, None
        if read is None:
            raise RuntimeError(
                "MemVP: a BLIP text layer's output LayerNorm ran without its FFN input hook "
                "(intermediate) before it; the layer's FFN order is not the one MemVP supports"
            )
        return (args[0] + read.to(args[0].dtype), *args[1:])


class _ParallelAdapter(_MemVPHook):
    """Forward hook on a vision block's MLP: ``mlp(h) + adapter_i(h)`` (the adapter applies its scale)."""

    def __init__(self, memory: MemVPModule, index: int) -> None:
        super().__init__(memory)
        self.index = index

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        adapter = self.memory.adapters[self.index]
        return output + adapter(args[0]).to(output.dtype)


def _cross_states(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``encoder_hidden_states`` a BLIP text model was called with (keyword or positional)."""
    if "encoder_hidden_states" in kwargs:
        return kwargs["encoder_hidden_states"]
    import inspect

    names = list(inspect.signature(type(module).forward).parameters)[1:]
    index = names.index("encoder_hidden_states") if "encoder_hidden_states" in names else len(args)
    return args[index] if index < len(args) else None


class _CrossStatesMemory(_MemVPHook):
    """Forward pre-hook (with kwargs) on a BLIP text model: the memory of *this call*.

    ``role="image"`` (the captioning decoder, the VQA question encoder): the memory is made from
    the ``encoder_hidden_states`` the call receives (the image tokens, less ``drop`` prefix
    tokens), so a decoder reads the image it cross-attends to, not the last image that went
    through ``vision_model``; the VQA encoder also keeps it as the image of its question.
    ``role="answer"`` (the VQA answer decoder, whose cross-attention reads the question states):
    the image of the question encoded last, repeated to the batch of the states it receives
    (beam search expands them question by question)."""

    def __init__(self, memory: MemVPModule, drop: int, role: str, image: Slot) -> None:
        super().__init__(memory)
        self.drop, self.role, self.image = drop, role, image

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        states = _cross_states(module, args, kwargs)
        if self.role == "image":
            if states is None:
                self.memory.clear_memory()
                return
            self.memory.set_memory(states[:, self.drop :])
            self.image.value = self.memory.memory.value
            return
        kv = self.image.value
        if kv is None or states is None:
            self.memory.clear_memory()
            return
        k, v = kv
        if states.shape[0] != k.shape[0]:
            if states.shape[0] % k.shape[0]:
                raise RuntimeError(
                    f"MemVP: the BLIP answer decoder runs on batch {states.shape[0]}, not a multiple "
                    f"of the batch of the question encoded last ({k.shape[0]})"
                )
            reps = states.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(reps, dim=0), v.repeat_interleave(reps, dim=0)
        self.memory.memory.value = (k, v)


class _CallEnd(_MemVPHook):
    """Forward hook (``always_call``) ending the memory of one call: it does not outlive it."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.memory.clear_memory()


class _VisualSource(_MemVPHook):
    """Forward hook on the vision module: its output tokens (less ``drop`` prefix tokens) set the memory."""

    def __init__(self, memory: MemVPModule, drop: int) -> None:
        super().__init__(memory)
        self.drop = drop

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        tokens = output
        if not isinstance(tokens, torch.Tensor):
            tokens = getattr(output, "last_hidden_state", None)
            if tokens is None:
                tokens = output[0]
        self.memory.set_memory(tokens[:, self.drop :])


def holds_memvp_host(module: nn.Module) -> bool:
    """Whether ``module`` holds a model MemVP can be applied to (a host)."""
    return holds_host(module)


# --- apply / remove -------------------------------------------------------------------------------------
def apply_memvp(model: nn.Module, config: MemVPConfig | None = None, **settings: Any) -> nn.Module:
    """Give every FFN of ``model``'s language model the visual memory (in place).

    The projector and the key/value offsets are registered as ``model.vleff_memvp`` (on the
    host's device and dtype). Applying twice replaces the earlier memory (drawn anew). Nothing
    is frozen here: the ``MemVP`` callback freezes the host.

    Raises:
        TypeError: an unsupported host, or an FFN layout MemVP does not support (names the module type).
        ValueError: ``n_mem`` smaller than the host's number of visual tokens, or ``visual_dim``
            that contradicts the host's vision tower.
    """
    cfg = MemVPConfig.build(config, **settings)
    root = model
    model = locate_host(model, "MemVP")
    host = find_host(model, "MemVP")  # every check before anything is changed
    visual_dim = cfg.visual_dim if cfg.visual_dim is not None else host.visual_dim
    if visual_dim is None:
        raise ValueError(
            f"MemVP: {type(model).__name__} has no vision tower to read visual_dim from; "
            "pass visual_dim=<width of the features you give set_memvp_memory>"
        )
    if host.visual_dim is not None and visual_dim != host.visual_dim:
        raise ValueError(
            f"visual_dim={visual_dim} is not allowed: the vision tower's tokens of "
            f"{type(model).__name__} have width {host.visual_dim}"
        )
    drop = host.prefix_tokens if cfg.visual_tokens == "patch" else 0
    if host.num_visual_tokens is not None and cfg.n_mem < host.num_visual_tokens - drop:
        raise ValueError(
            f"n_mem={cfg.n_mem} is not allowed: it is smaller than the number of visual tokens "
            f"({host.num_visual_tokens - drop}); use n_mem >= {host.num_visual_tokens - drop}"
        )
    if memvp_applied(model):
        remove_memvp(model)
    tower = host.vision_tower
    if cfg.vision_adapter_dim and tower is None:
        raise ValueError(
            f"vision_adapter_dim={cfg.vision_adapter_dim} is not allowed: {type(model).__name__} has no "
            "vision tower MemVP can reach; use vision_adapter_dim=0"
        )
    blocks = tower.blocks() if tower is not None and cfg.vision_adapter_dim else []
    memory = MemVPModule(visual_dim, host.width, cfg, len(blocks), tower.embed_dim if blocks else 0)
    ref = next(model.parameters())
    memory.to(device=ref.device, dtype=ref.dtype)
    model.add_module(MODULE_NAME, memory)
    for site in host.sites:
        if site.norm is None:
            site.ffn.register_forward_hook(_FFNOutput(memory))
        else:
            stash = Slot()
            site.ffn.register_forward_hook(_FFNInput(memory, stash))
            site.norm.register_forward_pre_hook(_ResidualAdd(memory, stash))
    for i, block in enumerate(blocks):
        tower.parts(block).mlp.register_forward_hook(_ParallelAdapter(memory, i))
    if host.cross_readers:  # the memory of each text-model call, from the states it cross-attends to
        image = Slot()
        for reader in host.cross_readers:
            reader.module.register_forward_pre_hook(
                _CrossStatesMemory(memory, drop, reader.role, image), with_kwargs=True
            )
            reader.module.register_forward_hook(_CallEnd(memory), always_call=True)
    elif host.source is not None:
        host.source.register_forward_hook(_VisualSource(memory, drop))
    if host.call is not None:  # the memory of one forward; generate ends it itself
        host.call.register_forward_hook(_CallEnd(memory), always_call=True)
    return root


def remove_memvp(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_memvp`: no hooks, no ``vleff_memvp`` module."""
    if not memvp_applied(model):
        raise ValueError(f"MemVP is not applied to this {type(model).__name__}; nothing to remove")
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _MemVPHook)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    for module in list(model.modules()):
        if isinstance(module._modules.get(MODULE_NAME), MemVPModule):
            del module._modules[MODULE_NAME]
    return model


def memvp_applied(model: nn.Module) -> bool:
    """Whether ``model`` or a module inside it carries MemVP."""
    return any(isinstance(m._modules.get(MODULE_NAME), MemVPModule) for m in model.modules())


def memvp_module(model: nn.Module) -> MemVPModule:
    """The ``vleff_memvp`` module of ``model`` (or of the host inside it)."""
    for m in model.modules():
        module = m._modules.get(MODULE_NAME)
        if isinstance(module, MemVPModule):
            return module
    raise ValueError(f"MemVP is not applied to this {type(model).__name__}; call apply_memvp first")


def set_memvp_memory(model: nn.Module, features: torch.Tensor) -> None:
    """Set the memory of a MemVP host from visual features ``[B, N_v, visual_dim]`` (for hosts
    without a vision tower of their own, e.g. a bare causal LM before ``generate``)."""
    memvp_module(model).set_memory(features)


def update_memvp(model: nn.Module, **changes: Any) -> None:
    """Change ``scale`` or ``dropout`` on an applied model (the parameters stay)."""
    module = memvp_module(model)
    allowed = {"scale", "dropout"}
    if set(changes) - allowed:
        unknown = sorted(set(changes) - allowed)
        raise ValueError(
            f"MemVP: only {sorted(allowed)} change on an applied model, not {unknown}; apply it again for the others"
        )
    cfg = MemVPConfig(
        n_mem=module.n_mem, scale=changes.get("scale", module.scale), dropout=changes.get("dropout", module.dropout)
    )
    module.scale, module.dropout = cfg.scale, cfg.dropout


def memvp_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(memvp_module(model).parameters())


def freeze_host_for_memvp(model: nn.Module) -> list[str]:
    """``requires_grad = False`` on every weight except MemVP's; returns the trainable names."""
    return train_only(model, memvp_parameters(model))


def memvp_num_parameters(
    visual_dim: int, hidden: int, width: int, n_mem: int, vision_blocks: int = 0, adapter_dim: int = 0
) -> int:
    """Parameters MemVP adds: the projector, the two ``[n_mem, width]`` offsets and, optionally,
    one ``visual_dim → adapter_dim → visual_dim`` adapter per vision block."""
    adapters = vision_blocks * 2 * visual_dim * adapter_dim
    return visual_dim * hidden + hidden + hidden * width + width + 2 * n_mem * width + adapters


def memvp_settings(model: nn.Module) -> dict[str, Any]:
    """MemVP's settings as applied to ``model``, read back from its module (``key_init_std`` leaves no trace)."""
    if not memvp_applied(model):
        return {}
    module: Any = memvp_module(model)
    adapters = getattr(module, "adapters", None)
    return {
        "n_mem": module.n_mem,
        "scale": module.scale,
        "dropout": module.dropout,
        "projector_scale": module.projector_scale,
        "projector_hidden": module.projector[0].out_features,
        "visual_dim": module.visual_dim,
        "vision_adapter_dim": adapters[0].down.out_features if adapters is not None and len(adapters) else 0,
    }
