"""After training: the trained model against token methods applied to copies of it.

One row per variant — validation accuracy from a plain loop, and GFLOPs, images/s and
activation memory from :func:`vleff.profile.compare_models` (same process, interleaved,
median of repeats). The first row is the baseline: the model as trained, with only its
*token* methods removed through their own ``remove`` (they change speed, not the function the
weights were trained as; DynamicViT's predictors go too), so ratios read "method / baseline".
Methods that are part of the trained function (reversible blocks, LoRA, side networks, MemVP)
stay: without them the trained weights compute something else (a reversible MEFT stack
removed scored 23 % where the trained model scored 96 %). A method off the shelf is applied to
a copy of that baseline; one that cannot run on it (a token method inside a reversible stack)
is left out of the table with a warning rather than measured on a different model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from vleff.profile import compare_models
from vleff.registry import applied_methods, get_method

__all__ = ["accuracy", "compare_methods", "remove_token_methods"]

log = logging.getLogger("vleff.evaluate")


def remove_token_methods(model: nn.Module) -> list[str]:
    """Remove the token methods (registry kind ``"tokens"``) applied to ``model``, in place.

    Returns the names of the methods that stay applied: those of other kinds (reversible
    blocks, LoRA, side networks, MemVP) belong to the function the weights were trained as.
    """
    kept = []
    for name in applied_methods(model):
        method = get_method(name)
        if method.kind == "tokens":
            assert method.remove is not None
            method.remove(model)
        else:
            kept.append(name)
    return kept


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``(images, labels)`` batches, in [0, 1]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    try:
        for images, labels in batches:
            logits = model(images.to(device))
            correct += int((logits.argmax(-1).cpu() == labels).sum())
            total += int(labels.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the validation data is empty")
    return correct / total


def compare_methods(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    methods: Mapping[str, Mapping[str, Any]],
    *,
    batch_size: int = 16,
    repeats: int = 5,
    trained_label: str | None = None,
) -> list[dict[str, Any]]:
    """Rows for: baseline, the model as trained (if it carries token hooks), each method off the shelf.

    The baseline is ``model`` with its token methods removed and every other method kept (see
    the module docstring); the row is named ``baseline (with <methods>)`` when it keeps any.
    ``methods`` maps registry names to keyword arguments (``{"tome": {"r": 4}}``), each applied
    to a copy of the baseline; a method that raises on it (at apply or at a one-image forward)
    is left out with a logged warning. Every variant is a deep copy, so ``model`` itself is left
    as it was.
    """
    model = model.cpu().eval()
    baseline = copy.deepcopy(model)
    kept = remove_token_methods(baseline)
    variants: dict[str, nn.Module] = {"baseline" + (f" (with {'+'.join(kept)})" if kept else ""): baseline}
    trained_hooks = [name for name in applied_methods(model) if name not in kept]
    if trained_hooks:
        variants[trained_label or f"trained with {'+'.join(trained_hooks)}"] = copy.deepcopy(model)
    inputs = torch.cat([b[0] for b in batches])[:batch_size]
    if inputs.shape[0] < batch_size:
        raise ValueError(f"compare.batch_size={batch_size} exceeds the {inputs.shape[0]} validation images")
    for name, kwargs in methods.items():
        method = get_method(name)
        variant = copy.deepcopy(baseline)
        try:
            method.apply(variant, **dict(kwargs))
            with torch.no_grad():
                variant.eval()(inputs[:1])
        except (ValueError, RuntimeError, TypeError) as err:
            if not kept:  # nothing of the trained model's own is in the way: a real failure
                raise
            log.warning(
                "compare: %s left out: it cannot run on the trained model (with %s): %s",
                method.label(**dict(kwargs)),
                "+".join(kept),
                err,
            )
            continue
        variants[method.label(**dict(kwargs)) + " off the shelf"] = variant
    rows = compare_models(variants, inputs, repeats=repeats)
    for row, variant in zip(rows, variants.values()):
        row["accuracy"] = accuracy(variant, batches)
    base = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_change"] = row["accuracy"] - base
    return rows
