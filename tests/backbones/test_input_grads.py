"""The hooks that let what trains inside a frozen tower get gradients under re-entrant
checkpointing (vleff/backbones/input_grads.py), checked against autograd without checkpointing."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from tiny_models import blip_token_ids, hf_blip_retrieval, timm_vit

from vleff.backbones import find_towers
from vleff.backbones.input_grads import attach_input_grads, detach_input_grads


def _frozen_but_one_bias(model: torch.nn.Module, bias: torch.nn.Parameter) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    bias.requires_grad_(True)


def _blip_text_grad(model, bias, checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = blip_token_ids()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(0)
    out = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    (out.double() ** 2).sum().backward()
    if checkpointing:
        model.gradient_checkpointing_disable()
    grad = bias.grad.clone()
    bias.grad = None
    return out.detach(), grad


def _blip() -> tuple[torch.nn.Module, torch.nn.Parameter]:
    torch.manual_seed(0)
    model = hf_blip_retrieval()
    model.config.text_config.hidden_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    bias = model.text_encoder.encoder.layer[0].output.dense.bias
    _frozen_but_one_bias(model, bias)
    return model, bias


def test_blip_text_under_hf_reentrant_checkpointing_gets_the_gradient_of_the_plain_model():
    """Hugging Face's own fix for frozen inputs makes BLIP's in-place position add fail; with the
    tower's hooks the output and the trainable bias's gradient equal the run without checkpointing."""
    model, bias = _blip()
    out_plain, grad_plain = _blip_text_grad(model, bias, checkpointing=False)
    with pytest.raises(RuntimeError, match="in-place"):  # why the hook exists (HF, unpatched)
        _blip_text_grad(model, bias, checkpointing=True)
    model.gradient_checkpointing_disable()
    towers = [t for t in find_towers(model) if t.modality == "text"]
    handles = attach_input_grads(towers)
    out, grad = _blip_text_grad(model, bias, checkpointing=True)
    torch.testing.assert_close(out, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_plain, rtol=1e-6, atol=1e-7)
    assert grad.abs().sum() > 0
    copy.deepcopy(model)  # handles are plain ids: the hooked model copies
    detach_input_grads(handles)
    assert not model.text_encoder.embeddings._forward_pre_hooks
    assert not model.text_encoder.embeddings._forward_pre_hooks_with_kwargs


def test_the_blip_hook_leaves_calls_with_given_embeddings_or_without_gradients_alone():
    model, _ = _blip()
    towers = [t for t in find_towers(model) if t.modality == "text"]
    attach_input_grads(towers)
    ids, mask = blip_token_ids()
    with torch.no_grad():
        a = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    embeds = model.text_encoder.embeddings.word_embeddings(ids)
    b = model.text_encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_timm_frozen_tower_under_reentrant_checkpointing_trains_the_inside_only_with_the_hook():
    """timm has no ``enable_input_require_grads``: without the hook the bias inside the frozen
    blocks gets no gradient at all under re-entrant checkpointing; with it, autograd's gradient."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    torch.manual_seed(0)
    model = timm_vit().double()
    bias = model.blocks[1].mlp.fc1.bias
    _frozen_but_one_bias(model, bias)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def grad(checkpointing: bool) -> torch.Tensor | None:
        model.set_grad_checkpointing(checkpointing)
        bias.grad = None
        model(x).pow(2).sum().backward()
        return bias.grad

    reference = grad(False).clone()
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        model.set_grad_checkpointing(True)
        assert not model(x).requires_grad  # the silent loss the hook prevents: nothing to train
        handles = attach_input_grads(find_towers(model))
        torch.testing.assert_close(grad(True), reference, rtol=1e-12, atol=1e-12)
        pickle.loads(pickle.dumps(model))  # handles are plain ids: the hooked model pickles
    finally:
        set_reentrant_ckpt(before)
    detach_input_grads(handles)
    assert not model.norm_pre._forward_hooks


def test_an_adapter_giving_an_unknown_kind_is_refused_naming_it():
    class Odd:
        def input_grad_hooks(self):
            return [(torch.nn.Identity(), "backward", lambda *a: None)]

    with pytest.raises(ValueError, match="kind='backward'"):
        attach_input_grads([Odd()])  # type: ignore[list-item]
