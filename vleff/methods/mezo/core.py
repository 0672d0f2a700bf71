"""MeZO: zeroth-order fine-tuning with two forward passes per step (Malladi et al., NeurIPS 2023).

SPSA with the random direction regenerated from a seed instead of stored::

    θ += ε z ;  L+ = L(θ)
    θ -= 2ε z ; L- = L(θ)
    θ += ε z                       # restore
    g  = (L+ - L-) / 2ε            # projected gradient, an estimate of zᵀ∇L
    θ -= lr · (g z + wd θ)         # z regenerated from the same seed; no decay on biases/norms

Memory is inference memory: no autograd graph, no ``.grad`` buffers, no optimizer moments,
and ``z`` exists one parameter at a time.

Direction contract (tests and users can rebuild ``z``): for a seed ``s``, the parameters with
``requires_grad=True`` are visited in param-group order (frozen ones are skipped: never
perturbed, never updated) and each gets ``torch.randn(p.shape, generator=g, dtype=p.dtype)``
from one ``torch.Generator(device=p.device).manual_seed(s)`` per device, drawn in that order.
A parameter sharded across ranks (a ``DTensor``: FSDP2, Lightning's ``ModelParallelStrategy``)
draws the same whole ``z`` on every rank and perturbs and updates its own shard with that
shard's slice of it, so the direction is the one an unsharded run draws (``z`` of one parameter
then exists whole on each rank, one parameter at a time). ``fully_shard`` keeps the root's
gathered parameters after a forward, for a backward MeZO never runs: a closure of your own must
``reshard()`` every module of :func:`vleff.backbones.sharding.fsdp_modules` after its forward (the
Lightning callback does), or the next forward runs on the copy gathered before MeZO moved the shards.

Restoring is exact only up to rounding (``θ + εz - 2εz + εz``), and an update ``lr · g · z``
smaller than half a weight's rounding step is rounded away. In fp32 both are negligible; in
bf16 (8 significant bits) they are the whole story at MeZO's learning rates: on a linear
regression (30 steps, ``tests/methods/mezo/test_mezo.py``) at lr 1e-4 the bf16 weights moved 3.2× as far as
the fp32 run's and in an unrelated direction (cosine 0.11; at lr 1e-6, 311× and −0.13), while
fp32 weights under bf16 autocast followed the fp32 run (cosine 0.998). The optimizer therefore refuses bf16 and
fp16 trainable parameters unless ``allow_low_precision=True``: keep fp32 weights and run the
forward in bf16 (Lightning's ``precision="bf16-mixed"``, ``torch.autocast``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.optim import Optimizer

from vleff.backbones.sharding import is_dtensor, placed_like
from vleff.checks import check_bool
from vleff.optim import wants_decay

__all__ = ["LOW_PRECISION", "MeZO", "default_decay", "directions", "perturb_", "spsa_projected_grad"]

Reduce = Callable[[torch.Tensor], torch.Tensor]

#: parameter dtypes whose rounding swamps MeZO's restore and update (see the module docstring)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def directions(params: Iterable[torch.Tensor], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(p, z_p)`` with ``z`` drawn from ``seed`` (see the module's direction contract);
    for a sharded parameter, ``(its local shard, that shard's slice of z)``."""
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:
        gen = generators.get(p.device)
        if gen is None:
            gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(int(seed))
        z = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device)
        yield _local(p, z) if is_dtensor(p) else (p, z)


