"""After training: the trained model against token methods applied to copies of it.

One row per variant — validation accuracy from a plain loop, and GFLOPs, images/s and
activation memory from :func:`vleff.profile.compare_models` (same process, interleaved,
median of repeats). The first row is the baseline: the trained weights with every method
removed through its own ``remove`` (DynamicViT's predictors go too), so ratios read
"method / baseline".
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from vleff.profile import compare_models
from vleff.registry import applied_methods, get_method, remove_all

__all__ = ["accuracy", "compare_methods"]


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


def compare_methods(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    methods: Mapping[str, Mapping[str, Any]], *, batch_size: int = 16, repeats: int = 5,
                    trained_label: str | None = None) -> list[dict[str, Any]]:
    """Rows for: baseline, the model as trained (if it carries token hooks), each method off the shelf.

    ``methods`` maps registry names to keyword arguments (``{"tome": {"r": 4}}``); every
    variant is a deep copy, so ``model`` itself is left as it was.
    """
    model = model.cpu().eval()
    variants: dict[str, nn.Module] = {"baseline": remove_all(copy.deepcopy(model))}
    trained_hooks = applied_methods(model)
    if trained_hooks:
        variants[trained_label or f"trained with {'+'.join(trained_hooks)}"] = copy.deepcopy(model)
    for name, kwargs in methods.items():
        method = get_method(name)
        variant = remove_all(copy.deepcopy(model))
        method.apply(variant, **dict(kwargs))
        variants[method.label(**dict(kwargs)) + " off the shelf"] = variant
    inputs = torch.cat([b[0] for b in batches])[:batch_size]
    if inputs.shape[0] < batch_size:
        raise ValueError(f"compare.batch_size={batch_size} exceeds the {inputs.shape[0]} validation images")
    rows = compare_models(variants, inputs, repeats=repeats)
    for row, variant in zip(rows, variants.values()):
        row["accuracy"] = accuracy(variant, batches)
    base = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_change"] = row["accuracy"] - base
    return rows
