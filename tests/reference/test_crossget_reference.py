"""CrossGET against the official code's behaviour (sdc17/CrossGET at dc32975: ``CLIP/clip/reducer.py``
``TokenReduction.match`` / ``forward``; ``CLIP/clip/model.py`` ``Transformer.forward``,
``VisionTransformer.forward``, ``CLIP.encode_text``), written out here in plain PyTorch with
per-sample loops on float64 tiny open_clip models, independently of vleff's kernels.

Issue 23, CrossGET points: (1) the cross token entering block i is the previous block's cross
token (image) or the EOT's current state (text), detached, plus the offset; (2) sources by
``importance − best similarity towards a token ranked after``; (3) pairwise softmax ensemble
weights at temperature 1, merged as the reference merges; (4) full-width keys and queries;
(5) the loss reads the cross tokens entering each block (image: ``ln_pre`` and ``proj``) and
trains only the offsets.

The reference below also runs vleff's documented deliberate differences, so the whole forward
can be compared: no token attends to the cross token (``hide_cross``; in the text tower the
reference's causal mask does that already), the text causal mask from merged positions
(``causal="positions"``; the reference: by index), and the true JS divergence. No padding is used
here (vleff merges padding only with padding; the reference pads to 77 and merges it freely).
"""

from __future__ import annotations

import math

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from vleff.tokens.crossget import crossget_offsets, js_divergence

import vleff
from vleff.backbones import token_counts
from vleff.kernels.graph_merge import complete_graph_matching, ensemble_weights
from vleff.tokens.aux import pop_aux_losses

INF = math.inf


# --- the reference's matching and merge, one sample at a time -------------------------------------------
def official_match(keys, query, r, protected):
    """``keys`` [N, C], ``query`` [C], ``protected`` set of indices. Returns (sources in order,
    {source: destination}, importance list). Ties in the best-similarity ranking: lower index first."""
    n = keys.shape[0]
    m = keys / keys.norm(dim=-1, keepdim=True)
    sim = m @ m.T
    sim = ((sim + sim.T) / 2).tolist()  # symmetric: a mutual best pair ties, the lower index ranks first
    for i in range(n):
        sim[i][i] = -INF
        for j in range(n):
            if i in protected or j in protected:
                sim[i][j] = -INF
    best = [max(row) for row in sim]
    ranked = sorted(range(n), key=lambda i: (-best[i], i))
    rank = {tok: pos for pos, tok in enumerate(ranked)}
    later = [max([sim[i][j] for j in range(n) if rank[j] > rank[i]], default=-INF) for i in range(n)]
    imp = (m @ (query / query.norm())).tolist()
    score = [imp[i] - later[i] for i in range(n)]  # no later partner: +inf
    order = sorted(range(n), key=lambda i: (score[i], i))
    src, rest = order[:r], order[r:]
    dst = {i: max(rest, key=lambda j: sim[i][j]) for i in src}
    return src, dst, imp


def official_merge(x, size, src, dst, imp, ensemble="reference"):
    """The reference's ensemble merge on one sample (``x`` [N, C], ``size`` [N]): merge ``x·size``
    with per-pair softmax weights ×2, add ``(w_dst − 1)·dst``, divide by the summed size. Output:
    the kept tokens in index order. ``ensemble="mean"``: the group mean weighted by size·exp(imp)."""
    n = x.shape[0]
    kept = [k for k in range(n) if k not in src]
    if ensemble == "mean":
        rows, sizes = [], []
        for k in kept:
            group = [k] + [i for i in src if dst[i] == k]
            w = torch.tensor([float(size[i]) * math.exp(imp[i]) for i in group], dtype=x.dtype)
            rows.append((x[group] * w[:, None]).sum(0) / w.sum())
            sizes.append(sum(float(size[i]) for i in group))
        return torch.stack(rows), torch.tensor(sizes, dtype=x.dtype)
    xs = x * size[:, None]
    acc = {k: xs[k].clone() for k in kept}
    tot = {k: float(size[k]) for k in kept}
    for i in src:
        d = dst[i]
        e_s, e_d = math.exp(imp[i]), math.exp(imp[d])
        w_s, w_d = 2 * e_s / (e_s + e_d), 2 * e_d / (e_s + e_d)
        acc[d] = acc[d] + w_s * xs[i] + (w_d - 1) * xs[d]
        tot[d] += float(size[i])
    return (torch.stack([acc[k] / tot[k] for k in kept]), torch.tensor([tot[k] for k in kept], dtype=x.dtype))


