"""Child-Tuning's optimizer step, worked out here in plain PyTorch (float64) from the paper's code
(``ChildTuningOptimizer.py: ChildTuningAdamW.step``), as the tests' reference: the gradient is
masked (F: ``· Bernoulli(p) / p``; D: ``· mask``) before the moments, then an AdamW step with
decoupled weight decay on every entry. ``variant="transformers"`` is the reference's own AdamW
arithmetic (Hugging Face's: the bias corrections folded into the step size with ``eps`` added to
``√v``, decay applied after the update); ``variant="torch"`` is ``torch.optim.AdamW``'s (decay
first, ``eps`` added to the bias-corrected ``√v̂``). vleff masks the gradient of whatever optimizer
the user configures, so the tests compare it with the torch arithmetic exactly; the two AdamW
variants differ by themselves (``eps`` matters relatively ``eps·(1 − √(1 − β₂ᵗ))/√v``, large for an
entry whose gradients were masked often: no tolerance bounds it usefully), not by the masking."""

from __future__ import annotations

import math

import torch


def bernoulli_draw(shapes: list[torch.Size], p: float, seed: int, step: int) -> list[torch.Tensor]:
    """The documented draw of Child-Tuning_F's step ``step``: one CPU generator seeded with
    ``seed · 1,000,003 + step``, ``U[0, 1) < p`` per parameter in order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [torch.rand(s, generator=g) < p for s in shapes]


def child_tuning_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: list[dict[str, torch.Tensor]],
    gate: list[torch.Tensor | None],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    variant: str,
) -> list[torch.Tensor]:
    """One step; ``gate[i]`` multiplies gradient ``i`` before the moments (``None``: unmasked).
    ``state[i]`` holds ``m``, ``v``, ``t`` and is updated in place; returns the new parameters."""
    b1, b2 = betas
    out = []
    for p, g, s, m in zip(params, grads, state, gate):
        g = g if m is None else g * m
        s["t"] = s.get("t", 0) + 1
        s["m"] = b1 * s.get("m", torch.zeros_like(p)) + (1 - b1) * g
        s["v"] = b2 * s.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        c1, c2 = 1 - b1 ** s["t"], 1 - b2 ** s["t"]
        if variant == "transformers":
            new = p - lr * math.sqrt(c2) / c1 * s["m"] / (s["v"].sqrt() + eps)
            new = new - lr * weight_decay * new
        elif variant == "torch":
            new = p * (1 - lr * weight_decay)
            new = new - lr / c1 * s["m"] / (s["v"].sqrt() / math.sqrt(c2) + eps)
        else:
            raise ValueError(variant)
        out.append(new)
    return out
