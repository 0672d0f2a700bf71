"""Reversible blocks (RevNet / Rev-ViT / MEFT-style couplings): activation memory constant in depth.

Each pre-norm block is split into its two residual branches, F = :func:`attention_branch` and
G = :func:`mlp_branch` (the generic block of :mod:`vleff.backbones.block`, not a copy), and the
tower's stack runs on two streams with a coupling whose inverse is exact up to rounding:

* ``coupling="revvit"`` (RevNet, Rev-ViT; for training from scratch)::

      y1 = x1 + F(x2)          x2 = y2 - G(y1)
      y2 = x2 + G(y1)          x1 = y1 - F(x2)

* ``coupling="meft"`` (MEFT-style, for pretrained models): F̃ and G̃ are the *residual
  sub-blocks* ``F̃(x) = x + F(x)``, ``G̃(x) = x + G(x)`` and the couplings are scaled::

      y1 = λ·x1 + F̃(x2)        x2 = (y2 - G̃(y1)) / β
      y2 = β·x2 + G̃(y1)        x1 = (y1 - F̃(x2)) / λ

  with MEFT's small adapters (variant 3, bottleneck ``adapter`` = 8, weights N(0, 0.02²),
  biases 0, so the tower starts close to the block it wraps): F̃ has a sequential adapter on
  the attention branch's output, ``F̃(x) = x + a + A_F(a)`` with ``a = F(x)``, and G̃ a parallel
  one beside the MLP, ``G̃(x) = x + drop_path(ls(mlp(n) + A_G(n)))`` with ``n = norm2(x)``. The adapters are new
  parameters of each
  block (``blocks.<i>.vleff_reversible.{f,g}``), trained with the rest; ``remove_reversible``
  drops them.

  At λ = β = 0 the second stream would be the pretrained block output exactly; small λ, β
  keep the pretrained function approximately (the *starting gap*, see :func:`starting_gap`),
  at the price of dividing by λ and β in every block of the reconstruction.

  ``balance=True`` (vleff's addition, not in MEFT): the streams are divided by ρ (the dominant
  eigenvalue of the couplings' linear part) before each block and G's branch is weighted
  ``ρ / (ρ − λ)``: since the pre-norm branches ignore the streams' scale, the network then adds
  the branches along the dominant stream direction as the plain residual stream does, and
  starts far closer to the pretrained function at λ = β = 1 — at the price of a
  reconstruction error that grows with the branches' Jacobians (right on 6 blocks, wrong on
  ViT-B/16 at 12; see ``ReversibleConfig.balance`` and :meth:`ReversibleConfig.balance_factors`).

The input is duplicated into both streams and the output is fused as ``(y1 + y2) / 2`` for
both couplings. Rev-ViT's reference concatenates the streams to 2C before the final norm and
head instead; vleff keeps the tower's width so the library's own norm, pooling and head (and
pretrained weights) apply unchanged.

In training (grad enabled) one custom autograd function, :class:`_ReversibleStack`, runs all
blocks under ``no_grad`` and saves only the last two streams; backward rebuilds each block's
inputs from its outputs and recomputes F and G with grad to get the local gradients (about
one extra forward). Dropout (modules, or attention dropout given as a probability: open_clip's
``nn.MultiheadAttention``, Hugging Face CLIP's ``attention_dropout``) and drop-path replay the
forward's random numbers (:func:`draws_random_numbers`): the CPU (and
CUDA) RNG state before each F and G call is saved and restored for the recomputation inside
``torch.random.fork_rng`` (the way ``torch.utils.checkpoint`` does), so the global RNG is never
re-seeded and runs stay reproducible. The recomputation re-enters autocast as the forward ran.
The streams are kept in float32 (RevNet) or float64 (MEFT), or the input's dtype if higher,
even when the branches run in bf16 under autocast or in a low-precision model: the
reconstruction subtracts and, for MEFT, divides by λ and β; MEFT's couplings amplify rounding
error about 6.9x per block even at λ = β = 1, so float32 streams fail at ViT-B depth (see
:class:`ReversibleConfig`). The branches still run in the model's dtype.

Without grad (inference, evaluation) the same couplings run as a plain loop: nothing is saved
either way, and the plain loop compiles in one graph.

Supported: timm ``VisionTransformer`` (ViT, DeiT, register tokens), both open_clip towers and
both Hugging Face CLIP towers (the text towers' causal mask, or HF's ``is_causal``, goes into F;
the library pools the fused output, EOT included). Refused, in either order, at apply: a token method (ToMe, EViT,
DynamicViT) or another tower hook on the tower, the library's gradient checkpointing,
BatchNorm-like modules in a branch, Hugging Face BLIP towers (not yet). Hugging Face per-layer
``output_hidden_states``/``output_attentions`` are collected by hooks on the layers, which the
stack never calls: they are not available while reversible blocks are applied.

>>> vleff.apply_reversible(model, coupling="revvit")
>>> vleff.remove_reversible(model)            # the library's own forward, exactly
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import TowerAdapter, find_towers, get_patch
from vleff.backbones.block import attention_branch, mask_to_bias, mlp_branch
from vleff.backbones.patch import set_block_runner
from vleff.checks import check_bool, check_choice, check_int, check_number, check_towers
from vleff.registry import MethodConfig
from vleff.tokens.common import towers_meant

COUPLINGS = ("meft", "revvit")
STREAMS = ("auto", "float32", "float64")
#: tower families the reversible stack supports
FAMILIES = ("timm", "open_clip", "transformers")
TOWERS = ("image", "text")
#: MEFT's adapter bottleneck and the standard deviation of its weights at initialisation
MEFT_BOTTLENECK = 8
ADAPTER_STD = 0.02
#: the deepest stack ``balance=True`` was measured right on (docs/benchmarks.md); deeper: a warning
BALANCE_CHECKED_DEPTH = 6
#: the attribute holding a block's adapters (also their ``state_dict`` prefix)
ADAPTER_ATTR = "vleff_reversible"


@dataclass
class ReversibleConfig(MethodConfig):
    """Reversible-block settings.

    Attributes:
        coupling: ``"meft"`` (scaled couplings of the residual sub-blocks, for pretrained
            models) or ``"revvit"`` (RevNet couplings of the branches, for training from scratch).
        lam: MEFT's λ, the scale of the first stream (> 0; ``"revvit"`` refuses any value but 1).
        beta: MEFT's β, the scale of the second stream (> 0; ``"revvit"`` refuses any value but 1).
        towers: ``"image"``, ``"text"`` or ``"all"`` (every supported tower the model has).
        adapter: bottleneck width of MEFT's adapters (see the module docstring); 0: none.
            ``None`` (default): 8 for ``"meft"``, 0 for ``"revvit"``.

        streams: dtype of the two streams, ``"float32"``, ``"float64"`` or ``"auto"`` (float64
            for ``"meft"``, float32 for ``"revvit"``; never below the input's dtype).
        balance: MEFT only (``"revvit"`` refuses ``True``): compensate the couplings' growth (see
            :meth:`balance_factors`): both streams are divided by ρ, the dominant eigenvalue of
            the couplings' linear part, before each block, and G's branch is weighted
            ``ρ / (ρ − λ)``, so that along the dominant stream direction the network adds the
            branches exactly as the plain residual stream does. Without it, at λ = β = 1 the
            streams grow 2.6x per block while the branches' outputs do not, so block k's
            contribution to the output is 2.6^(depth−k) times smaller than the embedding's (the
            pre-norm branches are blind to the streams' scale). The linear part's condition
            number is unchanged, but the branches now count at full size and their Jacobians
            amplify the reconstruction's error too (a network closer to the plain one is harder
            to invert): measured 4.5e-8 relative gradient error on the trained 6-block digits ViT
            (starting accuracy 93.6 % instead of 60.6 %), but 0.43 on a random-weight ViT-B/16 at
            depth 12 (float64 streams). So it is off by default; ``apply`` warns above 6 blocks.

    Why these defaults (measured, ``benchmarks/reversible_gap.py``, docs/benchmarks.md): MEFT's
    couplings of the residual sub-blocks have the linear part ``[[λ, 1], [λ, 1 + β]]`` per block,
    whose condition number (6.9 at λ = β = 1, about 140 at λ = β = 0.1) multiplies the
    reconstruction's rounding error block after block. With float32 streams every λ, β in
    {0.1, 0.3, 1} gives gradients with relative error ≥ 1 at depth 12 (timm ViT-B/16, open_clip
    ViT-B-32 image and text); with float64 streams λ = β = 1 gives 1e-6 while λ, β ≤ 0.3
    still fail. So λ = β = 1 with float64 streams is the default, although its starting gap
    is large (0.6–1.2 relative on randomly initialised towers) — the published λ = β = 0.1
    starts closer (0.45–0.6) but cannot be trained at ViT-B depth. :func:`apply_reversible`
    warns when the predicted gradient error exceeds 1e-3 (:func:`predicted_error`).
    """

    method = "reversible"
    coupling: str = "meft"
    lam: float = 1.0
    beta: float = 1.0
    towers: str = "all"
    adapter: int | None = None
    streams: str = "auto"
    balance: bool = False

    def __post_init__(self) -> None:
        check_choice("coupling", self.coupling, COUPLINGS)
        check_towers(self.towers, TOWERS)
        if self.adapter is None:
            self.adapter = MEFT_BOTTLENECK if self.coupling == "meft" else 0
        self.adapter = check_int("adapter", self.adapter, low=0)
        check_choice("streams", self.streams, STREAMS)
        self.lam = check_number("lam", self.lam, low=0, low_open=True)
        self.beta = check_number("beta", self.beta, low=0, low_open=True)
        self.balance = check_bool("balance", self.balance)
        if self.coupling == "revvit":
            # Rev-ViT's RevNet couplings have no scales and nothing to balance: a value that
            # differs from the default would be silently ignored, so it is refused
            given = {
                name: value
                for name, value, default in (
                    ("lam", self.lam, 1.0),
                    ("beta", self.beta, 1.0),
                    ("balance", self.balance, False),
                )
                if value != default
            }
            if given:
                raise ValueError(
                    f"coupling='revvit' takes no {', '.join(f'{k}={v!r}' for k, v in given.items())}: "
                    "RevNet couplings (y1 = x1 + F(x2), y2 = x2 + G(y1)) have no scales and nothing to "
                    "balance; allowed with revvit: lam=1.0, beta=1.0, balance=False (or use "
                    "coupling='meft')"
                )

    @property
    def stream_floor(self) -> torch.dtype:
        """The lowest dtype the streams may have (see ``streams``)."""
        if self.streams == "auto":
            return torch.float64 if self.coupling == "meft" else torch.float32
        return getattr(torch, self.streams)

    @property
    def scales(self) -> tuple[float, float]:
        """(λ, β) the couplings use: 1, 1 for RevNet."""
        return (1.0, 1.0) if self.coupling == "revvit" else (self.lam, self.beta)

    @property
    def balance_factors(self) -> tuple[float, float]:
        """``(c, γ_G)``: the scale of both streams before each block and the weight of G's branch.

        ``(1, 1)`` unless ``balance`` (MEFT). With it: the couplings' linear part
        ``M = [[λ, 1], [λ, 1 + β]]`` (per block, branches small) has the dominant eigenvalue
        ``ρ = (tr + sqrt(tr² − 4 det)) / 2`` (``tr = 1 + λ + β``, ``det = λβ``) and the left
        eigenvector ``w ∝ (λ, ρ − λ)``. The input ``(h, h)`` and F's injection ``(F, F)`` weigh
        ``w1 + w2`` along it, G's injection ``(0, G)`` only ``w2``; so ``c = 1/ρ`` keeps the
        streams' scale and ``γ_G = (w1 + w2) / w2 = ρ / (ρ − λ)`` gives G F's weight: the
        dominant coordinate then follows ``h_{k+1} = h_k + F + G``, the plain residual stream
        (at λ = β = 1: c = 0.382, γ_G = 1.618). The other direction decays 1/cond per block."""
        if not (self.balance and self.residual):
            return 1.0, 1.0
        lam, beta = self.scales
        tr, det = 1.0 + lam + beta, lam * beta
        rho = (tr + (tr * tr - 4.0 * det) ** 0.5) / 2.0
        return 1.0 / rho, rho / (rho - lam)

    @property
    def residual(self) -> bool:
        """Whether F and G include their residual (MEFT's sub-blocks) or are the bare branches."""
        return self.coupling == "meft"


class BottleneckAdapter(nn.Module):
    """``up(GELU(down(x)))`` with a narrow bottleneck; small normal weights and zero biases, so
    its output starts near zero and the wrapped block near the pretrained one."""

    def __init__(self, dim: int, bottleneck: int, std: float = ADAPTER_STD) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(x)))


