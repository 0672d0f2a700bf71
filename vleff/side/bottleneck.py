"""What the bottleneck-adapter methods share (the serial adapter of Houlsby et al. 2019, the
parallel adapter of He et al. 2022 / AdaptFormer): a ``d -> m -> d`` bottleneck per adapted
sublayer, applied through the generic block's seam :meth:`vleff.backbones.TowerHook.branch`.

**The seam.** Every supported block calls its hooks' ``branch(name, x, out, info, state)`` with a
sublayer's output ``out`` (``"attention"`` after the output projection, ``"mlp"`` the MLP's output;
on BLIP's post-norm text layers the self-attention's and the FFN's outputs after their dropout)
before the layer scale, the drop path and the residual add, and ``x`` the stream that sublayer
read. A serial adapter returns ``out + B(out)``, a parallel one ``out + s·B(x)``; no block is
copied, so token methods, checkpointing and every family's own details keep working.

**Exact start.** The up-projection is zero-initialised and nothing else is: the adapted model then
computes exactly the frozen model (tested to 1e-6 in fp32, exactly in float64), and the first step
already gives the up-projection a non-zero gradient (``B``'s hidden activation), so the
down-projection learns from the second step on. Zeroing *both* projections (as KMnP/vpt's adapter
baseline does) leaves the down-projection's and the up-projection's gradients zero forever: only
the up-projection's bias would learn.

**Where the parameters live.** One :class:`AdapterModule` per tower is registered on the tower root
(``vleff_serial_adapter``, ``vleff_parallel_adapter``), so the adapters are in ``parameters()`` and
``state_dict`` under the tower's own prefix, deep-copy and pickle with the model, and the shared
side machinery (:mod:`vleff.side.common`: backbone freezing, eval-mode backbone, adapter-only
checkpoints, the unfrozen-backbone refusal) treats them as it treats VPT's prompts. A module may
keep some backbone weights trainable (:meth:`AdapterModule.backbone_trainable`: Houlsby's layer
norms), which the side machinery then neither freezes nor refuses.

**Gradient checkpointing.** The adapters run inside the blocks: under re-entrant checkpointing a
frozen tower's block input must require grad or they silently get none, so :func:`attach_adapters`
attaches the tower's input-gradient hooks (:mod:`vleff.backbones.input_grads`) as the prompt
methods do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerAdapter, TowerHook
from vleff.backbones.input_grads import InputGradHandles
from vleff.side.hooked import attach_hooked, detach_hooked, hooked_modules

#: the bottleneck nonlinearities: Houlsby's GELU, He's and AdaptFormer's ReLU
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


class Bottleneck(nn.Module):
    """``up(dropout(act(down(x))))``: ``down`` ``d -> m``, ``up`` ``m -> d``, both with biases.

    Init: ``down.weight`` truncated normal (``±2σ``) with std ``down_std`` (Houlsby's 1e-3), or,
    with ``down_std=None``, ``nn.Linear``'s Kaiming-uniform (a = √5; He's and AdaptFormer's "lora"
    init); biases zero; ``up.weight`` zero (see the module docstring: the exact start)."""

    def __init__(
        self, dim: int, bottleneck: int, activation: str, dropout: float = 0.0, down_std: float | None = None
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, dim)
        if down_std is not None:
            nn.init.trunc_normal_(self.down.weight, std=down_std, a=-2 * down_std, b=2 * down_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


def bottleneck_num_parameters(dim: int, bottleneck: int) -> int:
    """Parameters of one :class:`Bottleneck`: ``d·m + m + m·d + d``."""
    return 2 * dim * bottleneck + bottleneck + dim


class AdapterModule(nn.Module):
    """Base of an adapter method's trained parts on one tower: :meth:`adapt` rewrites sublayer
    ``name``'s output of block ``info.index``. Subclasses hold their bottlenecks in
    ``nn.ModuleList``s indexed by block."""

    #: the hooks that let the adapters get gradients under re-entrant checkpointing
    input_hooks: InputGradHandles | None = None

    def __init__(self, train_norms: bool) -> None:
        super().__init__()
        self.train_norms = train_norms

    def adapt(
        self, adapter: TowerAdapter, name: str, x: torch.Tensor, out: torch.Tensor, info: BlockInfo
    ) -> torch.Tensor:
        raise NotImplementedError

    def backbone_trainable(self, root: nn.Module) -> list[nn.Parameter]:
        """Backbone weights of the tower ``root`` this method trains beside its adapters: with
        ``train_norms`` every LayerNorm's weight and bias in the tower (Houlsby's optimizer
        collection "layer_norm"), the adapters' own modules excluded."""
        if not self.train_norms:
            return []
        own = {id(m) for m in self.modules()}
        return [p for m in root.modules() if isinstance(m, nn.LayerNorm) and id(m) not in own for p in m.parameters()]


class AdapterHook(TowerHook):
    """Hands every block's sublayer outputs to the tower's :class:`AdapterModule`. A plain object
    (the module is the tower root's submodule): the model deep-copies and pickles."""

    #: reads its module's parameters and writes nothing: a replayed block computes the same output
    replayable = True

    def __init__(self, name: str, adapter: TowerAdapter, module: AdapterModule, config: Any) -> None:
        self.name = name  # type: ignore[misc]  # one hook per method, named after it
        #: ``config``: the method's settings, read back by the registry (``applied_settings``)
        self.adapter, self.module, self.config = adapter, module, config

    def branch(self, name: str, x: torch.Tensor, out: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        return self.module.adapt(self.adapter, name, x, out, info)


def attach_adapters(
    model: nn.Module,
    name: str,
    module_name: str,
    config: Any,
    make_module: Callable[[TowerAdapter], AdapterModule],
    refuse_conflicts: Callable[[nn.Module, str], None],
) -> nn.Module:
    """Apply an adapter method (:func:`vleff.side.hooked.attach_hooked` with :class:`AdapterHook`):
    one ``make_module(tower)`` per tower the config names, the backbone frozen but for what the
    module keeps trainable (:func:`detach_adapters` restores the flags)."""
    return attach_hooked(model, name, module_name, config, make_module, AdapterHook, refuse_conflicts, AdapterModule)


def detach_adapters(model: nn.Module, name: str, module_name: str) -> nn.Module:
    """Undo :func:`attach_adapters` exactly: no hook, no module, no input hook, the flags as before."""
    return detach_hooked(model, name, module_name, AdapterModule)


def adapter_modules(model: nn.Module, module_name: str) -> list[AdapterModule]:
    """The method's modules, one per tower that carries it."""
    return hooked_modules(model, module_name, AdapterModule)
