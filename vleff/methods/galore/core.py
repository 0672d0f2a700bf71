"""GaLore: Adam with moments kept in a low-rank projection of each 2-D gradient (Zhao et al., ICML 2024).

For a projected weight with gradient ``G`` of shape ``[m, n]``, every ``update_proj_gap`` steps
the optimizer takes the SVD of ``G`` (in fp32) and keeps the top-``r`` singular vectors ``P``
(right ones when ``m >= n``, left ones otherwise, for ``proj_type="std"``). Each step then

1. projects ``R = project(G, P, side)``  (``[m, r]`` or ``[r, n]``),
2. runs the Adam moment update and bias correction on ``R`` (so the two moments cost
   ``2 · r · max(m, n)`` numbers instead of ``2 · m · n``),
3. maps the normalised update back, ``U = scale · project_back(N, P, side)``, and applies it
   like AdamW (decoupled weight decay on the full weight).

Parameters without projection (biases, norms, embeddings, or any group without ``rank``) get
exactly :class:`torch.optim.AdamW`'s update, so one optimizer serves the whole model.

Checkpoints: the projection ``P`` is a plain tensor in ``optimizer.state[p]["proj"]`` and its
side a Python bool (``"proj_right"``), so ``optimizer.state_dict()`` round-trips through
``torch.load(weights_only=True)``. The moments are not reset when ``P`` is refreshed (as in the
paper's reference algorithm). :meth:`GaLoreAdamW.load_state_dict` keeps the low-rank moments and
``P`` of projected weights in fp32 (``torch.optim.Optimizer`` would cast them to a bf16/fp16
parameter's dtype, losing precision); the full-size moments of unprojected parameters follow the
parameter's dtype, as during training.

A weight sharded by rows (FSDP2's ``fully_shard``: a ``DTensor``) takes the same step as the
whole weight (:meth:`GaLoreAdamW._update_sharded`: the SVD of the gathered gradient every
``update_proj_gap`` steps, then row-local right projections, or left ones summed over the ranks).

The projected update is :func:`vleff.kernels.galore_step.galore_adam_step`: projection and
back-projection of :mod:`vleff.kernels.lowrank` (reference) or one fused Triton kernel on GPU.
Moments of projected weights are fp32 whatever the parameter dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from vleff.backbones.sharding import is_dtensor, placed_like
from vleff.kernels.galore_step import galore_adam_step
from vleff.methods.galore.config import (
    DEFAULT_SVD,
    PROJ_TYPES,
    SVD_METHODS,
    GaLoreConfig,
)

__all__ = ["DEFAULT_SVD", "GaLoreAdamW", "PROJ_TYPES", "SVD_METHODS", "galore_projection"]

#: torch.svd_lowrank settings: extra sampled directions beyond the rank, and power iterations
LOWRANK_OVERSAMPLE = 8
LOWRANK_NITER = 2
# state of a projected weight that stays fp32 whatever the parameter dtype
_FP32_STATE = ("exp_avg", "exp_avg_sq", "proj")


def _projects_right(shape: torch.Size, proj_type: str) -> bool:
    """Which side a ``[m, n]`` gradient is projected on: right keeps ``[m, r]`` moments."""
    m, n = shape
    if proj_type == "std":
        return m >= n
    if proj_type == "reverse_std":
        return m < n
    if proj_type == "right":
        return True
    if proj_type == "left":
        return False
    raise ValueError(f"proj_type={proj_type!r} is not allowed; use one of {', '.join(PROJ_TYPES)}")


def _lowrank_factors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U[:, :r], V[:, :r])`` of ``torch.svd_lowrank`` (``q = r + LOWRANK_OVERSAMPLE``).

    ``svd_lowrank`` draws its random test matrix from the global RNG; drawing it under
    :func:`torch.random.fork_rng` with a fixed seed keeps the refresh deterministic (resume
    reproduces it) and leaves the training RNG (dropout, shuffling) untouched.
    """
    q = min(r + LOWRANK_OVERSAMPLE, *matrix.shape)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if devices:
            with torch.cuda.device(matrix.device):
                torch.cuda.manual_seed(0)
        else:
            torch.default_generator.manual_seed(0)
        u, _, v = torch.svd_lowrank(matrix, q=q, niter=LOWRANK_NITER)
    return u[:, :r], v[:, :r]


