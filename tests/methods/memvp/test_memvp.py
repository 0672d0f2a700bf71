"""MemVP: the FFN memory against independent references, on both host kinds.

* the memory read against a row-by-row loop (hypothesis), and whole models against the
  unpatched host whose FFNs are swapped for a plain-PyTorch reference of MemVP's formula;
* scale 0 equals the host bit-exactly, ``remove`` restores it bit-exactly;
* generation: BLIP's own ``generate`` (KV cache) against a cache-free greedy loop; the
  VisionLanguageModel's ``generate`` against the library's ``generate`` (prefix mode through
  ``inputs_embeds``; MemVP mode on the patched LM with the memory set), also on a left-padded
  batch (and against each prompt alone);
* bad input: unsupported FFN layout, wrong feature width, ``n_mem`` below the token count.
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from vleff.side.memvp import MemVPConfig, MemVPModule, memvp_applied, memvp_module, set_memvp_memory, update_memvp

import vleff
from vleff.models.vlm import VisionLanguageModel


def _activate(model: nn.Module, seed: int = 0) -> None:
    """``E_v`` starts at 0 and the projector output is ×0.01: give the memory values that reach the output."""
    module = memvp_module(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.value_offset.copy_(torch.randn(module.value_offset.shape, generator=g))
        module.projector[2].weight.mul_(50.0)


def _reference_kv(module: MemVPModule, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V from the module's weights, written out (Linear → SiLU → Linear, ×0.01, zero rows, offsets)."""
    l1, l2 = module.projector[0], module.projector[2]
    z = F.linear(F.silu(F.linear(features, l1.weight, l1.bias)), l2.weight, l2.bias) * module.projector_scale
    pad = torch.zeros(z.shape[0], module.n_mem - z.shape[1], z.shape[2])
    z = torch.cat([z, pad], dim=1)
    return z + module.key_offset, z + module.value_offset


