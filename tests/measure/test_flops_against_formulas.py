"""FLOPs of token methods pinned to analytic formulas (issue 12: 8).

``vleff.profile.count_flops`` of the tiny timm ViT (eval, DynamicViT in drop mode) must equal a
formula written from the model's dimensions and the per-block token counts the forward recorded
(``last_token_state(model).token_counts``: tokens at each block's attention; the MLP of a block
runs on the tokens that leave it, the next block's count, or the tower output's for the last):

* patch embedding ``2·B·P·(3·p²)·C``; per block ``qkv 2·N·C·3C``, ``attention 2·2·N²·C``,
  ``proj 2·N·C·C``, ``fc1 2·M·C·4C``, ``fc2 2·M·4C·C`` (times ``B``); head ``2·B·C·K``;
* the methods' own matmuls: ToMe's A·Bᵀ similarity of the head-averaged keys
  ``2·B·⌈N/2⌉·⌊N/2⌋·Dh``, EViT's cls-attention row ``2·B·H·N·Dh``, DynamicViT's predictor MLP.
"""

from __future__ import annotations

import tiny_models as tm
import torch

from vleff import apply_dynamicvit, apply_evit, apply_tome
from vleff.backbones import last_token_state
from vleff.profile import count_flops

B, C, H, CLASSES, PATCHES = 2, 64, 4, 10, (tm.IMG // tm.PATCH) ** 2
DH, HIDDEN = C // H, 4 * C


def vit_flops(attn_tokens: list[int], mlp_tokens: list[int], batch: int = B) -> int:
    """Analytic forward FLOPs of ``tm.timm_vit`` with these token counts per block."""
    total = 2 * batch * PATCHES * (3 * tm.PATCH * tm.PATCH) * C  # patch embedding (a conv as a matmul)
    for n, m in zip(attn_tokens, mlp_tokens):
        total += batch * (2 * n * C * 3 * C + 2 * 2 * n * n * C + 2 * n * C * C)  # qkv, attention, proj
        total += batch * (2 * m * C * HIDDEN + 2 * m * HIDDEN * C)  # fc1, fc2
    return total + 2 * batch * C * CLASSES  # head on the cls token


def _measure(model: torch.nn.Module):
    x = tm.images(batch=B)
    model.eval()
    flops = count_flops(model, x)
    counts = list(last_token_state(model).token_counts) if last_token_state(model) is not None else None
    with torch.no_grad():
        out_tokens = model.forward_features(x).shape[1]
    return flops, counts, out_tokens


def test_baseline_formula():
    torch.manual_seed(0)
    flops, _, _ = _measure(tm.timm_vit())
    assert flops == vit_flops([17] * 3, [17] * 3)


def test_tome_flops_follow_the_token_counts():
    torch.manual_seed(0)
    model = apply_tome(tm.timm_vit(depth=4), r=3)
    flops, counts, out = _measure(model)
    assert counts == [17, 14, 11, 8] and out == 5
    mlp = counts[1:] + [out]
    matching = sum(2 * B * ((n + 1) // 2) * (n // 2) * DH for n in counts)  # one bipartite step per block
    assert flops == vit_flops(counts, mlp) + matching


def test_evit_flops_follow_the_token_counts():
    torch.manual_seed(0)
    model = apply_evit(tm.timm_vit(), keep_rate=0.5, locations=[1])
    flops, counts, out = _measure(model)
    assert counts == [17, 17, 10] and out == 10  # cls + 8 kept + 1 fused
    mlp = counts[1:] + [out]
    row = 2 * B * H * counts[1] * DH  # the cls query's logits over every key, at the location
    assert flops == vit_flops(counts, mlp) + row


def test_dynamicvit_drop_mode_flops_follow_the_token_counts():
    torch.manual_seed(0)
    model = apply_dynamicvit(tm.timm_vit(), rho=0.5, locations=[1, 2], distill=False)
    flops, counts, out = _measure(model)
    assert counts == [17, 9, 5] and out == 5  # 16·0.5 and 16·0.25 patches, plus cls
    mlp = counts  # DynamicViT drops in front of the block: attention and MLP see the same tokens

    def predictor(m: int) -> int:  # m patch tokens scored
        return 2 * B * m * (C * C + C * (C // 2) + (C // 2) * (C // 4) + (C // 4) * 2)

    seen = [counts[0] - 1, counts[1] - 1]  # tokens entering blocks 1 and 2, before their selection
    assert flops == vit_flops(counts, mlp) + predictor(seen[0]) + predictor(seen[1])