# --- whole towers, the reference's layout (cross token appended last) ------------------------------------
def _split(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _attend(blk, h, bias):
    """open_clip block attention written out; returns (output, full-width q, full-width k)."""
    mha = blk.attn
    q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    qh, kh, vh = (_split(t, mha.num_heads) for t in (q, k, v))
    logits = (qh * mha.head_dim**-0.5) @ kh.transpose(-1, -2) + bias
    o = (logits.softmax(-1) @ vh).transpose(1, 2).reshape(h.shape)
    return mha.out_proj(o), q, k


def _metric(t, heads, metric):
    return t if metric == "full" else _split(t, heads).mean(1)


def _tower_input(module, run):
    got = {}
    handle = module.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    try:
        run()
    finally:
        handle.remove()
    return got["x"]


def ref_image(model, images, r, offsets, metric="full", ensemble="reference", hide_cross=True):
    """The reference's image tower: returns (embedding, cross tokens entering each block [B, L, D],
    token counts)."""
    vis = model.visual
    x = _tower_input(vis.transformer, lambda: model.encode_image(images)).detach()  # after ln_pre
    x = torch.cat([x, x[:, :1]], dim=1)  # the cross token: ln_pre(cls + pos), appended last
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    entering, counts = [], []
    for i, blk in enumerate(vis.transformer.resblocks):
        cross = x[:, -1].detach() + offsets[i]  # point 1: the previous block's cross token
        entering.append(cross)
        x = torch.cat([x[:, :-1], cross[:, None]], dim=1)
        counts.append(x.shape[1])
        bias = size.log()[:, None, None, :].clone()  # proportional attention
        if hide_cross:
            bias[..., -1] = -INF
        a, q, k = _attend(blk, blk.ln_1(x), bias)
        x = x + a
        n = x.shape[1]
        r_eff = min(r, (n - 2) // 2)
        keys, qs = _metric(k, blk.attn.num_heads, metric), _metric(q, blk.attn.num_heads, metric)
        rows, sizes = [], []
        for s in range(x.shape[0]):
            src, dst, imp = official_match(keys[s], qs[s, -1], r_eff, {0, n - 1})
            xs, ss = official_merge(x[s], size[s], src, dst, imp, ensemble)
            rows.append(xs)
            sizes.append(ss)
        x, size = torch.stack(rows), torch.stack(sizes)
        x = x + blk.mlp(blk.ln_2(x))
    pooled = vis.ln_post(x[:, 0]) @ vis.proj
    return pooled, torch.stack(entering, 1), counts


def ref_text(model, ids, r, offsets, causal="positions"):
    """The reference's text tower (no padding): returns (embedding, cross tokens entering each
    block [B, L, D], token counts). Protected: SOT (index 0), the EOT, the cross token (last)."""
    x = _tower_input(model.transformer, lambda: model.encode_text(ids)).detach()
    b, n0 = ids.shape
    eot = ids.argmax(-1)
    x = torch.cat([x, x[torch.arange(b), eot][:, None]], dim=1)
    pos = torch.cat([torch.arange(n0).expand(b, n0), eot[:, None]], dim=1).to(x.dtype)  # vleff: cross sees to EOT
    eot_idx = eot.clone()
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    entering, counts = [], []
    for i, blk in enumerate(model.transformer.resblocks):
        cross = x[torch.arange(b), eot_idx].detach() + offsets[i]  # point 1: the EOT's current state
        entering.append(cross)
        x = torch.cat([x[:, :-1], cross[:, None]], dim=1)
        n = x.shape[1]
        counts.append(n)
        if causal == "positions":
            visible = pos[:, None, :] <= pos[:, :, None]
        else:
            visible = torch.ones(n, n, dtype=torch.bool).tril().expand(b, n, n)
        bias = torch.zeros(b, n, n, dtype=x.dtype).masked_fill(~visible, -INF)
        bias[:, :, -1] = -INF  # nobody reads the cross token (the reference: it is last under a causal mask)
        bias = (bias + size.log()[:, None, :])[:, None]
        a, q, k = _attend(blk, blk.ln_1(x), bias)
        x = x + a
        r_eff = min(r, (n - 3) // 2)
        rows, sizes, poss, eots = [], [], [], []
        for s in range(b):
            e = int(eot_idx[s])
            src, dst, imp = official_match(k[s], q[s, e], r_eff, {0, e, n - 1})
            xs, ss = official_merge(x[s], size[s], src, dst, imp)
            kept = [t for t in range(n) if t not in src]
            p = [max([float(pos[s, t])] + [float(pos[s, i]) for i in src if dst[i] == t]) for t in kept]
            rows.append(xs)
            sizes.append(ss)
            poss.append(torch.tensor(p, dtype=x.dtype))
            eots.append(kept.index(e))
        x, size, pos = torch.stack(rows), torch.stack(sizes), torch.stack(poss)
        eot_idx = torch.tensor(eots)
        x = x + blk.mlp(blk.ln_2(x))
    pooled = model.ln_final(x[torch.arange(b), eot_idx]) @ model.text_projection
    return pooled, torch.stack(entering, 1), counts


def _model(layers=3, seed=0):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=64, head_width=16, patch_size=tm.PATCH, image_size=tm.IMG)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=4, layers=layers)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).double()
    with torch.no_grad():  # norms as after training: ln_pre, ln_post and ln_final differ
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model


