"""The paths a patched model leaves vleff through (issue 30, point 2): TorchScript and torch.fx
are refused at their entry with vleff's reason and the working alternatives; the library model
is scriptable/traceable again once the methods are removed; torch.export of a token method
equals eager."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

import vleff
from vleff.registry import remove_all

FAMILIES = {"timm": lambda: tm.timm_vit(depth=2), "open_clip": tm.open_clip_model, "hf_clip": tm.hf_clip_model}


def _patched(family: str) -> torch.nn.Module:
    model = FAMILIES[family]().eval()
    vleff.apply_tome(model, r=0)  # nothing merged: the refusal is about the patch, not the method
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torchscript_is_refused_at_its_entry_naming_vleff_and_the_alternatives(family):
    model = _patched(family)
    with pytest.raises(
        TypeError,
        match=r"torch.jit.script cannot take .* tower .*vleff replaced its blocks' forward"
        r".*torch.export.export .*torch.compile",
    ):
        torch.jit.script(model)


def test_scripting_works_again_once_the_methods_are_removed():
    model = _patched("timm")
    remove_all(model)
    scripted = torch.jit.script(model)
    images = tm.images()
    torch.testing.assert_close(scripted(images), model(images))


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_fx_tracing_is_refused_clearly_and_works_once_removed(family):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _patched(family)
    with pytest.raises(TypeError, match="torch.fx symbolic tracing .*cannot take .*vleff replaced"):
        torch.fx.symbolic_trace(model)
    if family == "timm":
        with pytest.raises(TypeError, match="create_feature_extractor"):
            create_feature_extractor(model, return_nodes=["norm"])
        remove_all(model)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(tm.images()), model(tm.images()))


def test_torch_export_of_merged_tokens_equals_eager():
    model = tm.timm_vit(depth=2).eval()
    vleff.apply_tome(model, r=4)
    images = tm.images(2)
    exported = torch.export.export(model, (images,))
    torch.testing.assert_close(exported.module()(images), model(images))