# --- the memory read ------------------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 3),
    reps=st.integers(1, 2),
    n=st.integers(1, 5),
    nv=st.integers(1, 6),
    extra=st.integers(0, 3),
    c=st.sampled_from([4, 8]),
    scale=st.floats(0.0, 2.0),
    seed=st.integers(0, 1000),
)
def test_memory_read_equals_a_row_by_row_sum(b, reps, n, nv, extra, c, scale, seed):
    torch.manual_seed(seed)
    module = MemVPModule(5, c, MemVPConfig(n_mem=nv + extra, scale=scale, projector_hidden=6))
    with torch.no_grad():
        module.value_offset.normal_()
    feats = torch.randn(b, nv, 5)
    u = torch.randn(b * reps, n, c)
    module.set_memory(feats.repeat_interleave(reps, dim=0))  # one row per sequence: the caller expands (issue 24)
    k, v = _reference_kv(module, feats)
    expect = torch.zeros(b * reps, n, c)
    for i in range(b * reps):  # each sample reads its own image's memory (batch expanded per image)
        for j in range(module.n_mem):
            w = F.silu(u[i] @ k[i // reps, j])  # [n]
            expect[i] += scale * w[:, None] * v[i // reps, j][None, :]
    torch.testing.assert_close(module.read(u), expect, atol=1e-5, rtol=1e-5)


# --- BLIP (host kind 1) ---------------------------------------------------------------------------------
class _RefBlipOutput(nn.Module):
    """A BLIP text layer's ``output`` with MemVP's formula written out: ``LN(dense(h) + a + s·silu(a Kᵀ) V)``."""

    def __init__(self, out: nn.Module, kv: list, scale: float) -> None:
        super().__init__()
        self.out, self.kv, self.scale = out, kv, scale

    def forward(self, hidden, input_tensor):
        k, v = self.kv[0]
        mem = self.scale * F.silu(input_tensor @ k.transpose(1, 2)) @ v
        return self.out.LayerNorm(self.out.dropout(self.out.dense(hidden)) + input_tensor + mem)


def _blip_caption_logits(model, x, ids, mask):
    return model(pixel_values=x, input_ids=ids, attention_mask=mask).logits


def _blip_vqa_outputs(model, x, ids, mask):
    """BLIP VQA's two text passes: the question encoder over the image, the answer decoder over the question."""
    image = model.vision_model(pixel_values=x).last_hidden_state
    q = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
    answer = ids[:, :4]
    logits = model.text_decoder(input_ids=answer, encoder_hidden_states=q, reduction="none").logits
    return torch.cat([q.flatten(1), logits.flatten(1)], dim=1)


BLIPS = {"captioning": (tm.hf_blip_captioning, _blip_caption_logits), "vqa": (tm.hf_blip_vqa, _blip_vqa_outputs)}


@pytest.mark.parametrize("kind", sorted(BLIPS))
def test_blip_memvp_equals_reference_noop_and_remove(kind):
    make, fwd = BLIPS[kind]
    torch.manual_seed(0)
    model = make().eval()
    x, (ids, mask) = tm.images(), tm.blip_token_ids()
    with torch.no_grad():
        host = fwd(model, x, ids, mask)
        vleff.apply_memvp(model, n_mem=20, scale=0.0)
        torch.testing.assert_close(fwd(model, x, ids, mask), host, atol=0, rtol=0)  # scale 0: the host exactly
        vleff.apply_memvp(model, n_mem=20, scale=0.5)  # again: replaces
        _activate(model)
        active = fwd(model, x, ids, mask)
        # the reference: the unpatched host with every text layer's output written out by hand
        module = memvp_module(model)
        ref_model = copy.deepcopy(model)
        vleff.remove_memvp(ref_model)
        kv: list = [_reference_kv(module, model.vision_model(pixel_values=x).last_hidden_state[:, 1:])]
        for name, layer in ref_model.named_modules():
            if type(layer).__name__ == "BlipTextLayer":
                layer.output = _RefBlipOutput(layer.output, kv, 0.5)
        torch.testing.assert_close(active, fwd(ref_model, x, ids, mask), atol=1e-5, rtol=1e-4)
        assert (active - host).abs().max() > 1e-2
        vleff.remove_memvp(model)
        assert not memvp_applied(model)
        torch.testing.assert_close(fwd(model, x, ids, mask), host, atol=0, rtol=0)
        assert not any(
            type(h).__module__ == "vleff.side.memvp"
            for m in model.modules()
            for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        )


def test_blip_memvp_under_a_token_method_patch_uses_the_generic_block():
    """With EViT at keep rate 1 on the BLIP text encoder, vleff's generic post-norm block runs the
    layers; the memory hooks sit on modules it calls too, so the output is the same."""
    torch.manual_seed(0)
    model = tm.hf_blip_vqa().eval()
    x, (ids, mask) = tm.images(), tm.blip_token_ids()
    vleff.apply_memvp(model, n_mem=20, scale=0.5)
    _activate(model)
    with torch.no_grad():
        plain = _blip_vqa_outputs(model, x, ids, mask)
        vleff.apply_evit(model.text_encoder, keep_rate=1.0, locations=[0], towers="text")
        torch.testing.assert_close(_blip_vqa_outputs(model, x, ids, mask), plain, atol=1e-5, rtol=1e-5)


def _greedy_without_cache(model, x, steps):
    bos = model.config.text_config.bos_token_id
    ids = torch.full((x.shape[0], 1), bos, dtype=torch.long)
    for _ in range(steps):
        logits = model(pixel_values=x, input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def _blip_captioner_with_memory():
    """A seeded tiny BLIP captioner with an active MemVP memory; ``sep_token_id=None`` so
    generation runs the full requested length (no early stop on a random model)."""
    torch.manual_seed(0)
    model = tm.hf_blip_captioning().eval()
    model.config.text_config.sep_token_id = None
    vleff.apply_memvp(model, n_mem=16, scale=1.0)
    _activate(model)
    return model


def test_blip_generate_with_memory_equals_a_cache_free_greedy_decode():
    model = _blip_captioner_with_memory()
    x = tm.images()
    with torch.no_grad():
        out = model.generate(pixel_values=x, max_new_tokens=6, min_new_tokens=6)
        ref = _greedy_without_cache(model, x, out.shape[1] - 1)
        vleff.remove_memvp(model)
        host = model.generate(pixel_values=x, max_new_tokens=6, min_new_tokens=6)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert not torch.equal(out, host)  # the memory steers the caption


# --- VisionLanguageModel (host kind 2) ------------------------------------------------------------------
LMS = {"llama": tm.hf_llama_lm, "gpt2": tm.hf_gpt2_lm}
TOWERS = {"timm": tm.timm_vit, "open_clip": tm.open_clip_model, "hf_clip": tm.hf_clip_model}
COMBOS = [("llama", "timm"), ("gpt2", "open_clip"), ("llama", "hf_clip")]


class _RefMLP(nn.Module):
    """A decoder layer's MLP with MemVP's formula written out: ``mlp(u) + s·silu(u Kᵀ) V``."""

    def __init__(self, mlp: nn.Module, kv: list, scale: float) -> None:
        super().__init__()
        self.mlp, self.kv, self.scale = mlp, kv, scale

    def forward(self, u):
        k, v = self.kv[0]
        return self.mlp(u) + self.scale * F.silu(u @ k.transpose(1, 2)) @ v


def _layers(lm):
    return lm.model.layers if hasattr(lm, "model") else lm.transformer.h


@pytest.mark.parametrize("lm_name, tower", COMBOS)
def test_vlm_memvp_equals_reference_noop_and_remove(lm_name, tower):
    torch.manual_seed(0)
    lm = LMS[lm_name]().eval()
    x, ids = tm.images(), torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        host = lm(input_ids=ids).logits
        vlm = VisionLanguageModel(TOWERS[tower](), lm, "memvp", memvp={"n_mem": 16, "scale": 0.0}).eval()
        torch.testing.assert_close(vlm(x, ids)["logits"], host, atol=0, rtol=0)
        vleff.apply_memvp(vlm, n_mem=16, scale=0.3)
        _activate(vlm)
        active = vlm(x, ids)["logits"]
        ref = copy.deepcopy(vlm)
        vleff.remove_memvp(ref)
        kv: list = [_reference_kv(memvp_module(vlm), vlm.visual(x))]
        for layer in _layers(ref.lm):
            layer.mlp = _RefMLP(layer.mlp, kv, 0.3)
        torch.testing.assert_close(active, ref.lm(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        assert (active - host).abs().max() > 1e-2
        vleff.remove_memvp(vlm)
        torch.testing.assert_close(vlm(x, ids)["logits"], host, atol=0, rtol=0)
        torch.testing.assert_close(lm(input_ids=ids).logits, host, atol=0, rtol=0)


@pytest.mark.parametrize("lm_name, tower", COMBOS[:2])
def test_vlm_generate_equals_the_library_generate_in_both_modes(lm_name, tower):
    torch.manual_seed(0)
    lm = LMS[lm_name]().eval()
    x, ids = tm.images(), torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        memvp = VisionLanguageModel(TOWERS[tower](), lm, "memvp", memvp={"n_mem": 16, "scale": 1.0}).eval()
        _activate(memvp)
        ours = memvp.generate(x, ids, max_new_tokens=8)
        # the memory is constant per sample: the library's generate on the patched LM, memory set
        memvp.visual(x)  # set here: the memory of memvp.generate ended with that call (issue 24)
        library = lm.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1] :]
        torch.testing.assert_close(ours, library, atol=0, rtol=0)
        vleff.remove_memvp(memvp)
        prefix = VisionLanguageModel(TOWERS[tower](), lm, "prefix").eval()
        nn.init.normal_(prefix.projector[2].weight)
        ours_p = prefix.generate(x, ids, max_new_tokens=8)
        embeds = torch.cat([prefix.projector(prefix.visual(x)), lm.get_input_embeddings()(ids)], dim=1)
        library_p = lm.generate(inputs_embeds=embeds, max_new_tokens=8, do_sample=False)
        torch.testing.assert_close(ours_p, library_p[:, -8:], atol=0, rtol=0)
        # the prefix forward is the LM on [prefix; text] embeddings, read at the text positions
        torch.testing.assert_close(prefix(x, ids)["logits"], lm(inputs_embeds=embeds).logits[:, -5:], atol=0, rtol=0)
    assert not torch.equal(ours, ours_p)


@pytest.mark.parametrize("lm_name, tower", COMBOS[:2])
def test_vlm_generate_left_padded_equals_the_library_and_each_prompt_alone(lm_name, tower):
    """Prompts of 5 and 3 tokens, left-padded: the library's ``generate`` on the same padded batch
    and mask, and (independently) each prompt generated alone without padding. The Llama gets
    a wide init so its greedy tokens depend on what attention sees (at 0.02 an unmasked pad
    leaves them unchanged)."""
    torch.manual_seed(0)
    lm = (tm.hf_llama_lm(initializer_range=0.3) if lm_name == "llama" else LMS[lm_name]()).eval()
    x = tm.images()
    ids = torch.randint(0, 64, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        memvp = VisionLanguageModel(TOWERS[tower](), lm, "memvp", memvp={"n_mem": 16, "scale": 1.0}).eval()
        _activate(memvp)
        ours = memvp.generate(x, ids, max_new_tokens=6, attention_mask=mask)
        memvp.visual(x)  # set here: the memory of memvp.generate ended with that call (issue 24)
        library = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 5:]
        torch.testing.assert_close(ours, library, atol=0, rtol=0)
        alone = memvp.generate(x[1:], ids[1:, 2:], max_new_tokens=6)
        torch.testing.assert_close(ours[1:], alone, atol=0, rtol=0)
        vleff.remove_memvp(memvp)
        prefix = VisionLanguageModel(TOWERS[tower](), lm, "prefix").eval()
        nn.init.normal_(prefix.projector[2].weight)
        ours_p = prefix.generate(x, ids, max_new_tokens=6, attention_mask=mask)
        feats = prefix.projector(prefix.visual(x))
        embeds = torch.cat([feats, lm.get_input_embeddings()(ids)], dim=1)
        full = torch.cat([torch.ones(2, feats.shape[1], dtype=mask.dtype), mask], dim=1)
        library_p = lm.generate(inputs_embeds=embeds, attention_mask=full, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(ours_p, library_p[:, -6:], atol=0, rtol=0)
        torch.testing.assert_close(ours_p[1:], prefix.generate(x[1:], ids[1:, 2:], max_new_tokens=6), atol=0, rtol=0)
        for bad, match in ((mask[:, :4], "input_ids' shape"), (mask * 2, "only 0"), (mask.flip(1), "left padding")):
            with pytest.raises(ValueError, match=match):
                prefix.generate(x, ids, attention_mask=bad)


def test_vlm_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    vlm = VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "memvp", memvp={"n_mem": 16}).eval()
    x, ids = tm.images(), torch.randint(0, 64, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    out = vlm(x, ids, labels=labels)
    logits = out["logits"]
    expect = torch.stack([F.cross_entropy(logits[i, t - 1], ids[i, t]) for i in range(2) for t in range(3, 6)]).mean()
    torch.testing.assert_close(out["loss"], expect, atol=1e-5, rtol=1e-5)


def test_update_changes_scale_and_validates():
    torch.manual_seed(0)
    vlm = VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "memvp", memvp={"n_mem": 16, "scale": 0.5}).eval()
    _activate(vlm)
    x, ids = tm.images(), torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        active = vlm(x, ids)["logits"]
        plain = copy.deepcopy(vlm)
        vleff.remove_memvp(plain)
        host = plain.lm(input_ids=ids).logits
        assert not torch.equal(active, host)
        vleff.update(vlm, "memvp", scale=0.0)  # the parameters stay, the read is weighted 0: the host
        torch.testing.assert_close(vlm(x, ids)["logits"], host, atol=0, rtol=0)
    with pytest.raises(ValueError, match="scale=-1"):
        update_memvp(vlm, scale=-1)
    with pytest.raises(ValueError, match="n_mem"):
        update_memvp(vlm, n_mem=3)


def test_trainable_parameters_are_the_analytic_count():
    from vleff.side.memvp import memvp_num_parameters

    vlm = VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "memvp", memvp={"n_mem": 16, "projector_hidden": 32})
    names = vlm.freeze_host()
    assert all(n.startswith("vleff_memvp.") for n in names)
    assert sum(p.numel() for p in vlm.parameters() if p.requires_grad) == memvp_num_parameters(64, 32, 64, 16)


# --- bad input --------------------------------------------------------------------------------------------
def test_unsupported_ffn_layout_names_the_module_type():
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=2,
        )
    )
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*model.layers.0.mlp"):
        vleff.apply_memvp(moe, visual_dim=8)
    lm = tm.hf_llama_lm()
    lm.model.layers[1].mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(TypeError, match=r"Sequential \(model.layers.1.mlp\)"):
        VisionLanguageModel(tm.timm_vit(), lm, "memvp")
    assert not memvp_applied(lm)
    with pytest.raises(TypeError, match="does not support VisionTransformer"):
        vleff.apply_memvp(tm.timm_vit())


def test_wrong_feature_width_and_small_n_mem_are_refused():
    lm = tm.hf_llama_lm()
    vleff.apply_memvp(lm, visual_dim=12, n_mem=4)
    with pytest.raises(ValueError, match=r"visual_dim=12"):
        set_memvp_memory(lm, torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match=r"n_mem=4 is smaller than the number of visual tokens \(5\)"):
        set_memvp_memory(lm, torch.randn(2, 5, 12))
    blip = tm.hf_blip_captioning()
    with pytest.raises(ValueError, match=r"n_mem=8 is not allowed.*16"):
        vleff.apply_memvp(blip, n_mem=8)
    with pytest.raises(ValueError, match=r"visual_dim=32 is not allowed.*width 64"):
        vleff.apply_memvp(blip, visual_dim=32, n_mem=16)
    assert not memvp_applied(blip)
    vlm = VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "memvp", memvp={"n_mem": 8})
    with pytest.raises(ValueError, match=r"n_mem=8 is smaller than the number of visual tokens \(16\)"):
        vlm(tm.images(), torch.randint(0, 64, (2, 4)))
    prefix = VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "prefix")
    with pytest.raises(ValueError, match="visual_prompt='memvp'"):
        vleff.apply_memvp(prefix)
    with pytest.raises(ValueError, match="memvp=.* is not allowed with visual_prompt='prefix'"):
        VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "prefix", memvp={"n_mem": 16})
    with pytest.raises(ValueError, match="visual_prompt='tokens'"):
        VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "tokens")


