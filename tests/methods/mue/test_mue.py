"""MuE against its definition, worked out here on float64 tiny models: after block ``l`` a sample
leaves when ``cos(flatten(h_l), flatten(h_{l-1})) > threshold`` (its own tokens, strict), the
remaining blocks pass its tokens unchanged and the final norm and head read the exited state.
Checked against the unpatched blocks run one by one; a batch equals each sample alone; the blocks
really run only on the samples still in (rows counted); FLOPs equal the analytic count of the blocks
each sample ran; threshold 1.0 is the library bit-exactly."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch

import vleff
from vleff.flops import count_flops
from vleff.methods.mue import mue_exit_blocks

DEPTH = 6


def _vit(depth: int = DEPTH, seed: int = 0, spread: float = 0.3) -> torch.nn.Module:
    """A float64 tiny timm ViT whose blocks change their input enough for the samples' cosines to
    differ (random-init blocks barely move the residual stream)."""
    torch.manual_seed(seed)
    model = tm.timm_vit(depth=depth).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.blocks.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * spread / p.shape[1] ** 0.5)
    return model


def _images(batch: int = 6, seed: int = 1) -> torch.Tensor:
    return tm.images(batch, seed=seed).double()


def _stream(model, images) -> list[torch.Tensor]:
    """``[h_{-1}, h_0, ..., h_{L-1}]``: the embeddings, then every unpatched block's output."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    hs = [x]
    for block in model.blocks:
        hs.append(block(hs[-1]))
    return hs


def _cosines(hs) -> torch.Tensor:
    """``[B, L]``: per sample, cos(flatten(h_l), flatten(h_{l-1})) of every block, by definition."""
    out = []
    for before, after in zip(hs[:-1], hs[1:]):
        a, b = after.flatten(1), before.flatten(1)
        out.append((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))
    return torch.stack(out, dim=1)


def _blocks_run(cos: torch.Tensor, threshold: float) -> list[int]:
    """Per sample: the first block ``l < L-1`` whose cosine clears the threshold (strictly), as the
    number of blocks it ran (``L``: none did)."""
    depth = cos.shape[1]
    return [next((i + 1 for i in range(depth - 1) if row[i] > threshold), depth) for row in cos]


def _plain_exit(model, images, threshold: float) -> tuple[torch.Tensor, list[int]]:
    """The exit rule worked out on the unpatched model, then the final norm and head on the output
    of the block each sample left after."""
    hs = _stream(model, images)
    blocks = _blocks_run(_cosines(hs), threshold)
    outs = [model.forward_head(model.norm(hs[ran][s : s + 1])) for s, ran in enumerate(blocks)]
    return torch.cat(outs), blocks


def _varied_threshold(model, images) -> float:
    """A threshold at which the samples leave at different blocks (at least three exit depths)."""
    with torch.no_grad():
        cos = _cosines(_stream(model, images))
    for t in sorted(cos[:, :-1].flatten().tolist()):
        if len(set(_blocks_run(cos, t - 1e-6))) >= 3:
            return t - 1e-6
    raise AssertionError(f"no threshold gives three exit depths; cosines {cos}")


def test_exits_follow_the_rule_worked_out_on_the_unpatched_blocks():
    model = _vit()
    images = _images()
    with torch.no_grad():
        threshold = _varied_threshold(model, images)
        expected, blocks = _plain_exit(model, images, threshold)
        vleff.apply_mue(model, image_threshold=threshold)
        out = model(images)
    assert len(set(blocks)) >= 3, blocks  # the samples really leave at different blocks
    assert mue_exit_blocks(model)["image"].tolist() == blocks
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_threshold_one_is_the_library_bit_exactly_even_where_a_block_changes_nothing():
    model = _vit()
    with torch.no_grad():  # block 1 does nothing: its cosine is 1 up to rounding (possibly above)
        model.blocks[1].attn.proj.weight.zero_()
        model.blocks[1].attn.proj.bias.zero_()
        model.blocks[1].mlp.fc2.weight.zero_()
        model.blocks[1].mlp.fc2.bias.zero_()
    images = _images()
    library = copy.deepcopy(model)
    vleff.apply_mue(model, image_threshold=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(images), library(images), rtol=0, atol=0)
        assert mue_exit_blocks(model)["image"].tolist() == [DEPTH] * 6
        assert bool((_cosines(_stream(library, images))[:, 0] < 0.999).all())  # block 0 does change its input
        vleff.update(model, "mue", image_threshold=0.999999)  # just below 1: every sample leaves there
        model(images)
        assert mue_exit_blocks(model)["image"].tolist() == [2] * 6


