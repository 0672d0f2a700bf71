"""What every prompt method (``vleff.side.prompts``: learned keys/values in front of each block's
attention) guarantees, for each of them: a causal text tower stays causal (a later token does not
change an earlier output), padding is ignored (its ids do not change a real token's output), and
under re-entrant checkpointing the prompts get their gradients only because the first block's input
is made to require grad (checked by removing that hook: then they get none)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

from vleff.backbones import find_towers
from vleff.registry import get_method
from vleff.side.prompts import PromptModule

PROMPT_METHODS = {
    "vpt": {"num_tokens": 3},
    "prefix": {"num_tokens": 3, "dropout": 0.0},
    "aprompt": {"kv_tokens": 2, "num_tokens": 2},
}


def _apply(name: str, model: torch.nn.Module, towers: str) -> None:
    get_method(name).apply(model, towers=towers, **PROMPT_METHODS[name])


def _modules(model: torch.nn.Module) -> list[PromptModule]:
    return [m for m in model.modules() if isinstance(m, PromptModule)]


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_a_causal_text_tower_stays_causal(name, family):
    torch.manual_seed(0)
    model = (tm.open_clip_model() if family == "open_clip" else tm.hf_clip_model()).double().eval()
    ids = tm.token_ids(length=16)
    ids[:, :] = torch.randint(1, 90, ids.shape, generator=torch.Generator().manual_seed(1))  # no padding
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 90 + 1
    (tower,) = [t for t in find_towers(model) if t.modality == "text"]
    seen: dict[str, torch.Tensor] = {}
    tower.blocks()[-1].register_forward_hook(
        lambda m, a, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o))
    )

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            model.encode_text(t) if family == "open_clip" else model.get_text_features(input_ids=t)
        out = seen["out"]
        return out.transpose(0, 1) if out.shape[0] != t.shape[0] else out

    plain = run(ids)
    _apply(name, model, "text")
    a, b = run(ids), run(changed)
    assert (a - plain).abs().max() > 1e-4  # the prompts act ...
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-10, rtol=0)  # ... and later tokens stay unseen
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
def test_padding_is_ignored_on_blip_text(name):
    """BLIP's (bidirectional) text encoder: what the padded positions hold does not reach a real token."""
    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().double().eval()
    ids, mask = tm.blip_token_ids()
    other = ids.masked_fill(mask == 0, 5)  # other ids where the mask is 0
    image = tm.images().double()

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            emb = model.vision_model(pixel_values=image).last_hidden_state
            return model.text_encoder(input_ids=t, attention_mask=mask, encoder_hidden_states=emb).last_hidden_state

    plain = run(ids)
    _apply(name, model, "text")
    a, b = run(ids), run(other)
    real = mask.bool()
    assert (a[real] - plain[real]).abs().max() > 1e-4
    torch.testing.assert_close(a[real], b[real], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
def test_reentrant_checkpointing_needs_the_input_made_to_require_grad(name):
    """timm's re-entrant checkpointing recomputes a block in backward only if its input requires
    grad: with the backbone frozen the prompts inside the blocks get no gradient without the
    input hook the prompt methods install, and the gradients of the run without checkpointing with it."""
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        torch.manual_seed(0)
        model = tm.timm_vit().train()
        _apply(name, model, "image")
        plain = [p.grad for p in _grads(model)]
        model.set_grad_checkpointing(True)
        (module,) = _modules(model)
        checkpointed = _grads_of(model)
        assert all(g is not None for g in plain + checkpointed)
        for g, h in zip(checkpointed, plain, strict=True):
            torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)
        ((feeder, kind, hook_id),) = module.input_hooks
        hook = feeder._forward_hooks.pop(hook_id)
        with pytest.warns(UserWarning, match="requires_grad"):
            grads = _grads_of(model)
        assert all(g is None for g in grads)  # the claim: silently no gradient without the hook
        feeder._forward_hooks[hook_id] = hook
    finally:
        set_reentrant_ckpt(before)


def _grads(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for m in _modules(model) for p in m.parameters()]
    for p in params:
        p.grad = None
    model(tm.images()).square().mean().backward()
    return params


def _grads_of(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in _grads(model)]


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
def test_cached_decoding_equals_teacher_forcing_on_blips_decoder(name):
    """BLIP's causal text decoder with a key/value cache (generation): the prompts are added in every
    step and never cached, so step-by-step decoding gives the teacher-forced logits."""
    torch.manual_seed(0)
    model = tm.hf_blip_captioning().double().eval()
    image = tm.images().double()
    ids = torch.randint(1, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 98

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            emb = model.vision_model(pixel_values=image).last_hidden_state
            full = model.text_decoder(input_ids=ids, encoder_hidden_states=emb).logits
            past, steps = None, []
            for t in range(ids.shape[1]):
                out = model.text_decoder(
                    input_ids=ids[:, t : t + 1], past_key_values=past, encoder_hidden_states=emb, use_cache=True
                )
                past = out.past_key_values
                steps.append(out.logits[:, -1])
        return full, torch.stack(steps, dim=1)

    plain, _ = run()
    _apply(name, model, "text")
    full, stepped = run()
    assert (full - plain).abs().max() > 1e-4  # the prompts act on the decoder ...
    torch.testing.assert_close(stepped, full, atol=1e-10, rtol=1e-10)  # ... and the cache leaves them out


@pytest.mark.parametrize("name", sorted(PROMPT_METHODS))
@pytest.mark.parametrize("tuner", ["lora", "dora"])
def test_a_peft_tuner_is_refused_both_ways_rather_than_frozen(name, tuner):
    """The prompts freeze the backbone (a tuner's adapters in it), a tuner freezes all but its own:
    refused both ways, naming both, with every requires_grad flag unchanged."""
    model = tm.timm_vit()
    get_method(tuner).apply(model, r=2)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"cannot apply {name} while {tuner} is applied.*freezes"):
        _apply(name, model, "image")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    get_method(tuner).remove(model)
    _apply(name, model, "image")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"cannot apply {tuner} while {name} is applied"):
        get_method(tuner).apply(model, r=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