def galore_projection(
    grad: torch.Tensor, rank: int, proj_type: str = "std", svd: str = DEFAULT_SVD
) -> tuple[torch.Tensor, bool]:
    """Top-``rank`` singular vectors of a 2-D gradient, computed in fp32.

    Returns ``(P, right)``: ``P = Vh[:r]`` (``[r, n]``) when ``right`` else ``U[:, :r]``
    (``[m, r]``), with ``r = min(rank, m, n)`` so a rank larger than the matrix is the full,
    orthogonal basis (round trip = identity).

    ``svd="full"`` takes the thin SVD (exact); ``svd="lowrank"`` the randomized
    :func:`torch.svd_lowrank` (``r + 8`` samples, 2 power iterations), which is cheaper for
    ``r`` well below ``min(m, n)`` and spans nearly the same subspace when the spectrum decays
    (see ``benchmarks/galore_svd.py``). When ``r`` reaches ``min(m, n)`` the full SVD is used
    either way, since the basis is then the whole space.
    """
    if grad.ndim != 2:
        raise ValueError(f"GaLore projects 2-D gradients only, got shape {tuple(grad.shape)}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd={svd!r} is not allowed; use one of {', '.join(SVD_METHODS)}")
    right = _projects_right(grad.shape, proj_type)
    r = min(int(rank), grad.shape[0], grad.shape[1])
    matrix = grad.detach().float()
    if svd == "lowrank" and r + LOWRANK_OVERSAMPLE < min(matrix.shape):
        u, v = _lowrank_factors(matrix, r)
        # the factors are fresh [m, q]/[n, q] tensors: copy out the kept columns only
        proj = v.T.contiguous() if right else u.contiguous()
        return proj, right
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    # clone: ``vh[:r]`` is already contiguous, so ``.contiguous()`` would return a view that keeps
    # the whole [min(m, n), n] factor alive in the optimizer state (6x the projector for ViT-B).
    proj = vh[:r].clone() if right else u[:, :r].clone(memory_format=torch.contiguous_format)
    return proj, right


def _check_group(group: dict[str, Any]) -> None:
    """Validate one param group; errors name the key, the value and what is allowed."""
    lr = group["lr"]
    if not (isinstance(lr, (int, float)) or torch.is_tensor(lr)) or lr < 0:
        raise ValueError(f"lr={lr!r} is not allowed; it must be a number >= 0")
    eps = group["eps"]
    if not eps > 0:
        raise ValueError(f"eps={eps!r} is not allowed; it must be > 0")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={tuple(betas)!r} is not allowed; both must be in [0, 1)")
    if group["weight_decay"] < 0:
        raise ValueError(f"weight_decay={group['weight_decay']!r} is not allowed; it must be >= 0")
    rank = group["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank={rank!r} is not allowed; use a positive int (or None for no projection)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"update_proj_gap={gap!r} is not allowed; use a positive int (steps between SVDs)")
    if not group["scale"] > 0:
        raise ValueError(f"scale={group['scale']!r} is not allowed; it must be > 0")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"proj_type={group['proj_type']!r} is not allowed; use one of {', '.join(PROJ_TYPES)}")
    if group["svd"] not in SVD_METHODS:
        raise ValueError(f"svd={group['svd']!r} is not allowed; use one of {', '.join(SVD_METHODS)}")
    mask = group.get("project")
    if mask is not None and len(mask) != len(group["params"]):
        raise ValueError(
            f"param group key 'project' has {len(mask)} entries for {len(group['params'])} params; "
            "it must hold one bool per parameter"
        )


