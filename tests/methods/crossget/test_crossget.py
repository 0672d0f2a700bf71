"""CrossGET: the complete-graph matching and weighted merge against loop references, text towers
(EOT found, padding), inference independence, layer mapping, errors, callback and mixin. The whole
forward and the loss against the official code's behaviour: tests/reference/test_crossget_reference.py."""

from __future__ import annotations

import copy
import math

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from vleff.tokens.crossget import (
    OFFSETS,
    alignment_loss,
    crossget_offsets,
    js_divergence,
    layer_pairs,
)

import vleff
from vleff.backbones import last_token_state, token_counts
from vleff.backbones.text import POSITION, PROTECTED, SOURCE
from vleff.kernels.graph_merge import (
    GROUP_PENALTY,
    complete_graph_matching,
    ensemble_weights,
    feasible_sources,
)
from vleff.tokens.aux import pop_aux_losses


# --- loop references ----------------------------------------------------------------------------------
def ref_plan(metric, importance, r, num_protected, protected=None, groups=None):
    """Per sample, with Python loops: (sources in order, {source: destination}). Sources: lowest
    importance − best similarity towards a token ranked after (by best similarity), padding last."""
    out = []
    b, n, _ = metric.shape
    for s in range(b):
        m = F.normalize(metric[s].double(), dim=-1)
        prot = [i < num_protected or (protected is not None and bool(protected[s, i])) for i in range(n)]
        grp = [0 if groups is None else int(groups[s, i]) for i in range(n)]

        def allowed(i, j, prot=prot, grp=grp):
            return i != j and not prot[i] and not prot[j] and grp[i] == grp[j]

        full = m @ m.T
        sim = ((full + full.T) / 2).tolist()  # exactly symmetric: a mutual best pair ties
        best = [max([sim[i][j] for j in range(n) if allowed(i, j)], default=-math.inf) for i in range(n)]
        ranked = sorted(range(n), key=lambda i: (-best[i], i))  # the reference's rank, ties: lower index first
        rank = {tok: pos for pos, tok in enumerate(ranked)}
        score = []
        for i in range(n):
            later = max([sim[i][j] for j in range(n) if allowed(i, j) and rank[j] > rank[i]], default=-math.inf)
            score.append(math.inf if prot[i] else float(importance[s, i]) - later)
        score = [v + GROUP_PENALTY if grp[i] != 0 else v for i, v in enumerate(score)]
        sources = sorted(range(n), key=lambda i: (score[i], i))[:r]
        dst = {}
        for i in sources:
            cands = [j for j in range(n) if j not in sources and allowed(i, j)]
            dst[i] = max(cands, key=lambda j: (sim[i][j], -j))
        out.append((sources, dst))
    return out