def test_lowest_threshold_exits_every_sample_after_its_first_block():
    model = _vit()
    images = _images()
    with torch.no_grad():
        hs = _stream(model, images)
        expected = model.forward_head(model.norm(hs[1]))
        vleff.apply_mue(model, image_threshold=-1.0)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-10)
        assert mue_exit_blocks(model)["image"].tolist() == [1] * 6
        # 0: where every first block keeps its input's direction (checked), the same
        assert bool((_cosines(hs)[:, 0] > 0).all())
        vleff.update(model, "mue", image_threshold=0.0)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-10)


def test_a_batch_equals_each_sample_alone():
    model = _vit()
    images = _images()
    with torch.no_grad():
        threshold = _varied_threshold(model, images)
        vleff.apply_mue(model, image_threshold=threshold)
        batch = model(images)
        alone = torch.cat([model(images[i : i + 1]) for i in range(images.shape[0])])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-10)


def test_blocks_run_only_on_the_samples_still_in():
    model = _vit()
    images = _images()
    rows: list[int] = []
    for block in model.blocks:  # what enters each block's computation (its first norm)
        block.norm1.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    with torch.no_grad():
        threshold = _varied_threshold(model, images)
        _, blocks = _plain_exit(model, images, threshold)
        rows.clear()
        vleff.apply_mue(model, image_threshold=threshold)
        model(images)
    expected = [sum(1 for b in blocks if b > i) for i in range(DEPTH)]
    assert rows == [n for n in expected if n > 0]
    assert expected[-1] < images.shape[0]  # some samples skipped the last block


def _analytic_flops(blocks: list[int], n: int = 17, c: int = 64, classes: int = 10) -> int:
    """torch's convention (a multiply-add is 2): the patch embedding, each block a sample ran
    (qkv, q·kᵀ and p·v, projection, MLP 4x), the head."""
    patches, patch_in = n - 1, 3 * tm.PATCH * tm.PATCH
    embed = 2 * patches * patch_in * c
    block = 2 * n * c * 3 * c + 4 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * 4 * c
    head = 2 * c * classes
    return sum(embed + ran * block + head for ran in blocks)


def test_flops_count_only_the_blocks_each_sample_ran():
    model = _vit()
    images = _images()
    assert count_flops(model, images) == _analytic_flops([DEPTH] * 6)  # the formula, on the library
    with torch.no_grad():
        threshold = _varied_threshold(model, images)
        _, blocks = _plain_exit(model, images, threshold)
    vleff.apply_mue(model, image_threshold=threshold)
    assert count_flops(model, images) == _analytic_flops(blocks)


def test_training_forwards_never_exit():
    model = _vit()
    images = _images()
    library = copy.deepcopy(model).train()
    vleff.apply_mue(model.train(), image_threshold=-1.0)
    torch.testing.assert_close(model(images), library(images), rtol=0, atol=0)
    assert mue_exit_blocks(model)["image"].tolist() == [DEPTH] * 6


def _blip_first_block_cosines(model, ids, mask, image) -> torch.Tensor:
    seen = {}

    def grab(module, args, kwargs, output):
        out = output if isinstance(output, torch.Tensor) else output[0]
        seen["in"], seen["out"] = (args[0] if args else kwargs["hidden_states"]), out

    handle = model.text_encoder.encoder.layer[0].register_forward_hook(grab, with_kwargs=True)
    model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image)
    handle.remove()
    a, b = seen["out"].flatten(1), seen["in"].flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_blip_text_encoder_with_padding_and_cross_attention_equals_each_sample_alone():
    """Part of the batch runs a block: its padding mask and the image embeddings it cross-attends to
    follow the samples still in."""
    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().double().eval()
    ids, mask = tm.blip_token_ids(batch=4)
    with torch.no_grad():
        image = model.vision_model(pixel_values=tm.images(4).double()).last_hidden_state
        cos = _blip_first_block_cosines(model, ids, mask, image)
        threshold = float(cos.sort().values[1:3].mean())  # two samples leave after the first block
        vleff.apply_mue(model, towers="text", text_threshold=threshold)

        def text(i, j):
            return model.text_encoder(
                input_ids=ids[i:j], attention_mask=mask[i:j], encoder_hidden_states=image[i:j]
            ).last_hidden_state

        batch = text(0, 4)
        ran = mue_exit_blocks(model)["text"]
        alone = torch.cat([text(i, i + 1) for i in range(4)])
    assert sorted(ran.tolist())[:2] == [1, 1] and ran.max() > 1, ran
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-10)