def _ids(batch=2, seed=0):
    """Sixteen real tokens, the EOT (largest id) last: no padding."""
    ids = torch.randint(1, 98, (batch, 16), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = 99
    return ids


def _trained_offsets(model):
    offsets = crossget_offsets(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in offsets.values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return offsets


# --- point 2 and 3 on the kernel ---------------------------------------------------------------------------
def _kernel_case(seed):
    g = torch.Generator().manual_seed(seed)
    b, n, c = 2, 18, 16
    keys = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    query = torch.randn(b, c, generator=g, dtype=torch.float64)
    x = torch.randn(b, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n), generator=g).double()  # unequal sizes, as after earlier merges
    return keys, query, x, size


@pytest.mark.parametrize("seed", range(6))
def test_sources_and_destinations_follow_the_reference_rank_rule(seed):
    """Point 2: sources by importance − best similarity towards a later-ranked token (the rank
    mask), in the reference's order; destinations the most similar non-source."""
    keys, query, _, _ = _kernel_case(seed)
    imp = F.cosine_similarity(keys, query[:, None], dim=-1)
    plan = complete_graph_matching(keys, imp, 6, 2)
    for s in range(keys.shape[0]):
        src, dst, _ = official_match(keys[s], query[s], 6, {0, 1})
        assert plan.src_idx[s].tolist() == src
        assert dict(zip(plan.src_idx[s].tolist(), plan.dst_idx[s].tolist())) == dst


@pytest.mark.parametrize("seed", range(3))
def test_ensemble_merge_follows_the_reference(seed):
    """Point 3: per pair, the softmax of the two importances (temperature 1), merged on size-scaled
    tokens as the reference does (×2, ``(w_dst − 1)·dst``, ÷ summed size), with unequal sizes and
    several sources per destination; the ``"mean"`` option: the size·exp(importance) mean."""
    keys, query, x, size = _kernel_case(seed)
    imp = F.cosine_similarity(keys, query[:, None], dim=-1)
    plan = complete_graph_matching(keys, imp, 8, 2)
    assert any(len(set(row)) < len(row) for row in plan.dst_idx.tolist())  # a destination with two sources
    merged, new_size = plan.merge_ensemble(x, size[..., None], imp)
    mean, mean_size = plan.merge_weighted(x, size[..., None], ensemble_weights(imp))
    for s in range(keys.shape[0]):
        src = plan.src_idx[s].tolist()
        dst = dict(zip(src, plan.dst_idx[s].tolist()))
        want_x, want_size = official_merge(x[s], size[s], src, dst, imp[s].tolist())
        torch.testing.assert_close(merged[s], want_x, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(new_size[s, :, 0], want_size)
        want_x, want_size = official_merge(x[s], size[s], src, dst, imp[s].tolist(), "mean")
        torch.testing.assert_close(mean[s], want_x, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(mean_size[s, :, 0], want_size)


# --- the whole model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric,ensemble", [("full", "reference"), ("head_mean", "reference"), ("full", "mean")])
def test_image_tower_matches_the_reference_forward(metric, ensemble):
    """Points 1–4 on open_clip's image tower (3 blocks, r=3, trained offsets), and the options."""
    model = _model()
    vleff.apply_crossget(model, r_image=3, r_text=0, metric=metric, ensemble=ensemble)
    offsets = _trained_offsets(model)
    model.eval()
    images = tm.images().double()
    with torch.no_grad():
        got = model.encode_image(images)
        want, _, counts = ref_image(model, images, 3, offsets["image"], metric, ensemble)
    assert token_counts(model)["image"] == counts == [18, 15, 12]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_text_tower_matches_the_reference_forward():
    """Points 1–4 on open_clip's text tower (r=3): importance from the EOT's query, the cross
    token from the EOT's current state, SOT / EOT protected, causal mask from merged positions."""
    model = _model()
    vleff.apply_crossget(model, r_image=0, r_text=3)
    offsets = _trained_offsets(model)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        got = model.encode_text(ids)
        want, _, counts = ref_text(model, ids, 3, offsets["text"])
    assert token_counts(model)["text"] == counts == [17, 14, 11]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def _paired_training_forward():
    """A CrossGET model (trained-like offsets) after one training forward of both towers."""
    model = _model()
    vleff.apply_crossget(model, r_image=3, r_text=3)
    offsets = _trained_offsets(model)
    model.train()
    images, ids = tm.images().double(), _ids()
    model.encode_image(images)
    model.encode_text(ids)
    return model, offsets, images, ids


def test_alignment_loss_reads_the_entering_cross_tokens_and_trains_only_the_offsets():
    """Point 5: JS of the projected cross tokens entering each block (image: ln_pre and proj;
    text: ln_final and text_projection, weights detached); the gradient reaches the offsets and
    nothing else, and equals the reference's."""
    model, offsets, images, ids = _paired_training_forward()
    loss = pop_aux_losses(model)["crossget_js"]
    loss.backward()
    grads = {k: p.grad.clone() for k, p in offsets.items()}
    others = [name for name, p in model.named_parameters() if p.grad is not None and "crossget_offsets" not in name]
    assert others == []

    leaf = {k: p.detach().clone().requires_grad_(True) for k, p in offsets.items()}
    _, img_cross, _ = ref_image(model, images, 3, leaf["image"])
    _, txt_cross, _ = ref_text(model, ids, 3, leaf["text"])
    vis = model.visual
    proj_img = (
        F.layer_norm(
            img_cross, vis.ln_pre.normalized_shape, vis.ln_pre.weight.detach(), vis.ln_pre.bias.detach(), vis.ln_pre.eps
        )
        @ vis.proj.detach()
    )
    proj_txt = (
        F.layer_norm(
            txt_cross,
            model.ln_final.normalized_shape,
            model.ln_final.weight.detach(),
            model.ln_final.bias.detach(),
            model.ln_final.eps,
        )
        @ model.text_projection.detach()
    )
    p, q = proj_img.softmax(-1), proj_txt.softmax(-1)
    mid = (p + q) / 2
    want = (0.5 * (p * (p / mid).log()).sum(-1) + 0.5 * (q * (q / mid).log()).sum(-1)).mean()  # true JS
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(js_divergence(proj_img, proj_txt).mean(), want, atol=1e-12, rtol=1e-10)
    want.backward()
    for k, grad in grads.items():
        torch.testing.assert_close(grad, leaf[k].grad, atol=1e-12, rtol=1e-10)


def test_cross_tokens_entering_each_block_are_carried_forward(monkeypatch):
    """Point 1 directly: the tokens vleff re-injects before each block (what the loss reads) are
    the reference's: block i's is block i−1's cross token (image) / the EOT's state (text),
    detached, plus offset i; so the image guidance differs from image to image."""
    from vleff.tokens.crossget import CrossGETHook

    seen = {}
    real = CrossGETHook._align

    def spy(self, inputs, state, *rest):
        seen[self.modality] = inputs.detach()
        return real(self, inputs, state, *rest)

    monkeypatch.setattr(CrossGETHook, "_align", spy)
    model, offsets, images, ids = _paired_training_forward()
    pop_aux_losses(model)
    with torch.no_grad():
        _, img_cross, _ = ref_image(model, images, 3, offsets["image"])
        _, txt_cross, _ = ref_text(model, ids, 3, offsets["text"])
    torch.testing.assert_close(seen["image"], img_cross, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(seen["text"], txt_cross, atol=1e-12, rtol=1e-10)
    step = seen["image"][:, 1] - offsets["image"][1].detach()  # block 0's output, per image
    assert not torch.allclose(step[0], step[1], atol=1e-3)


def test_bad_metric_and_ensemble_are_refused():
    model = _model(layers=1)
    with pytest.raises(ValueError, match=r"metric='mean' is not allowed; use one of \('full', 'head_mean'\)"):
        vleff.apply_crossget(model, metric="mean")
    with pytest.raises(ValueError, match=r"ensemble='softmax' is not allowed; use one of \('reference', 'mean'\)"):
        vleff.apply_crossget(model, ensemble="softmax")