class GaLoreAdamW(Optimizer):
    """AdamW whose 2-D parameters (in groups with ``rank``) keep their moments in a rank-r space.

    Args:
        params: parameters or param groups. A group is projected when its ``rank`` is an int;
            inside such a group every 2-D parameter is projected unless the group carries
            ``"project": [bool, ...]`` (one per parameter; :func:`galore_param_groups` and the
            Lightning callback set it).
        lr, betas, eps, weight_decay: as :class:`torch.optim.AdamW`.
        rank: default rank for groups that do not set one (``None``: no projection).
        update_proj_gap: steps between SVD refreshes of a parameter's projection (``T``);
            the SVD runs on steps 1, T+1, 2T+1, ...
        scale: ``α``, multiplies the back-projected update.
        proj_type: ``"std"`` (right if ``m >= n`` else left), ``"reverse_std"``, ``"left"``,
            ``"right"``.
        svd: ``"full"`` (thin SVD) or ``"lowrank"`` (randomized ``torch.svd_lowrank``) for the
            projection refresh; see :func:`galore_projection`.
        decoupled_weight_decay: ``True`` is AdamW; ``False`` adds ``weight_decay · p`` to the
            gradient first (``torch.optim.Adam``'s L2 penalty), so Adam can be converted too.
    """

    #: the registry method this optimizer is (another optimizer-replacing method asks its rules)
    vleff_method = "galore"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        update_proj_gap: int = GaLoreConfig.update_proj_gap,
        scale: float = GaLoreConfig.scale,
        proj_type: str = GaLoreConfig.proj_type,
        svd: str = GaLoreConfig.svd,
        decoupled_weight_decay: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            svd=svd,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        _check_group({**defaults, "params": []})
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, keeping projected weights' state in fp32.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to its
        parameter's dtype. For a bf16/fp16 weight that would turn the fp32 low-rank moments and
        projector into bf16/fp16 (rounded, and rejected by the next :meth:`step`). The state of
        every parameter whose saved state has a ``"proj"`` is therefore taken from ``state_dict``
        as saved (``exp_avg``, ``exp_avg_sq``, ``proj`` in fp32, moved to the parameter's device),
        so a resumed run continues bit for bit. Unprojected parameters keep torch's policy (their
        moments have the parameter's dtype, like :class:`torch.optim.AdamW`'s).
        """
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        keep = {}
        for pid, entry in state_dict["state"].items():
            if isinstance(entry, dict) and "proj" in entry:
                keep[pid] = {k: entry[k] for k in _FP32_STATE if torch.is_tensor(entry.get(k))}
        super().load_state_dict(state_dict)
        if not keep:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        if len(params) != len(saved_ids):  # a load_state_dict pre-hook changed the layout
            raise ValueError(
                f"GaLoreAdamW: the loaded state has {len(saved_ids)} parameters, the optimizer "
                f"{len(params)}; cannot match the fp32 state of projected weights"
            )
        for pid, p in zip(saved_ids, params):
            for key, value in keep.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    @staticmethod
    def projection_mask(group: dict[str, Any]) -> list[bool]:
        """Which parameters of ``group`` are projected (always ``False`` for non-2-D ones)."""
        if group["rank"] is None:
            return [False] * len(group["params"])
        mask = group.get("project")
        if mask is None:
            mask = [True] * len(group["params"])
        return [bool(m) and p.ndim == 2 for p, m in zip(group["params"], mask)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` (re-evaluates the loss) is supported like AdamW."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p, projected in zip(group["params"], self.projection_mask(group)):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                self._update(p, group, projected)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any], projected: bool) -> None:
        grad = p.grad
        state = self.state[p]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0)
        state["step"] += 1
        step = int(state["step"].item())
        if wd and not group["decoupled_weight_decay"]:
            grad = grad.add(p, alpha=wd)

        if projected and is_dtensor(p):
            self._update_sharded(p, grad, state, group, step)
            return
        if projected:
            if "proj" not in state or (step - 1) % group["update_proj_gap"] == 0:
                state["proj"], state["proj_right"] = galore_projection(
                    grad, group["rank"], group["proj_type"], group.get("svd", "full")
                )
            proj = state["proj"]
            side = "right" if state["proj_right"] else "left"
            if "exp_avg" not in state:
                r = proj.shape[0] if side == "right" else proj.shape[1]
                low_shape = (p.shape[0], r) if side == "right" else (r, p.shape[1])
                state["exp_avg"] = torch.zeros(low_shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(low_shape, dtype=torch.float32, device=p.device)
            # project -> Adam in rank r -> project back -> decoupled decay + update (fused on GPU)
            galore_adam_step(
                p,
                grad,
                proj,
                state["exp_avg"],
                state["exp_avg_sq"],
                side=side,
                step=step,
                lr=lr,
                betas=(beta1, beta2),
                eps=eps,
                weight_decay=wd if group["decoupled_weight_decay"] else 0.0,
                scale=group["scale"],
            )
            return

        if "exp_avg" not in state:  # (a DTensor for a sharded parameter: each rank its shard)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        if wd and group["decoupled_weight_decay"]:
            p.mul_(1 - lr * wd)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    def _update_sharded(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], step: int
    ) -> None:
        """The projected step of a weight sharded by rows (FSDP2: a ``DTensor`` placed ``Shard(0)``
        on a 1-D mesh), equal to the unsharded step.

        * The refresh takes the SVD of the whole gradient, gathered once every
          ``update_proj_gap`` steps; every rank computes the same ``P`` (kept whole: ``[r, n]`` or
          ``[m, r]``, small).
        * Right projection (``m >= n``): ``G Pᵀ`` is row by row, so each rank projects, moves its
          moments (a ``DTensor`` ``[m, r]`` sharded like the weight) and updates its own rows.
        * Left projection: ``Pᵀ G`` sums over all rows, so the ranks add their partial products
          (one all-reduce of ``[r, n]``), keep the same ``[r, n]`` moments, and each updates its
          rows with its rows of ``P``.
        """
        import torch.distributed as dist
        from torch.distributed.tensor import Shard

        from vleff.kernels.galore_step import galore_adam_step_projected
        from vleff.kernels.lowrank import project_reference

        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise TypeError(
                f"GaLore projects a sharded weight placed as (Shard(0),) on a 1-D mesh (FSDP2's fully_shard), got "
                f"{tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh for a weight of shape {tuple(p.shape)}"
            )
        if "proj" not in state or (step - 1) % group["update_proj_gap"] == 0:
            state["proj"], state["proj_right"] = galore_projection(
                grad.full_tensor(), group["rank"], group["proj_type"], group.get("svd", "full")
            )
        proj, right = state["proj"], state["proj_right"]
        local_grad = grad.to_local().float()
        if right:
            r = proj.shape[0]
            if "exp_avg" not in state:  # [m, r], sharded by rows like the weight
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = placed_like(
                        torch.zeros(p.shape[0], r, dtype=torch.float32, device=local_grad.device), p
                    )
            low, rows_proj = project_reference(local_grad, proj, "right"), proj
            moments = state["exp_avg"].to_local(), state["exp_avg_sq"].to_local()
        else:
            rows_proj = placed_like(proj, p).to_local()  # P's rows of this rank's weight rows
            low = project_reference(local_grad, rows_proj, "left")
            dist.all_reduce(low, group=p.device_mesh.get_group())
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(low)
                state["exp_avg_sq"] = torch.zeros_like(low)
            moments = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        galore_adam_step_projected(
            p.to_local(),
            low,
            rows_proj,
            *moments,
            side="right" if right else "left",
            step=step,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"] if group["decoupled_weight_decay"] else 0.0,
            scale=group["scale"],
        )