def test_a_causal_decoder_takes_the_decoder_threshold():
    """BLIP captioning's text decoder is no longer refused: it gets decoder_threshold (exits per
    generated token, tests/methods/mue/test_mue_decoder.py), and text_threshold leaves it alone."""
    model = tm.hf_blip_captioning().eval()
    plain = copy.deepcopy(model)
    pixels = tm.images(2)
    vleff.apply_mue(model, towers="all", text_threshold=-1.0)
    assert vleff.registry.applied_methods(model)
    with torch.no_grad():
        got = model.generate(pixel_values=pixels, max_new_tokens=5)
        assert mue_exit_blocks(model)["text"].tolist() == [2, 2]
        assert torch.equal(got, plain.generate(pixel_values=pixels, max_new_tokens=5))


def test_token_reduction_on_the_same_tower_is_refused():
    model = tm.timm_vit()
    vleff.apply_tome(model, r=2)
    with pytest.raises(ValueError, match="cannot apply mue while tome is applied.*one token count"):
        vleff.apply_mue(model, image_threshold=0.9)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"image_threshold": -1.5}, "image_threshold=-1.5"),
        ({"image_threshold": 1.01}, "image_threshold=1.01"),
        ({"text_threshold": float("nan")}, "text_threshold=nan"),
        ({"image_threshold": "0.9"}, "image_threshold='0.9'"),
        ({"image_threshold": True}, "image_threshold=True"),
        ({"towers": "audio"}, "towers='audio'"),
    ],
)
def test_bad_settings_name_the_setting_and_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        vleff.apply_mue(tm.timm_vit(), **bad)
    with pytest.raises(ValueError, match=match):
        vleff.callbacks.MuE(**bad)


def _first_block_cosines(model, tower: str, forward) -> torch.Tensor:
    """Per sample, the cosine of the first block's output with its input (unpatched model)."""
    from vleff.backbones import find_towers

    adapter = next(t for t in find_towers(model) if t.modality == tower)
    seen = {}

    def grab(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        out = output if isinstance(output, torch.Tensor) else output[0]
        if adapter.sequence_first:
            x, out = x.transpose(0, 1), out.transpose(0, 1)
        seen["in"], seen["out"] = x, out

    handle = adapter.blocks()[0].register_forward_hook(grab, with_kwargs=True)
    forward(0, 4)
    handle.remove()
    a, b = seen["out"].flatten(1), seen["in"].flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _family_forward(family: str, tower: str):
    ids = tm.token_ids(4)
    images = tm.images(4).double()
    make = {"open_clip": tm.open_clip_model, "hf_clip": tm.hf_clip_model}[family]
    torch.manual_seed(0)
    model = make().double().eval()
    if family == "open_clip":
        run = {"image": lambda i, j: model.encode_image(images[i:j]), "text": lambda i, j: model.encode_text(ids[i:j])}
    else:
        mask = (ids != 0).long()
        run = {
            "image": lambda i, j: model.get_image_features(pixel_values=images[i:j]).pooler_output,
            "text": lambda i, j: model.get_text_features(input_ids=ids[i:j], attention_mask=mask[i:j]).pooler_output,
        }
    return model, run[tower]


@pytest.mark.parametrize(
    "family, tower", [("open_clip", "image"), ("open_clip", "text"), ("hf_clip", "image"), ("hf_clip", "text")]
)
def test_clip_towers_where_half_the_batch_exits_equal_each_sample_alone(family, tower):
    model, forward = _family_forward(family, tower)
    with torch.no_grad():
        cos = _first_block_cosines(model, tower, forward)
        threshold = float(cos.sort().values[1:3].mean())  # two of the four leave after the first block
        vleff.apply_mue(model, towers=tower, image_threshold=threshold, text_threshold=threshold)
        batch = forward(0, 4)
        ran = mue_exit_blocks(model)[tower]
        alone = torch.cat([forward(i, i + 1) for i in range(4)])
    assert sorted(ran.tolist()) == [1, 1, 2, 2], ran
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-10)