def block_adapters(block: nn.Module) -> nn.ModuleDict | None:
    """The block's ``{"f": A_F, "g": A_G}`` adapters, or None."""
    return block._modules.get(ADAPTER_ATTR)  # type: ignore[return-value]


def _add_adapters(tower: TowerAdapter, bottleneck: int) -> None:
    for block in tower.blocks():
        ref = next(block.parameters())
        adapters = nn.ModuleDict({k: BottleneckAdapter(tower.embed_dim, bottleneck) for k in ("f", "g")})
        setattr(block, ADAPTER_ATTR, adapters.to(device=ref.device, dtype=ref.dtype).train(block.training))


# --- random-number replay ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RNGState:
    """The global RNG states one branch call started from (CPU, and each CUDA device it used)."""

    cpu: torch.Tensor
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()


def capture_rng(device: torch.device) -> RNGState:
    cuda: tuple[tuple[int, torch.Tensor], ...] = ()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = ((index, torch.cuda.get_rng_state(index)),)
    return RNGState(torch.get_rng_state(), cuda)


@contextlib.contextmanager
def replay_rng(state: RNGState | None) -> Iterator[None]:
    """Run the body from ``state`` and put the global RNG back afterwards (``fork_rng``), so the
    recomputation draws the forward's dropout masks and the caller's RNG is untouched."""
    if state is None:
        yield
        return
    devices = [i for i, _ in state.cuda]
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(state.cpu)
        for index, cuda_state in state.cuda:
            torch.cuda.set_rng_state(cuda_state, index)
        yield


