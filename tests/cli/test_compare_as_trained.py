"""Issue 24 item 5: vleff-train's comparison measures the trained model as trained.

Reversible blocks and LoRA are part of the function the weights were trained as; removing
them for the baseline row (and for the token methods' rows) measured a different model.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import images, timm_vit

import vleff
from vleff.cli.evaluate import compare_methods
from vleff.registry import applied_methods


def _trained(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm_vit().double()
    if kind == "reversible":
        vleff.apply_reversible(model, coupling="meft")
        with torch.no_grad():  # "trained" adapters: the MEFT stack is now far from the plain ViT
            for name, p in model.named_parameters():
                if "adapter" in name:
                    p.normal_(0, 0.5)
    else:
        vleff.apply_lora(model, r=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model.eval()


def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


@pytest.mark.parametrize("kind", ["reversible", "lora"])
def test_baseline_row_is_the_model_as_trained(kind, caplog):
    model = _trained(kind)
    x = images(16).double()
    with torch.no_grad():
        y = model(x).argmax(-1)  # the trained model is right on every image by construction
    plain = timm_vit().double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()}, strict=False)
    assert _top1(plain, x, y) < 1.0  # without the method the weights compute something else

    with caplog.at_level(logging.WARNING, logger="vleff.evaluate"):
        rows = compare_methods(model, [(x, y)], {"tome": {"r": 2}}, batch_size=4, repeats=1)
    by_name = {r["name"]: r for r in rows}
    assert rows[0]["accuracy"] == _top1(model, x, y) == 1.0  # old code: the plain weights' accuracy
    assert rows[0]["name"] == f"baseline (with {kind})"
    assert applied_methods(model) == [kind]  # the caller's model is untouched
    if kind == "reversible":  # a token method cannot run inside the reversible stack: left out, said why
        assert list(by_name) == ["baseline (with reversible)"]
        assert "tome(r=2) left out" in caplog.text and "reversible" in caplog.text
    else:  # ToMe measured on the LoRA model as trained, not on the LoRA-free weights
        tome_row = by_name["tome(r=2) off the shelf"]
        assert tome_row["flops_ratio"] < 1.0 and rows[0]["accuracy_change"] == 0.0
        assert len(rows) == 2


def test_token_methods_still_leave_the_baseline():
    """A token method the model was trained with is removed for the baseline (same weights,
    all tokens) and measured as trained in its own row."""
    torch.manual_seed(0)
    model = timm_vit().double().eval()
    vleff.apply_tome(model, r=2)
    x = images(8).double()
    y = torch.zeros(8, dtype=torch.long)
    rows = compare_methods(model, [(x, y)], {}, batch_size=4, repeats=1)
    assert [r["name"] for r in rows] == ["baseline", "trained with tome"]
    assert rows[1]["flops_ratio"] < 1.0
