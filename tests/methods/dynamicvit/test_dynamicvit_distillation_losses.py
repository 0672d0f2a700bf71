"""DynamicViT's distillation losses recomputed from teacher and student outputs (issue 12: 4).

The teacher here is an independent, unpatched copy of the model taken before
``apply_dynamicvit`` (its last-block tokens from a plain forward hook on timm's block), the
student's logits are the model's output and its last-block tokens come from a hook installed
after DynamicViT's. The recorded aux losses (``pop_aux_losses``) must equal

* ``kl_weight · KL(teacher ‖ student)`` = ``kl_weight · mean_b Σ_c p_t (log p_t − log p_s)``;
* ``token_weight · MSE`` of the parameter-free-LayerNormed patch tokens, over the tokens whose
  *final* keep mask is 1;
* ``ratio_weight / S · Σ_s mean_b (mean_n d_s − ρ_s)²``.
"""

from __future__ import annotations

import copy

import tiny_models as tm
import torch

from vleff import apply_dynamicvit
from vleff.backbones import TowerHook, find_tower, last_token_state, patch_tower
from vleff.tokens.aux import pop_aux_losses

KL_W, TOKEN_W, RATIO_W = 0.3, 0.7, 1.5


class LastTokens(TowerHook):
    name = "pinned_last_tokens"
    tokens: torch.Tensor | None = None

    def after(self, x, info, state):
        if info.index == info.depth - 1:
            self.tokens = x.detach().clone()
        return x


def _run(seed: int = 0):
    torch.manual_seed(seed)
    model = tm.timm_vit().train()
    with torch.no_grad():  # peaked output distributions: KL's two directions differ clearly
        model.head.weight.mul_(100.0)
    teacher = copy.deepcopy(model).eval()  # independent of the library's own teacher copy
    apply_dynamicvit(
        model, rho=0.5, locations=[1, 2], distill=True, kl_weight=KL_W, token_weight=TOKEN_W, ratio_weight=RATIO_W
    )
    last = LastTokens()
    patch_tower(find_tower(model)).add_hook(last)
    x = tm.images(batch=4, seed=seed + 1)
    torch.manual_seed(seed + 2)
    student_logits = model(x).detach()
    losses = {k: v.detach() for k, v in pop_aux_losses(model).items()}
    state = last_token_state(model)
    keep = state.get("keep")[:, 1:].detach()  # the final stage's mask over the patch tokens
    decisions = [d.detach() for d in state.scratch["dynamicvit"]["decisions"]]
    t_tokens = {}
    handle = teacher.blocks[-1].register_forward_hook(lambda m, a, out: t_tokens.__setitem__("x", out.detach()))
    with torch.no_grad():
        teacher_logits = teacher(x)
    handle.remove()
    return losses, student_logits, teacher_logits, last.tokens, t_tokens["x"], keep, decisions


def _layer_norm(t: torch.Tensor) -> torch.Tensor:
    mu = t.mean(dim=-1, keepdim=True)
    var = ((t - mu) ** 2).mean(dim=-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + 1e-5)


def test_kl_is_teacher_to_student():
    losses, s_logits, t_logits, *_ = _run()
    p_t = t_logits.double().softmax(-1)
    log_p_s = s_logits.double().log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    reverse = (log_p_s.exp() * (log_p_s - p_t.log())).sum(-1).mean()
    assert abs(float(kl - reverse)) > 1e-2 * float(kl)  # the direction is visible in this case
    torch.testing.assert_close(losses["dynamicvit/kl"].double(), KL_W * kl, atol=1e-7, rtol=1e-5)


def test_token_loss_is_layernormed_mse_over_the_final_kept_tokens():
    losses, _, _, s_tokens, t_tokens, keep, decisions = _run()
    assert len(decisions) == 2 and not torch.equal(decisions[0], decisions[1])  # the stage matters
    assert torch.equal(keep, decisions[1])
    kept = keep > 0.5
    assert 0 < int(kept.sum()) < kept.numel()
    diff = (_layer_norm(s_tokens[:, 1:].double()) - _layer_norm(t_tokens[:, 1:].double())) ** 2  # [B, N, C]
    mse = diff[kept].mean()
    wrong_mask = diff[decisions[0] > 0.5].mean()
    assert abs(float(mse - wrong_mask)) > 1e-3 * float(mse)
    torch.testing.assert_close(losses["dynamicvit/token"].double(), TOKEN_W * mse, atol=1e-7, rtol=1e-4)


def test_ratio_loss_by_hand():
    losses, *_, decisions = _run(seed=3)
    ratios = [0.5, 0.25]
    terms = [((d.double().mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, ratios)]
    expected = RATIO_W / 2 * sum(terms)
    torch.testing.assert_close(losses["dynamicvit/ratio"].double(), expected, atol=1e-7, rtol=1e-5)
    # the masks only shrink, and each stage's decision is binary
    assert bool(((decisions[1] <= decisions[0]) & ((decisions[1] == 0) | (decisions[1] == 1))).all())
