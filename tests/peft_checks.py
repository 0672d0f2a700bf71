"""Checks every peft tuner method's tests share (DoRA, IA3, AdaLoRA): exact start against the
unpatched model with perturbed biases, and an exact remove (names, flags, state_dict)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from families import FAMILIES


def model_with_perturbed_biases(family: str) -> torch.nn.Module:
    """The family's tiny model in eval mode with every bias drawn at random: a tuner that touched a
    bias (or scaled one it should not) would show at the start."""
    torch.manual_seed(0)
    model = FAMILIES[family].make().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def max_start_change(family: str, tower: str, apply: Callable[[torch.nn.Module], object]) -> float:
    """max |Δoutput| of ``tower`` right after ``apply`` against the unpatched model."""
    model = model_with_perturbed_biases(family)
    fwd = FAMILIES[family].forwards[tower]
    with torch.no_grad():
        ref = fwd(model)
        apply(model)
        return (fwd(model) - ref).abs().max().item()


def check_remove_restores_exactly(family: str, apply: Callable, remove: Callable, perturb: Callable) -> None:
    """Mixed ``requires_grad`` flags before ``apply``; after training-like changes to the adapters
    and ``remove``: the same parameter names in the same order, the same flags, the same
    ``state_dict`` keys and values, the same module objects and outputs."""
    model = model_with_perturbed_biases(family)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    names = [n for n, _ in model.named_parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: m for n, m in model.named_modules()}
    fwd = next(iter(FAMILIES[family].forwards.values()))
    with torch.no_grad():
        ref = fwd(model)
        apply(model)
        perturb(model)
        assert (fwd(model) - ref).abs().max() > 0  # the adapters act
    remove(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(modules[n] is m for n, m in model.named_modules())
    assert "peft_config" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(fwd(model), ref)