# --- the couplings ------------------------------------------------------------------------------------
class _Stack:
    """The blocks of one tower with their coupling (not a module: it holds no parameters of its own)."""

    def __init__(
        self, adapter: TowerAdapter, config: ReversibleConfig, bias: torch.Tensor | None = None, is_causal: bool = False
    ) -> None:
        self.adapter = adapter
        self.config = config
        #: the library's attention mask as an additive bias (open_clip text: causal), or None
        self.bias = bias
        #: the library asked for causal attention without a mask (Hugging Face CLIP text under SDPA)
        self.is_causal = is_causal

    @property
    def blocks(self) -> list[nn.Module]:
        return self.adapter.blocks()

    def f(self, block: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """F (or F̃ = x + F for MEFT), computed on ``x`` in the branch dtype, returned in the stream's."""
        a = attention_branch(self.adapter, block, x.to(dtype), self.bias, self.is_causal)
        if (adapters := block_adapters(block)) is not None:
            a = a + adapters["f"](a)  # sequential adapter on the attention output
        out = a.to(x.dtype)
        return x + out if self.config.residual else out

    def g(self, block: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if (adapters := block_adapters(block)) is None:
            m = mlp_branch(self.adapter, block, x.to(dtype))
        else:  # parallel adapter: beside the MLP, on its (normalised) input
            parts = self.adapter.parts(block)
            n = parts.norm2(x.to(dtype))
            m = parts.drop_path2(parts.ls2(parts.mlp(n) + adapters["g"](n)))
        out = m.to(x.dtype)
        if not self.config.residual:
            return out
        gain = self.config.balance_factors[1]
        return x + (out if gain == 1.0 else gain * out)

    def forward(
        self, x: torch.Tensor, states: list[tuple[RNGState | None, RNGState | None]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both output streams; ``states`` collects each block's (F, G) RNG states when given."""
        lam, beta = self.config.scales
        c = self.config.balance_factors[0]
        x1 = x2 = x.to(stream_dtype(x.dtype, self.config.stream_floor))
        for block in self.blocks:
            if c != 1.0:  # balance: the streams' scale, kept
                x1, x2 = c * x1, c * x2
            record = states is not None and draws_random_numbers(block, self.adapter)
            sf = capture_rng(x.device) if record else None
            y1 = _scale(lam, x1) + self.f(block, x2, x.dtype)
            sg = capture_rng(x.device) if record else None
            y2 = _scale(beta, x2) + self.g(block, y1, x.dtype)
            if states is not None:
                states.append((sf, sg))
            x1, x2 = y1, y2
        return x1, x2


#: float attributes through which modules take a dropout probability without a Dropout module:
#: ``nn.MultiheadAttention.dropout`` (open_clip), Hugging Face attention's ``dropout`` (CLIP's
#: ``attention_dropout``), ``dropout_p`` / ``attn_drop`` given as a number, timm's ``drop_prob``
RANDOM_ATTRIBUTES = ("dropout", "dropout_p", "attn_drop", "drop_prob")


def draws_random_numbers(block: nn.Module, adapter: TowerAdapter | None = None) -> bool:
    """Whether ``block`` draws random numbers in this forward: in training mode, with any source
    of randomness of p > 0 — a Dropout module, a probability held as a float attribute of any
    submodule (:data:`RANDOM_ATTRIBUTES`: attention dropout given as a number, which
    ``F.scaled_dot_product_attention``/``F.dropout`` draw inside the branch, and drop-path), or
    the tower adapter's attention dropout (``adapter.attention_config(block).dropout_p``, what
    the generic attention branch draws). Only then are RNG states saved (a CPU state is about
    5 KB, two per block: at depth 24 as much as the two saved streams of a small ViT); a block
    that draws numbers without being seen here would be recomputed with other masks and get
    wrong gradients, so the rule errs on the side of saving."""
    if not block.training:
        return False
    if adapter is not None and float(adapter.attention_config(block).dropout_p or 0.0) > 0:
        return True
    for m in block.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        for name in RANDOM_ATTRIBUTES:
            value = m.__dict__.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return True
    return False


def _scale(s: float, x: torch.Tensor) -> torch.Tensor:
    return x if s == 1.0 else s * x


def stream_dtype(dtype: torch.dtype, floor: torch.dtype = torch.float32) -> torch.dtype:
    """The streams' dtype: at least ``floor`` (float32, or float64 for MEFT; see the module docstring)."""
    return torch.promote_types(dtype, floor)


def block_amplification(config: ReversibleConfig) -> float:
    """Per-block growth of reconstruction error: the condition number of the couplings' linear
    part with small branches (``[[λ, 1], [λ, 1 + β]]`` for MEFT's residual sub-blocks, the
    identity for RevNet). Measured: 6.8 per block at λ = β = 1 (prediction 6.85)."""
    if not config.residual:
        return 1.0
    lam, beta = config.scales
    s = torch.linalg.svdvals(torch.tensor([[lam, 1.0], [lam, 1.0 + beta]], dtype=torch.float64))
    return float(s[0] / s[-1])


def predicted_error(config: ReversibleConfig, depth: int, dtype: torch.dtype | None = None) -> float:
    """Rough relative gradient error of the reconstruction after ``depth`` blocks with streams
    of ``dtype`` (default: the config's floor): unit rounding times the amplification."""
    eps = torch.finfo(dtype or config.stream_floor).eps / 2
    return eps * block_amplification(config) ** depth


def fuse(y1: torch.Tensor, y2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((y1 + y2) / 2).to(dtype)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _ReversibleStack(torch.autograd.Function):
    """Forward without saved activations; backward by reconstruction (see the module docstring).

    Inputs: ``x``, the :class:`_Stack`, then every parameter of the blocks (so autograd routes
    their gradients through this node). Saves the two final streams only.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stack: _Stack, *params: torch.Tensor) -> torch.Tensor:
        states: list[tuple[RNGState | None, RNGState | None]] = []
        with torch.no_grad():
            y1, y2 = stack.forward(x, states)
        ctx.stack, ctx.states, ctx.in_dtype = stack, states, x.dtype
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(x.device.type)
        ctx.params = params
        ctx.save_for_backward(y1, y2)
        return fuse(y1, y2, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y1, y2 = ctx.saved_tensors
        stack: _Stack = ctx.stack
        lam, beta = stack.config.scales
        c = stack.config.balance_factors[0]
        dtype = ctx.in_dtype
        dy1 = dy2 = grad_out.to(y1.dtype) / 2
        enabled, ac_dtype = ctx.autocast
        grads: dict[int, torch.Tensor] = {}

        def local(out: torch.Tensor, inp: torch.Tensor, params: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
            got = torch.autograd.grad(out, [inp, *params], grad, allow_unused=True)
            for p, g in zip(params, got[1:]):
                if g is not None:
                    grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g
            return got[0]

        for block, (sf, sg) in zip(reversed(stack.blocks), reversed(ctx.states)):
            params = [p for p in block.parameters() if p.requires_grad]
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=ac_dtype, enabled=enabled):
                y1_ = y1.detach().requires_grad_(True)
                with replay_rng(sg):
                    g = stack.g(block, y1_, dtype)
            dy1 = dy1 + local(g, y1_, params, dy2)
            with torch.no_grad():
                x2 = (y2 - g.detach()) / beta if beta != 1.0 else y2 - g.detach()
            del g, y1_
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=ac_dtype, enabled=enabled):
                x2_ = x2.detach().requires_grad_(True)
                with replay_rng(sf):
                    f = stack.f(block, x2_, dtype)
            dx2 = _scale(beta, dy2) + local(f, x2_, params, dy1)
            with torch.no_grad():
                x1 = (y1 - f.detach()) / lam if lam != 1.0 else y1 - f.detach()
            del f, x2_
            dx1 = _scale(lam, dy1)
            if c != 1.0:  # undo the balance scale of the block's inputs
                x1, x2, dx1, dx2 = x1 / c, x2 / c, c * dx1, c * dx2
            y1, y2, dy1, dy2 = x1, x2, dx1, dx2
        dx = (dy1 + dy2).to(dtype)
        return (dx, None, *[grads.get(id(p)) for p in ctx.params])


_PLAIN_AUTOGRAD = False


@contextlib.contextmanager
def plain_autograd() -> Iterator[None]:
    """Run the couplings with ordinary autograd inside the body (every activation saved, no
    reconstruction): the reference the custom backward is measured against (the gradient error
    of :mod:`benchmarks.reversible_gap`). Not for training: it saves what the stack is for."""
    global _PLAIN_AUTOGRAD
    was, _PLAIN_AUTOGRAD = _PLAIN_AUTOGRAD, True
    try:
        yield
    finally:
        _PLAIN_AUTOGRAD = was


def run_reversible(
    adapter: TowerAdapter,
    config: ReversibleConfig,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """The tower's blocks as a reversible stack on ``x`` ``[B, N, C]`` (fused output, ``x``'s dtype);
    ``attn_mask`` is the library's mask (bool: True = may attend, or additive)."""
    stack = _Stack(adapter, config, mask_to_bias(attn_mask, torch.float32), is_causal)
    if not torch.is_grad_enabled() or _PLAIN_AUTOGRAD:
        return fuse(*stack.forward(x), x.dtype)
    params = [p for block in stack.blocks for p in block.parameters()]
    return _ReversibleStack.apply(x, stack, *params)


# --- surgery ------------------------------------------------------------------------------------------
class ReversibleForward:
    """The replacement ``forward`` of the tower's block container (an object, so ``deepcopy`` and
    pickle copy it with the model)."""

    def __init__(self, adapter: TowerAdapter, config: ReversibleConfig, guard_ids: list[int]) -> None:
        self.adapter, self.config, self.guard_ids = adapter, config, guard_ids

    def __call__(self, x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``x`` is batch-first ``[B, N, C]`` in every family (open_clip's ``Transformer.forward``
        takes NLD and transposes inside; the stack needs no transpose). Hugging Face encoders get
        ``(inputs_embeds, attention_mask, is_causal=...)`` and return a ``BaseModelOutput``."""
        if x is None:  # Hugging Face passes keywords
            x = kwargs.pop("inputs_embeds")
        attn_mask = kwargs.pop("attention_mask", attn_mask)
        if torch.is_grad_enabled() and self.adapter.gradient_checkpointing():
            raise RuntimeError(
                f"{self.adapter.describe()} has gradient checkpointing on; reversible blocks "
                "replace it (turn it off: model.set_grad_checkpointing(False))"
            )
        out = run_reversible(self.adapter, self.config, x, attn_mask, bool(kwargs.get("is_causal", False)))
        return self.adapter.container_output(out)


class DirectCallGuard:
    """Forward pre-hook on each block while reversible is applied: the stack never calls a block,
    so a call means the library bypassed it (gradient checkpointing, a mask passed block by block)
    and would silently run the plain tower."""

    def __init__(self, describe: str) -> None:
        self.describe = describe

    def __call__(self, module: nn.Module, args: Any) -> None:
        raise RuntimeError(
            f"{self.describe}: a block was called directly while reversible blocks are applied. The library "
            "bypasses the reversible stack when its own gradient checkpointing is on (turn it off: "
            "model.set_grad_checkpointing(False)) or when it gets an attention mask; neither is supported"
        )


def _container(tower: TowerAdapter) -> nn.Module:
    """The module whose ``forward`` runs the blocks (the adapter's :meth:`block_container`)."""
    container = tower.block_container()
    if container is None:
        raise tower.unsupported("reversible blocks", "timm ViT/DeiT, open_clip and Hugging Face CLIP towers")
    return container


def _is_supported(tower: TowerAdapter) -> bool:
    """Towers whose adapter names a verified block container: timm ViT/DeiT, open_clip towers and
    Hugging Face CLIP towers (BLIP's are not yet: its text tower is post-norm with cross-attention,
    and its vision tower is untested)."""
    return tower.block_container() is not None


def _supported(model: nn.Module, towers_setting: str) -> list[TowerAdapter]:
    towers = find_towers(model)  # TypeError naming the families when there is no tower
    wanted = ("image", "text") if towers_setting == "all" else (towers_setting,)
    image = [t for t in towers if t.modality in wanted]
    if not image:
        raise TypeError(
            f"towers={towers_setting!r}: {type(model).__name__} has no {' or '.join(wanted)} tower "
            f"(it has: {', '.join(t.describe() for t in towers)})"
        )
    bad = [t for t in image if not _is_supported(t)]
    if bad:
        raise TypeError(
            f"reversible does not support {bad[0].describe()}; supported: "
            "timm VisionTransformer (ViT, DeiT), open_clip and Hugging Face CLIP towers only for now"
        )
    return image


def apply_reversible(model: nn.Module, config: ReversibleConfig | None = None, **settings: Any) -> nn.Module:
    """Run the towers of ``model`` as reversible stacks (in place; weights, parameter names
    and ``state_dict`` keys unchanged). Applying again replaces the earlier settings.

    Raises:
        ValueError: a bad setting; a token method is applied to the tower; a branch holds
            BatchNorm-like running statistics (recomputation would update them twice).
        RuntimeError: the tower's own gradient checkpointing is on.
        TypeError: no supported tower (Hugging Face BLIP towers are not supported yet).
    """
    cfg = ReversibleConfig.build(config, **settings)
    towers = _supported(model, cfg.towers)
    for tower in towers:
        if get_patch(tower.root) is not None:
            names = ", ".join(h.name for h in get_patch(tower.root).hooks) or "a token method"
            raise ValueError(
                f"cannot apply reversible while {names} is applied to {tower.describe()}: the "
                "reversible stack runs F and G itself, not the tower hooks (token reduction inside "
                "the stack is not supported); remove it first"
            )
        if tower.gradient_checkpointing():
            raise RuntimeError(
                f"{tower.describe()} has gradient checkpointing on; reversible blocks replace it "
                "(turn it off: model.set_grad_checkpointing(False))"
            )
        for i, block in enumerate(tower.blocks()):
            stateful = [type(m).__name__ for m in block.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
            if stateful:
                raise ValueError(
                    f"{tower.describe()} block {i} holds {stateful[0]} (running statistics); "
                    "recomputing it in backward would update them twice"
                )
    lam, beta = cfg.scales
    depth = max(len(t.blocks()) for t in towers)
    if (error := predicted_error(cfg, depth)) > 1e-3:
        warnings.warn(
            f"reversible coupling={cfg.coupling!r} with lam={lam}, beta={beta}, {cfg.stream_floor} "
            f"streams over {depth} blocks: the reconstruction in backward amplifies rounding error "
            f"{block_amplification(cfg):.3g}x per block; predicted gradient error {error:.1e} relative "
            "(MEFT is right up to about 15 blocks at lam = beta = 1 with float64 streams; "
            "coupling='revvit' does not amplify)",
            stacklevel=2,
        )
    if cfg.balance and cfg.residual and depth > BALANCE_CHECKED_DEPTH:
        warnings.warn(
            f"reversible balance=True over {depth} blocks: with the streams kept at the branches' scale "
            "the reconstruction's error also grows with the branches' Jacobians, which no estimate "
            "predicts; float64 streams measured 4.5e-8 relative gradient error on the 6-block digits ViT "
            "but 0.43 (timm ViT-B/16) and 1.9e-4 / 0.046 (open_clip ViT-B-32 image / text) at depth 12 "
            "(random weights): measure yours (benchmarks/reversible_gap.py --settings 1:1:balance) "
            "before training",
            stacklevel=2,
        )
    if reversible_applied(model):
        remove_reversible(model)
    for tower in towers:
        guard = DirectCallGuard(tower.describe())
        ids = [block.register_forward_pre_hook(guard).id for block in tower.blocks()]
        if cfg.adapter:
            _add_adapters(tower, cfg.adapter)
        _container(tower).forward = ReversibleForward(tower, cfg, ids)
        set_block_runner(tower.root, "reversible")  # tower hooks are refused while the stack runs the blocks
    return model


def _applied(tower: TowerAdapter) -> ReversibleForward | None:
    if not _is_supported(tower):
        return None
    container = _container(tower)
    fwd = container.__dict__.get("forward") if isinstance(container, nn.Module) else None
    return fwd if isinstance(fwd, ReversibleForward) else None


def _all_towers(model: nn.Module) -> list[TowerAdapter]:
    try:
        return find_towers(model)
    except TypeError:
        return []


def remove_reversible(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_reversible`: the library's own block forwards, exactly."""
    removed = 0
    for tower in _all_towers(model):
        fwd = _applied(tower)
        if fwd is None:
            continue
        for block, hook_id in zip(tower.blocks(), fwd.guard_ids):
            block._forward_pre_hooks.pop(hook_id, None)
            block._modules.pop(ADAPTER_ATTR, None)
        del _container(tower).__dict__["forward"]
        set_block_runner(tower.root, None)
        removed += 1
    if not removed:
        raise ValueError(f"reversible blocks are not applied to this {type(model).__name__}; nothing to remove")
    return model


def reversible_applied(model: nn.Module) -> bool:
    return any(_applied(t) is not None for t in _all_towers(model))


def reversible_config(model: nn.Module) -> ReversibleConfig:
    """The config of the first reversible tower."""
    for tower in _all_towers(model):
        if (fwd := _applied(tower)) is not None:
            return fwd.config
    raise ValueError(f"reversible blocks are not applied to this {type(model).__name__}")


@torch.no_grad()
def starting_gap(
    model: nn.Module, x: Any, config: ReversibleConfig | None = None, forward: Any = None, **settings: Any
) -> float:
    """Relative output difference ``‖f_rev(x) − f(x)‖ / ‖f(x)‖`` of ``model`` made reversible
    (before any training: MEFT's adapters freshly drawn) against the model as it is, in eval
    mode; ``forward(model, x)`` picks the output (default ``model(x)``, e.g. ``encode_text``).
    The model is left unchanged."""
    run = forward or (lambda m, inp: m(inp))
    was = model.training
    model.eval()
    try:
        ref = run(model, x).float()
        apply_reversible(model, config, **settings)
        try:
            out = run(model, x).float()
        finally:
            remove_reversible(model)
    finally:
        model.train(was)
    return float((out - ref).norm() / ref.norm())


def reversible_settings(model: nn.Module) -> dict[str, Any]:
    """The reversible stack's settings as applied to ``model`` (``{}`` when none)."""
    if not reversible_applied(model):
        return {}
    out = reversible_config(model).as_dict()
    if "towers" in out:
        out["towers"] = towers_meant(model, out["towers"])
    return out