def _local(p: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sharded parameter's local shard and its piece of the whole direction ``z``."""
    from torch.distributed.tensor import Replicate, Shard

    if not all(isinstance(pl, (Shard, Replicate)) for pl in p.placements):
        raise TypeError(
            f"MeZO perturbs sharded parameters placed as Shard or Replicate; got {tuple(p.placements)} "
            f"for a parameter of shape {tuple(p.shape)}"
        )
    # the rank's own storage (no autograd here: MeZO runs under no_grad), and z's piece of it
    return p.to_local(), placed_like(z, p).to_local()


@torch.no_grad()
def perturb_(params: Iterable[torch.Tensor], seed: int, scale: float) -> None:
    """In place ``p += scale · z`` for every parameter, ``z`` regenerated from ``seed``."""
    for p, z in directions(params, seed):
        p.add_(z, alpha=scale)


def _as_loss(value: Any) -> torch.Tensor:
    if isinstance(value, dict):
        if "loss" not in value:
            raise ValueError(f"MeZO needs a loss; the closure returned a dict without 'loss' (keys: {list(value)})")
        value = value["loss"]
    if not torch.is_tensor(value) or value.numel() != 1:
        raise ValueError(
            f"MeZO needs a scalar loss tensor from the closure, got {type(value).__name__}"
            + (f" of shape {tuple(value.shape)}" if torch.is_tensor(value) else "")
        )
    return value.detach().reshape(())


@torch.no_grad()
def spsa_projected_grad(
    params: list[torch.Tensor], loss_fn: Callable[[], Any], seed: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-point estimate ``(L(θ+εz) - L(θ-εz)) / 2ε``; the weights are restored afterwards.

    Returns ``(projected_grad, loss_plus, loss_minus)`` as 0-d tensors (fp64 for the gradient
    when the losses are fp64, else fp32).
    """
    if not eps > 0:
        raise ValueError(f"eps={eps!r} is not allowed; MeZO's perturbation size must be > 0")
    offset = eps
    perturb_(params, seed, eps)
    try:
        loss_plus = _as_loss(loss_fn())
        perturb_(params, seed, -2 * eps)
        offset = -eps
        loss_minus = _as_loss(loss_fn())
    finally:
        perturb_(params, seed, -offset)  # restore, also when a loss raised half-way
    dtype = torch.float64 if loss_plus.dtype == torch.float64 else torch.float32
    grad = (loss_plus.to(dtype) - loss_minus.to(dtype)) / (2 * eps)
    return grad, loss_plus, loss_minus


def default_decay(group: dict[str, Any]) -> list[bool]:
    """Per-parameter decay flags of a group given without ``"decay"``: MeZO's trainer
    (``zo_update``) decays neither biases nor LayerNorm parameters, and the Lightning callback
    uses :func:`vleff.optim.wants_decay`; with the parameters' names (the group's
    ``"param_names"``, which ``torch.optim`` fills from ``named_parameters()``) that rule
    applies here too, without names the shape part of it (decay only tensors of 2-D or more)."""
    names = group.get("param_names")
    if names is not None:
        return [wants_decay(n, p) for n, p in zip(names, group["params"])]
    return [p.ndim >= 2 for p in group["params"]]


class MeZO(Optimizer):
    """Zeroth-order SGD as a closure optimizer: ``optimizer.step(closure)`` with ``closure()``
    returning the loss (a tensor, or a dict with ``"loss"``); the closure is called twice
    under ``torch.no_grad()`` at the perturbed weights.

    Args:
        params: parameters, ``named_parameters()`` or param groups (each group may set ``lr``,
            ``weight_decay`` and ``"decay": [bool, ...]``, one flag per parameter). Without
            ``"decay"`` the rule of MeZO's trainer (and of the Lightning callback) applies: no
            decay on biases and norms. With names (``model.named_parameters()``, or groups with
            ``"param_names"``) it is :func:`vleff.optim.wants_decay`, the callback's
            rule (biases, norms, embeddings, ``logit_scale``, anything below 2-D); without names
            every parameter below 2-D (biases, norm weights, scalars) is left undecayed. Pass
            ``"decay": [True, ...]`` to decay everything.
        lr: step size (MeZO's full-parameter runs use 1e-6 to 1e-7).
        eps: perturbation size ε.
        weight_decay: decoupled decay ``lr · wd · θ`` on parameters marked for decay (MeZO's
            scripts run with 0).
        seed: base seed; step ``t`` uses ``seed + t`` so every DDP rank draws the same ``z``
            without communicating (the step count is in ``state_dict()`` for resume).
        reduce: optional ``reduce(tensor) -> tensor`` averaging the projected gradient across
            processes (DDP); ranks then apply identical updates.
        allow_low_precision: accept bf16/fp16 trainable parameters (refused by default: their
            rounding, not the loss, then decides where the weights go; see the module docstring).

    ``step`` returns the closure's loss at the unperturbed point estimate ``(L+ + L-)/2`` and
    leaves ``last_projected_grad``, ``last_loss_plus``/``last_loss_minus`` for logging.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        reduce: Reduce | None = None,
        allow_low_precision: bool = False,
    ) -> None:
        # read by add_param_group, which __init__ calls
        self.allow_low_precision = check_bool("allow_low_precision", allow_low_precision)
        if not eps > 0:
            raise ValueError(f"eps={eps!r} is not allowed; MeZO's perturbation size must be > 0")
        if not lr >= 0:
            raise ValueError(f"lr={lr!r} is not allowed; it must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} is not allowed; it must be >= 0")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self.base_seed = int(seed)
        self.reduce = reduce
        self.steps_done = 0
        self.last_projected_grad: torch.Tensor | None = None
        self.last_loss_plus: torch.Tensor | None = None
        self.last_loss_minus: torch.Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["eps"] > 0:
            raise ValueError(f"eps={group['eps']!r} is not allowed; MeZO's perturbation size must be > 0")
        decay = group.get("decay")
        if decay is None:
            group["decay"] = default_decay(group)
        elif len(decay) != len(group["params"]):
            raise ValueError(f"param group key 'decay' has {len(decay)} entries for {len(group['params'])} params")
        low = [p for p in group["params"] if p.requires_grad and p.dtype in LOW_PRECISION]
        if low and not self.allow_low_precision:
            raise ValueError(
                f"MeZO: {len(low)} trainable parameter(s) are {low[0].dtype} (the first of shape "
                f"{tuple(low[0].shape)}) "
                "and allow_low_precision=False. In 16-bit weights the restore θ+εz−2εz+εz is inexact and an update "
                "lr·g·z below a weight's rounding step is rounded away, so the weights drift instead of training. "
                "Keep fp32 weights and run the forward in bf16 (Lightning: precision='bf16-mixed'; plain PyTorch: "
                "torch.autocast), or pass allow_low_precision=True to accept the drift."
            )

    def _params(self) -> list[torch.Tensor]:
        """The parameters MeZO perturbs and updates: those with ``requires_grad`` (frozen ones
        stay exactly as they are, as :class:`torch.optim.AdamW` leaves them alone)."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def current_seed(self) -> int:
        """Seed of the next step (identical on every rank that started from the same state)."""
        return self.base_seed + self.steps_done

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        if closure is None:
            if all(float(g["lr"]) == 0 for g in self.param_groups):
                # a step of size 0 changes nothing, whatever the loss: torch.distributed.checkpoint
                # takes one (no closure, lr 0) to initialise an optimizer's state before it saves or
                # loads a sharded checkpoint; it is not counted (the seed sequence does not move)
                return None
            raise ValueError("MeZO.step needs a closure that returns the loss (it evaluates it twice)")
        eps_values = {g["eps"] for g in self.param_groups}
        if len(eps_values) != 1:
            raise ValueError(f"all MeZO param groups must share one eps, got {sorted(eps_values)}")
        eps = eps_values.pop()
        seed = self.current_seed()
        params = self._params()
        grad, loss_plus, loss_minus = spsa_projected_grad(params, closure, seed, eps)
        if self.reduce is not None:
            grad = self.reduce(grad)
        self._apply(seed, float(grad))
        self.steps_done += 1
        self.last_projected_grad, self.last_loss_plus, self.last_loss_minus = grad, loss_plus, loss_minus
        return (loss_plus + loss_minus) / 2

    @torch.no_grad()
    def _apply(self, seed: int, projected_grad: float) -> None:
        """``θ -= lr (g z + wd θ)``; ``z`` regenerated in the same order as the perturbation."""
        flags = []
        for group in self.param_groups:
            decay = group.get("decay")  # absent after loading a state_dict saved without it
            if decay is None:
                decay = group["decay"] = default_decay(group)
            flags.extend(
                (group["lr"], group["weight_decay"] if d else 0.0)
                for p, d in zip(group["params"], decay)
                if p.requires_grad
            )
        for (p, z), (lr, wd) in zip(directions(self._params(), seed), flags):
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(z, alpha=-lr * projected_grad)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s, with the seed and the step count in every param group (``"mezo"``).

        In the groups, not beside them: a sharded checkpoint (``torch.distributed.checkpoint``,
        Lightning's ``ModelParallelStrategy``) keeps an optimizer's ``state`` and ``param_groups``
        and drops any other key, and a resume that lost the step count would redraw the first
        steps' directions."""
        out = super().state_dict()
        for group in out["param_groups"]:
            group["mezo"] = {"base_seed": self.base_seed, "steps_done": self.steps_done}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        extra = state_dict.pop("mezo", None)  # where earlier checkpoints kept it
        for group in groups:
            extra = group.pop("mezo", None) or extra
        state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)
        if extra is not None:
            self.base_seed = int(extra["base_seed"])
            self.steps_done = int(extra["steps_done"])