def ref_merge(x, size, weight, plans):
    """Each kept token (input order) averages its group weighted by size·weight; sizes add."""
    xs, ss = [], []
    for s, (sources, dst) in enumerate(plans):
        rows, sizes = [], []
        for k in range(x.shape[1]):
            if k in sources:
                continue
            group = [k] + [i for i in sources if dst[i] == k]
            w = torch.stack([size[s, i, 0] * weight[s, i, 0] for i in group]).double()
            rows.append(x[s, group].double().mul(w[:, None]).sum(0) / w.sum() if len(group) > 1 else x[s, k].double())
            sizes.append(size[s, group, 0].sum())
        xs.append(torch.stack(rows))
        ss.append(torch.stack(sizes))
    return torch.stack(xs).float(), torch.stack(ss)[..., None]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(6, 14), r=st.integers(0, 12), prefix=st.integers(0, 2), padded=st.booleans(), seed=st.integers(0, 99)
)
def test_complete_graph_matching_and_ensemble_merge_match_loop_references(n, r, prefix, padded, seed):
    g = torch.Generator().manual_seed(seed)
    b = 2
    metric = torch.randn(b, n, 5, generator=g)
    importance = torch.rand(b, n, generator=g) * 2 - 1
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, n // 2] = True  # an EOT-like token in the middle
    groups = (torch.arange(n) > n - 4).long().expand(b, n) if padded else None
    every = protected.clone()
    every[:, :prefix] = True
    r = min(r, int(feasible_sources(every, groups).min()))  # up to the last possible source of a group
    plan = complete_graph_matching(metric, importance, r, prefix, protected, groups)
    ref = ref_plan(metric, importance, r, prefix, protected, groups)
    for s, (sources, dst) in enumerate(ref):
        assert sorted(plan.src_idx[s].tolist()) == sorted(sources)
        got = dict(zip(plan.src_idx[s].tolist(), plan.dst_idx[s].tolist()))
        assert got == dst
        assert not set(got.values()) & set(got)  # no chains
    x = torch.randn(b, n, 3, generator=g)
    size = torch.rand(b, n, 1, generator=g) + 0.5
    w = ensemble_weights(importance)
    merged, new_size = plan.merge_weighted(x, size, w)
    ref_x, ref_size = ref_merge(x, size, w, ref)
    torch.testing.assert_close(merged, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_size, ref_size.float(), atol=1e-6, rtol=1e-6)
    # the plan protocol: fields follow (max of a flag, min of positions) as in the loops
    flags = torch.randint(0, 2, (b, n), generator=g)
    got = plan.merge_reduce(flags, "max")
    for s, (sources, dst) in enumerate(ref):
        kept = [k for k in range(n) if k not in sources]
        want = [max([int(flags[s, k])] + [int(flags[s, i]) for i in sources if dst[i] == k]) for k in kept]
        assert got[s].tolist() == want


def test_js_divergence_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    p, q = a.softmax(-1).double(), b.softmax(-1).double()
    m = (p + q) / 2
    want = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(js_divergence(a, b).double(), want, atol=1e-6, rtol=1e-6)
    assert float(js_divergence(a, a).abs().max()) < 1e-6


def test_layer_pairs_map_unequal_depths_by_relative_depth():
    assert layer_pairs(12, 12) == [(i, i) for i in range(12)]
    assert layer_pairs(24, 12) == [(2 * j + 1, j) for j in range(12)]  # ViT-L/14 with a 12-layer text tower
    assert layer_pairs(2, 3) == [(0, 1), (1, 2)]
    assert layer_pairs(3, 2)[-1] == (2, 1)  # last with last


def test_offsets_start_at_zero_and_the_cross_token_starts_as_cls():
    model = tm.open_clip_model()
    vleff.apply_crossget(model, r_image=2, r_text=2)
    offsets = crossget_offsets(model)
    assert set(offsets) == {"image", "text"}
    assert offsets["image"].shape == (2, 64) and float(offsets["image"].detach().abs().sum()) == 0
    assert f"visual.{OFFSETS}" in model.state_dict() and OFFSETS in model.state_dict()