def test_memory_must_be_set_before_the_ffn_runs():
    lm = tm.hf_llama_lm()
    vleff.apply_memvp(lm, visual_dim=12, n_mem=4)
    with pytest.raises(RuntimeError, match="without visual memory"):
        lm(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_blip_beam_search_reads_each_images_memory():
    """Beam search expands the batch image by image (``repeat_interleave``): the batched result
    equals each image generated alone, so every beam read its own image's memory."""
    model = _blip_captioner_with_memory()
    x = tm.images()
    with torch.no_grad():
        both = model.generate(pixel_values=x, num_beams=2, max_new_tokens=5, min_new_tokens=5)
        alone = [
            model.generate(pixel_values=x[i : i + 1], num_beams=2, max_new_tokens=5, min_new_tokens=5) for i in range(2)
        ]
    torch.testing.assert_close(both, torch.cat(alone), atol=0, rtol=0)
    assert not torch.equal(alone[0], alone[1])


def test_vision_adapters_start_at_zero_and_add_a_parallel_bottleneck():
    from vleff.side.memvp import memvp_num_parameters

    torch.manual_seed(0)
    vit = tm.timm_vit()
    vlm = VisionLanguageModel(vit, tm.hf_llama_lm(), "memvp", memvp={"n_mem": 16}).eval()
    x = tm.images()
    with torch.no_grad():
        plain = vlm.visual(x)
        vleff.apply_memvp(vlm, n_mem=16, vision_adapter_dim=4)
        torch.testing.assert_close(vlm.visual(x), plain, atol=0, rtol=0)  # zero-initialised up projections
        adapters = memvp_module(vlm).adapters
        for a in adapters:
            nn.init.normal_(a.up.weight, std=0.1)
        feats = vlm.visual(x)
        # reference: timm's blocks written out, the adapter beside each MLP on the normed input
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for block, adapter in zip(vit.blocks, adapters):
            h = h + block.ls1(block.attn(block.norm1(h)))
            u = block.norm2(h)
            # the reference's s = 0.1 on the adapter output (forward_clip)
            h = h + block.ls2(block.mlp.forward(u) + 0.1 * adapter.up(F.gelu(adapter.down(u))))  # forward: no hooks
        torch.testing.assert_close(feats, h[:, 1:], atol=1e-5, rtol=1e-5)
        assert (feats - plain).abs().max() > 1e-3
    assert sum(p.numel() for p in memvp_module(vlm).parameters()) == memvp_num_parameters(64, 128, 64, 16, 3, 4)
    vleff.remove_memvp(vlm)
    with torch.no_grad():
        torch.testing.assert_close(vlm.visual(x), plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="vision_adapter_dim=4 is not allowed"):
        vleff.apply_memvp(tm.hf_llama_lm(), visual_dim=8, vision_adapter_dim=4)
