"""Issue 24 item 13: degenerate batches through every method — a batch of 0 samples, a batch of
one, captions that are all padding: an empty output of the right shape or a clear error, never
an internal crash; a batch of one computes what that sample computes inside a larger batch.

The methods are applied generically as in the conformance suite (its settings table); one
image family and one text family per method keep it fast. Host methods (MemVP) act on whole
vision-language models and are left to their own tests.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from conformance.test_conformance import HOOK_METHODS, SETTINGS, _apply
from families import FAMILIES, IMAGE

from vleff.registry import get_method


def _text(family: str, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if family == "open_clip":
        return model.encode_text(ids)
    return model.get_text_features(input_ids=ids).pooler_output


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for name in HOOK_METHODS:
        allowed = SETTINGS[name].families or tuple(FAMILIES)
        towers = get_method(name).towers
        image = next((f for f in ("timm_vit", "open_clip", "hf_clip") if f in allowed), None)
        if "image" in towers and image:
            cases.append((name, image, "image"))
        text = next((f for f in ("open_clip", "hf_clip") if f in allowed), None)
        if "text" in towers and text:
            cases.append((name, text, "text"))
    return cases


CASES = _cases()


def _models(name: str, family: str, tower: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = FAMILIES[family].make().double().eval()
    model = FAMILIES[family].make().double().eval()
    model.load_state_dict(plain.state_dict())
    settings = SETTINGS[name]
    _apply(name, model, settings.active, tower)
    if settings.activate is not None:
        settings.activate(model)
    return plain, model


def _forward(family: str, tower: str, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return IMAGE[family](model, inputs) if tower == "image" else _text(family, model, inputs)


def _inputs(tower: str, batch: int) -> torch.Tensor:
    return tm.images(batch).double() if tower == "image" else tm.token_ids(batch)


@pytest.mark.parametrize("name, family, tower", CASES, ids=[f"{n}-{f}-{t}" for n, f, t in CASES])
def test_empty_batch_gives_an_empty_output_or_a_clear_error(name, family, tower):
    plain, model = _models(name, family, tower)
    empty = _inputs(tower, 2)[:0]
    try:
        expected = _forward(family, tower, plain, empty)
    except RuntimeError as library_error:  # the library itself cannot take it (open_clip's patch embedding)
        with pytest.raises(type(library_error)):
            _forward(family, tower, model, empty)
        return
    try:
        out = _forward(family, tower, model, empty)
    except ValueError as err:  # refused clearly: names the batch, the tower and what is allowed
        assert "batch of 0 samples" in str(err) and "allowed: a batch of at least 1 sample" in str(err)
        return
    assert out.shape == expected.shape and out.dtype == expected.dtype


@pytest.mark.parametrize("name, family, tower", CASES, ids=[f"{n}-{f}-{t}" for n, f, t in CASES])
def test_batch_of_one_is_that_sample_of_a_larger_batch(name, family, tower):
    _, model = _models(name, family, tower)
    batch = _inputs(tower, 3)
    together = _forward(family, tower, model, batch)
    alone = torch.cat([_forward(family, tower, model, batch[i : i + 1]) for i in range(3)])
    assert alone.shape == together.shape and torch.isfinite(alone).all()
    torch.testing.assert_close(alone, together, rtol=1e-9, atol=1e-9)


TEXT_CASES = [c for c in CASES if c[2] == "text"]


@pytest.mark.parametrize("name, family, tower", TEXT_CASES, ids=[f"{n}-{f}" for n, f, _ in TEXT_CASES])
def test_captions_that_are_all_padding(name, family, tower):
    """Every id 0 (the padding id): no end-of-text token to find; the method's output is finite and
    of the library's shape (the library pools position 0, the argmax of an all-zero row)."""
    plain, model = _models(name, family, tower)
    ids = torch.zeros_like(tm.token_ids(2))
    expected = _forward(family, tower, plain, ids)
    out = _forward(family, tower, model, ids)
    assert out.shape == expected.shape and torch.isfinite(out).all()


def _host_forward(
    host: str, model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        if host.startswith("vlm"):
            return model(images, ids)["logits"]
        return model(pixel_values=images, input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("host", ["vlm_llama_timm", "hf_blip_captioning"])
def test_memvp_hosts_take_degenerate_batches_as_the_host_does(host):
    import host_families

    import vleff

    torch.manual_seed(0)
    plain = host_families.HOSTS[host].make().double().eval()
    model = host_families.HOSTS[host].make().double().eval()
    model.load_state_dict(plain.state_dict())
    settings = SETTINGS["memvp"]
    vleff.apply_memvp(model, **settings.active)
    settings.activate(model)
    images = tm.images(3).double()
    ids, mask = tm.blip_token_ids(3)
    if host.startswith("vlm"):
        ids = ids % 64  # the tiny LM's vocabulary
    # a batch of 0: whatever the host does (both hosts' libraries refuse it in their own attention)
    try:
        expected = _host_forward(host, plain, images[:0], ids[:0], mask[:0])
    except RuntimeError as library_error:
        with pytest.raises(type(library_error)):
            _host_forward(host, model, images[:0], ids[:0], mask[:0])
    else:
        assert _host_forward(host, model, images[:0], ids[:0], mask[:0]).shape == expected.shape
    # a batch of one reads its own image's memory: each row alone equals that row of the batch
    together = _host_forward(host, model, images, ids, mask)
    alone = torch.cat(
        [_host_forward(host, model, images[i : i + 1], ids[i : i + 1], mask[i : i + 1]) for i in range(3)]
    )
    torch.testing.assert_close(alone, together, rtol=1e-9, atol=1e-9)