def test_token_counts_follow_the_capped_schedule():
    """ViT-B/16-like counts on a deeper tiny tower: r per block capped at (N - 2) // 2."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=6, width=32, head_width=16, patch_size=4, image_size=32)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()
    vleff.apply_crossget(model, r_image=16, r_text=0)
    with torch.no_grad():
        model.encode_image(tm.images())
    counts, n = [], 64 + 2
    for _ in range(6):
        counts.append(n)
        n -= min(16, (n - 2) // 2)
    assert token_counts(model)["image"] == counts == [66, 50, 34, 18, 10, 6]


# --- text towers --------------------------------------------------------------------------------------
def _hf_text(model, ids):
    return model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output


def test_text_eot_is_found_and_padding_does_not_change_the_embedding():
    torch.manual_seed(0)
    model = tm.hf_clip_model().eval()
    vleff.apply_crossget(model, r_image=0, r_text=2)
    ids = tm.token_ids(batch=1, length=16)[:, :8]  # SOT-less words, EOT at 4, padding after it
    long = torch.cat([ids, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short_out, long_out = _hf_text(model, ids), _hf_text(model, long)
        state = last_token_state(model, "text")
        plain = copy.deepcopy(model)
        vleff.remove_crossget(plain)
        lib = _hf_text(plain, long)
    assert token_counts(model)["text"][1] < token_counts(model)["text"][0]  # real merges happened
    torch.testing.assert_close(short_out, long_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(long_out, lib, atol=1e-4)
    # the EOT and SOT were never merged: each token flagged protected holds only its own position
    source, prot = state.get(SOURCE)[0], state.get(PROTECTED)[0].bool()
    assert source[prot].sum(dim=-1).tolist() == [1.0]
    held = source[prot].argmax(-1).tolist()
    assert held == [4]  # the EOT (largest id) position
    assert state.get(POSITION)[0].tolist()[0] == 0  # SOT (position 0) stays first


def test_blip_text_is_reduced_with_its_padding_mask():
    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().eval()
    ids, mask = tm.blip_token_ids(batch=2, length=16)
    vleff.apply_crossget(model, r_image=2, r_text=2)  # within every block's cap, padded or not
    with torch.no_grad():
        out = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        # the same captions without their padding: each sample alone, cut at its last real token
        for i in range(2):
            real = int(mask[i].sum())
            alone = model.text_encoder(input_ids=ids[i : i + 1, :real], attention_mask=mask[i : i + 1, :real])
            torch.testing.assert_close(alone.last_hidden_state[:, 0], out[i : i + 1], atol=1e-5, rtol=1e-5)
    vleff.update(model, "crossget", r_text=2)
    with torch.no_grad():
        model.text_encoder(input_ids=ids, attention_mask=mask)
    assert token_counts(model)["text"] == [17, 15]


# --- towers stay independent at inference; the loss only in training ------------------------------------
@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_image_embeddings_do_not_depend_on_the_text(family):
    torch.manual_seed(0)
    model = tm.open_clip_model() if family == "open_clip" else tm.hf_clip_model()
    vleff.apply_crossget(model, r_image=2, r_text=2)
    pair = vleff.backbones.find_pair(model)
    images, ids = tm.images(), tm.token_ids()
    for mode in ("eval", "train"):
        getattr(model, mode)()
        alone = pair.encode_image(images).detach()
        pair.encode_text(ids)
        with_text = pair.encode_image(images).detach()
        pair.encode_text(tm.token_ids(seed=5))
        torch.testing.assert_close(alone, with_text, atol=0, rtol=0)
        losses = pop_aux_losses(model)
        assert ("crossget_js" in losses) == (mode == "train")


def test_unequal_depths_use_the_documented_mapping():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=4, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).train()
    vleff.apply_crossget(model, r_image=2, r_text=2)
    model.encode_image(tm.images())
    model.encode_text(tm.token_ids())
    loss = pop_aux_losses(model)["crossget_js"]
    assert torch.isfinite(loss) and layer_pairs(4, 2) == [(1, 0), (3, 1)]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    torch.testing.assert_close(alignment_loss(a, b), js_divergence(a[:, [1, 3]], b).mean())


# --- errors -------------------------------------------------------------------------------------------
def test_single_tower_models_are_refused():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    for model in (
        tm.timm_vit(),
        CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        ),
    ):
        with pytest.raises(TypeError, match="needs both towers"):
            vleff.apply_crossget(model)
    with pytest.raises(TypeError, match="BlipForImageTextRetrieval"):
        vleff.apply_crossget(tm.hf_blip_captioning())


def test_r_larger_than_a_tower_can_merge_is_refused():
    model = tm.open_clip_model()  # 16 patches + cls + cross = 18 tokens: at most 8 per block
    with pytest.raises(ValueError, match=r"r_image=9 is larger than the image tower can merge.*at most 8"):
        vleff.apply_crossget(model, r_image=9, r_text=0)
    with pytest.raises(ValueError, match=r"r_text=8 is larger than the text tower.*at most 7"):
        vleff.apply_crossget(model, r_image=0, r_text=8)  # 16 + cross, SOT/EOT/cross protected
    assert not vleff.get_method("crossget").is_applied(model)
    vleff.apply_crossget(model, r_image=8, r_text=7)
    with pytest.raises(ValueError, match="r_image=20"):
        vleff.update(model, "crossget", r_image=20)


def test_stacking_on_a_tower_and_mismatched_training_batches_are_refused():
    model = tm.open_clip_model()
    vleff.apply_tome(model, r=2, towers="text")
    with pytest.raises(ValueError, match="cannot apply crossget while tome"):
        vleff.apply_crossget(model)
    vleff.remove_tome(model)
    vleff.apply_crossget(model, r_image=2, r_text=2).train()
    model.encode_image(tm.images(batch=3))
    with pytest.raises(ValueError, match="pairs image i with text i"):
        model.encode_text(tm.token_ids(batch=2))


# --- Lightning: callback with the CLIP fine-tuner, mixin -------------------------------------------------
def test_callback_adds_the_js_loss_to_a_clip_finetuner_fit(tmp_path):
    import lightning.pytorch as pl

    from vleff.callbacks import CrossGET
    from vleff.models.clip_finetuner import CLIPFineTuner

    torch.manual_seed(0)
    module = CLIPFineTuner(tm.open_clip_model(), lr=1e-3, context_length=16)
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("loss", []).append(float(outputs["loss"]))
            seen.setdefault("js", []).append(float(trainer.callback_metrics["train/aux/crossget_js"]))
            seen.setdefault("task", []).append(float(trainer.callback_metrics["train/loss"]))

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([tm.token_ids(seed=i) for i in range(4)])
    data = torch.utils.data.DataLoader([{"images": images[i], "tokens": ids[i]} for i in range(8)], batch_size=4)
    trainer = tl.trainer(tmp_path, [CrossGET(r_image=2, r_text=2), Spy()], max_steps=2)
    trainer.fit(module, data)
    for loss, js, task in zip(seen["loss"], seen["js"], seen["task"]):
        assert js > 0 and loss == pytest.approx(task + js, rel=1e-5)
    offsets = crossget_offsets(module)
    assert all(float(p.detach().abs().sum()) > 0 for p in offsets.values())  # trained


def test_mixin_one_call_gives_the_same_loss_as_the_functional_path():
    import lightning.pytorch as pl

    from vleff.callbacks import CrossGETMixin

    class Module(CrossGETMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.clip = tm.open_clip_model()
            self.use_crossget(r_image=2, r_text=2)

    module = Module().train()
    module.clip.encode_image(tm.images())
    module.clip.encode_text(tm.token_ids())
    aux = module.vleff_aux_loss()
    torch.manual_seed(0)
    twin = tm.open_clip_model()
    vleff.apply_crossget(twin, r_image=2, r_text=2)
    twin.train()
    twin.encode_image(tm.images())
    twin.encode_text(tm.token_ids())
    torch.testing.assert_close(aux, pop_aux_losses(twin)["crossget_js"])
    assert float(module.vleff_aux_loss()) == 0.0  # popped: counted once


def test_trace_source_gives_the_merge_groups_of_every_patch():
    from vleff.tokens.visualize import merge_groups

    torch.manual_seed(0)
    model = tm.open_clip_model().eval()
    vleff.apply_crossget(model, r_image=3, r_text=0, trace_source=True)
    labels, groups = merge_groups(model, tm.images(batch=1)[0], forward=model.encode_image)
    assert labels.shape == (4, 4) and groups == 18 - 2 - 3 - 3  # patches left after two blocks of r=3
    source = last_token_state(model).get("source")[0]
    assert source.shape == (11, 17) and source.sum().item() == 17  # every input token held exactly once
    assert source[0].tolist() == [1.0] + [0.0] * 16  # cls alone


def test_graph_matching_refuses_group_ids_outside_real_and_padding():
    """The group loops run over range(2) (static under torch.compile): any other id is refused,
    not silently left without an anchor."""
    protected = torch.zeros(1, 6, dtype=torch.bool)
    bad = torch.tensor([[0, 0, 0, 2, 2, 1]])
    with pytest.raises(RuntimeError, match=r"groups must take values in range\(2\)"):
        feasible_sources(protected, bad)
    with pytest.raises(RuntimeError, match=r"groups must take values in range\(2\)"):
        complete_graph_matching(torch.randn(1, 6, 4), torch.randn(1, 6), 1, 0, protected, bad)
    assert int(feasible_sources(protected, torch.tensor([[0, 0, 0, 1, 1, 1]]))) == 4  # (3 - 1) + (3 - 1)


# --- gradient checkpointing ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["open_clip", "open_clip_unequal", "hf_clip"])
def test_checkpointed_training_step_with_the_alignment_loss_equals_the_plain_one(family):
    """Both towers and the JS alignment loss (whose cross tokens are made inside the checkpointed
    blocks): the library's non-re-entrant checkpointing gives the gradients of the plain model,
    the offsets' included."""
    from families import FAMILIES

    torch.manual_seed(0)
    model = FAMILIES[family].make()
    vleff.apply_crossget(model, r_image=2, r_text=4)
    with torch.no_grad():  # trained offsets: the cross tokens differ from their start values
        for p in vleff.tokens.crossget.crossget_offsets(model).values():
            p.normal_(0, 0.1)
    plain = copy.deepcopy(model)
    if family.startswith("hf_"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.set_grad_checkpointing(True)
    fwd = FAMILIES[family].forwards
    grads = []
    for m in (plain, model):
        m.train()
        loss = fwd["image"](m).square().mean() + fwd["text"](m).square().mean()
        aux = pop_aux_losses(m)["crossget_js"]
        assert aux.requires_grad
        (loss + aux).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert any("vleff_crossget_offsets" in n for n in grads[0])
    assert set(grads[0]) == set(grads[1])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_reentrant_checkpointing_is_refused_naming_it():
    """Re-entrant checkpointing runs the blocks without gradients: the cross tokens the
    alignment loss reads would get none, so the forward is refused."""
    torch.manual_seed(0)
    model = tm.hf_clip_model()
    vleff.apply_crossget(model, r_image=2, r_text=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(RuntimeError, match="re-entrant checkpointing"):
        model.get_image_features(pixel_values=tm.images().requires_grad_())


def test_per_block_r_lists_merge_where_they_say():
    """``r_image``/``r_text`` as lists (what fit_budget sets): a constant list is the int exactly;
    a block with 0 merges nothing; too long or negative entries are refused naming the setting."""
    torch.manual_seed(0)
    model = tm.open_clip_model(vision_layers=3, text_layers=3).eval()
    images, ids = tm.images(), tm.token_ids()
    vleff.apply_crossget(model, r_image=2, r_text=2)
    with torch.no_grad():
        ref = (model.encode_image(images), model.encode_text(ids))
    vleff.registry.update(model, "crossget", r_image=[2, 2, 2], r_text=[2, 2, 2])
    with torch.no_grad():
        same = (model.encode_image(images), model.encode_text(ids))
    torch.testing.assert_close(same, ref, rtol=0, atol=0)
    vleff.registry.update(model, "crossget", r_image=[3, 0], r_text=[0])
    with torch.no_grad():
        model.encode_image(images)
    counts = token_counts(model)["image"]
    assert counts[1] == counts[0] - 3 and counts[2] == counts[1]  # the third block: the list ended
    with pytest.raises(ValueError, match="r_image has 4 entries but the image tower has 3 blocks"):
        vleff.registry.update(model, "crossget", r_image=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"r_text\[1\]=-1 is not allowed"):
        vleff.registry.update(model, "crossget", r_text=[1, -1])
