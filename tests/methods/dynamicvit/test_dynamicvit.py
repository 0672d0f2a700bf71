"""DynamicViT: decisions, losses, masked-vs-dropped equivalence, teacher, Lightning integration."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from families import image_forwards
from hypothesis import given, settings
from hypothesis import strategies as st
from vleff.tokens.dynamicvit import (
    MODULE_NAME,
    apply_dynamicvit,
    dynamicvit_predictors,
    dynamicvit_teacher,
    hierarchical_ratios,
    remove_dynamicvit,
    token_distillation_loss,
)

import vleff
from vleff.backbones import last_token_state
from vleff.callbacks import DynamicViT
from vleff.callbacks.mixins import DynamicViTMixin
from vleff.tokens.aux import pop_aux_losses, vleff_aux_loss


def _scratch(model):
    return last_token_state(model).scratch["dynamicvit"]


def test_decisions_only_shrink_and_prefix_is_kept():
    torch.manual_seed(0)
    model = tm.timm_deit_distilled(depth=4)  # two prefix tokens: cls + dist
    apply_dynamicvit(model, rho=0.6, locations=[1, 2, 3], distill=False).train()
    for seed in range(5):
        torch.manual_seed(seed)
        model(tm.images(4, seed=seed))
        decisions = _scratch(model)["decisions"]
        assert len(decisions) == 3
        for prev, nxt in zip(decisions, decisions[1:]):
            assert bool((nxt <= prev).all())  # a dropped token never comes back
        keep = last_token_state(model).get("keep")
        assert keep.shape == (4, 18)
        assert bool((keep[:, :2] == 1).all())
        assert set(keep.unique().tolist()) <= {0.0, 1.0}
    model.eval()
    with torch.no_grad():
        model(tm.images(3))
    kept = _scratch(model)["kept"]
    assert bool((kept[:, :2] == torch.tensor([0, 1])).all())
    assert bool((kept[:, 1:].diff(dim=1) > 0).all())  # original token order kept
    assert last_token_state(model).token_counts == [18, 2 + 9, 2 + 5, 2 + 3]  # floor(16 * 0.6**s)


def test_hierarchical_ratios_multiply_per_stage():
    assert hierarchical_ratios(0.7, 3) == pytest.approx([0.7, 0.49, 0.343])


def test_new_predictors_start_at_the_target_keep_ratios():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=4)
    apply_dynamicvit(model, rho=0.7, locations=[1, 2, 3], distill=False).train()
    for predictor, prior in zip(dynamicvit_predictors(model)[0].predictors, [0.7, 0.7, 0.7]):
        assert predictor.out[-1].bias.softmax(dim=0)[0].item() == pytest.approx(prior)
    model(tm.images(64))
    kept = [d.mean().item() for d in _scratch(model)["decisions"]]
    assert kept == pytest.approx([0.7, 0.49, 0.343], abs=0.08)  # not ~0.5 per stage as an unbiased init would
    apply_dynamicvit(model, keep_ratios=[0.5, 0.5], locations=[1, 2], distill=False)
    priors = [p.out[-1].bias.softmax(dim=0)[0].item() for p in dynamicvit_predictors(model)[0].predictors]
    assert priors == pytest.approx([0.5, 0.98])  # "keep everything left" is clamped, not log(0)


def test_recorded_ratio_loss_uses_the_decisions_and_weight():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3)
    apply_dynamicvit(model, rho=0.7, locations=[1, 2], distill=False, ratio_weight=2.0).train()
    model(tm.images(4))
    decisions = _scratch(model)["decisions"]
    losses = pop_aux_losses(model)
    assert set(losses) == {"dynamicvit/ratio"}
    # mean over stages of mean_b (kept fraction of sample b − stage target)², times the weight
    terms = [((d.float().mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, [0.7, 0.49])]
    expected = 2.0 * torch.stack(terms).mean()
    assert losses["dynamicvit/ratio"].item() == pytest.approx(expected.item(), rel=1e-6)


FAMILIES = image_forwards("timm_vit", "deit_distilled", "open_clip", "hf_clip", "hf_blip")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eval_masked_computation_equals_real_drop(family):
    make, run = FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    apply_dynamicvit(model, rho=0.5, locations=[0, 1], distill=False, eval_mode="mask").eval()
    x = tm.images(3)
    hook = vleff.tokens.common.hooks_named(model, "dynamicvit")[0]
    with torch.no_grad():
        masked = run(model, x)
        masked_state = last_token_state(model)
        hook.eval_mode = "drop"
        dropped = run(model, x)
        dropped_state = last_token_state(model)
    assert dropped_state.token_counts[-1] < masked_state.token_counts[-1]
    final_mask = masked_state.get("keep")[:, masked_state.num_prefix :]
    kept = dropped_state.scratch["dynamicvit"]["kept"][:, masked_state.num_prefix :] - masked_state.num_prefix
    assert bool((final_mask.sum(dim=1) == kept.shape[1]).all())
    assert bool((final_mask.gather(1, kept) == 1).all())  # the same tokens survive
    if masked.dim() == 3:  # token sequences (timm forward_features): every surviving token must agree
        idx = dropped_state.scratch["dynamicvit"]["kept"]
        masked = masked.gather(1, idx[..., None].expand(-1, -1, masked.shape[-1]))
    torch.testing.assert_close(masked, dropped, atol=1e-5, rtol=1e-5)


def test_train_forward_on_every_family_records_losses():
    for family, (make, run) in FAMILIES.items():
        torch.manual_seed(0)
        model = make()
        apply_dynamicvit(model, rho=0.7, locations=[1], distill=False).train()
        out = run(model, tm.images(2))
        loss = out.float().pow(2).mean() + vleff_aux_loss(model)
        loss.backward()
        grads = [p.grad for p in dynamicvit_predictors(model)[0].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), family


def test_teacher_is_frozen_and_outside_the_model():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    apply_dynamicvit(model, rho=0.7, locations=[1, 2])
    teacher = dynamicvit_teacher(model)
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert not any("teacher" in k for k in model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(tm.images(4)), torch.tensor([0, 1, 2, 3])) + vleff_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    assert not torch.equal(model.state_dict()["head.weight"], reference["head.weight"])


def test_distillation_losses():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3)
    apply_dynamicvit(model, rho=0.7, locations=[1, 2]).train()
    model(tm.images(4))
    losses = pop_aux_losses(model)
    assert set(losses) == {"dynamicvit/ratio", "dynamicvit/kl", "dynamicvit/token"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    # MSE only over kept tokens, after a parameter-free LayerNorm
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    keep = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    sn, tn = F.layer_norm(s, (8,)), F.layer_norm(t, (8,))
    expected = torch.cat([(sn[0, 0] - tn[0, 0]), (sn[0, 2] - tn[0, 2]), (sn[1, 2] - tn[1, 2])]).pow(2).mean()
    assert token_distillation_loss(s, t, keep).item() == pytest.approx(expected.item(), rel=1e-6)
    assert token_distillation_loss(s, t, torch.zeros(2, 3)).item() == 0.0


def test_remove_round_trip_and_state_dict():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3).eval()
    keys = set(model.state_dict())
    x = tm.images(2)
    with torch.no_grad():
        ref = model(x)
    apply_dynamicvit(model, rho=0.5, locations=[1])
    assert any(k.startswith(MODULE_NAME + ".predictors.0.") for k in model.state_dict())
    remove_dynamicvit(model)
    assert set(model.state_dict()) == keys and not hasattr(model, MODULE_NAME)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not applied"):
        remove_dynamicvit(model)


def test_bf16_autocast():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3)
    apply_dynamicvit(model, rho=0.7, locations=[1, 2]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tm.images(4))
        loss = F.cross_entropy(out.float(), torch.tensor([0, 1, 2, 3])) + vleff_aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in dynamicvit_predictors(model)[0].parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(tm.images(2)).dtype == torch.bfloat16
    assert last_token_state(model).token_counts == [17, 12, 8]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_autocast_on_every_family(family):
    make, run = FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    apply_dynamicvit(model, rho=0.7, locations=[0, 1], distill=False)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run(model, tm.images(2)).float().square().mean() + vleff_aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in dynamicvit_predictors(model)[0].parameters()
    )
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(run(model, tm.images(2)).float()).all()


def test_default_locations_are_three_evenly_spaced_blocks():
    from vleff.tokens.pruning import default_locations

    assert default_locations(12) == [3, 6, 9]
    model = tm.timm_vit(depth=12)
    apply_dynamicvit(model, rho=0.7, distill=False)
    assert dynamicvit_predictors(model)[0] is not None
    model.eval()
    with torch.no_grad():
        model(tm.images(1))
    counts = last_token_state(model).token_counts
    assert [i for i in range(1, 12) if counts[i] < counts[i - 1]] == [3, 6, 9]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=0.0), "rho=0.0"),
        (dict(rho=1.5), "rho=1.5"),
        (dict(rho=True), "rho=True"),
        (dict(locations=[3]), r"locations=\[3\].*\[0, 3\)"),
        (dict(locations=[2, 1]), "strictly increasing"),
        (dict(locations=[1, 1]), "strictly increasing"),
        (dict(locations=[-1]), "-1"),
        (dict(keep_ratios=[0.5, 0.7], locations=[1, 2]), "non-increasing"),
        (dict(keep_ratios=[0.5], locations=[1, 2]), "1 entries"),
        (dict(keep_ratios=[1.2]), r"keep_ratios\[0\]=1.2"),
        (dict(kl_weight=-1), "kl_weight=-1"),
        (dict(eval_mode="fast"), "eval_mode='fast'"),
    ],
)
def test_bad_inputs(kwargs, match):
    model = tm.timm_vit(depth=3)
    with pytest.raises(ValueError, match=match):
        apply_dynamicvit(model, **kwargs)
    assert not hasattr(model, MODULE_NAME)


def test_callback_trains_predictors_through_the_optimizer(tmp_path, monkeypatch):
    import vleff.lightning.aux_loss as aux_mod

    seen = []
    original_pop = aux_mod.pop_aux_losses
    monkeypatch.setattr(aux_mod, "pop_aux_losses", lambda m: seen.append(original_pop(m)) or seen[-1])

    class Spy(pl.Callback):
        losses = []

        def on_before_backward(self, trainer, pl_module, loss):
            self.losses.append(loss.detach())

    class Recording(tl.TinyClassifier):
        ce = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.ce.append(loss.detach())
            return loss

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = [p.detach().clone() for p in dynamicvit_predictors(pl_module.model)[0].parameters()]

    torch.manual_seed(0)
    module = Recording()
    cb = DynamicViT(rho=0.7, locations=[1, 2])
    snapshot = Snapshot()
    trainer = tl.trainer(tmp_path, [cb, Spy(), snapshot], max_steps=3)
    trainer.fit(module, tl.loader(16))
    predictors = dynamicvit_predictors(module.model)[0]
    # every predictor tensor was trained (received a gradient and an optimizer step)
    assert all(not torch.equal(p, q) for p, q in zip(predictors.parameters(), snapshot.start))
    opt_ids = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in predictors.parameters()} <= opt_ids
    assert {id(p) for p in dynamicvit_teacher(module.model).parameters()}.isdisjoint(opt_ids)
    assert len(seen) == 3 and all(set(s) == {"dynamicvit/ratio", "dynamicvit/kl", "dynamicvit/token"} for s in seen)
    for loss, ce, aux in zip(Spy.losses, Recording.ce, seen):
        assert loss.item() == pytest.approx(ce.item() + sum(v.item() for v in aux.values()), rel=1e-5)
    assert "training_step" not in module.__dict__  # the wrapper is gone after fit


def test_checkpoint_resume_restores_predictors_and_teacher(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [DynamicViT(rho=0.7, locations=[1, 2])], max_steps=2)
    trainer.fit(module, tl.loader(16))
    ckpt = tmp_path / "dvit.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    predictors = {k: v for k, v in saved["state_dict"].items() if MODULE_NAME in k}
    assert predictors
    teacher_weights = dynamicvit_teacher(module.model).state_dict()

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            state = pl_module.state_dict()
            for k, v in predictors.items():
                torch.testing.assert_close(state[k], v, rtol=0, atol=0)
            for k, v in dynamicvit_teacher(pl_module.model).state_dict().items():
                torch.testing.assert_close(v, teacher_weights[k], rtol=0, atol=0)
            self.checked = True

    torch.manual_seed(123)  # a differently initialised module: everything must come from the checkpoint
    check = Check()
    resumed = tl.trainer(tmp_path, [DynamicViT(rho=0.7, locations=[1, 2]), check], max_steps=3, max_epochs=-1)
    resumed.fit(tl.TinyClassifier(), tl.loader(16), ckpt_path=ckpt)
    assert check.checked and resumed.global_step == 3
    with pytest.raises(ValueError, match="rho=0.7"):
        tl.trainer(tmp_path, [DynamicViT(rho=0.5, locations=[1, 2])], max_steps=3, max_epochs=-1).fit(
            tl.TinyClassifier(), tl.loader(16), ckpt_path=ckpt
        )


def test_model_without_prefix_tokens():
    torch.manual_seed(0)
    model = tm.timm_vit(class_token=False, global_pool="avg")  # no cls: every token may be dropped
    apply_dynamicvit(model, rho=0.5, locations=[1, 2]).train()
    model(tm.images(2))
    assert last_token_state(model).num_prefix == 0 and last_token_state(model).get("keep").shape == (2, 16)
    vleff_aux_loss(model).backward()
    assert all(p.grad is not None for p in dynamicvit_predictors(model)[0].parameters())
    model.eval()
    with torch.no_grad():
        assert model(tm.images(2)).shape == (2, 10)
    assert last_token_state(model).token_counts == [16, 8, 4]


class MixinClassifier(DynamicViTMixin, tl.TinyClassifier):
    def __init__(self):
        super().__init__()
        self.use_dynamicvit(self.model, rho=0.7, locations=[1, 2])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + self.vleff_aux_loss()


def test_mixin_checkpoint_carries_predictors_and_teacher(tmp_path):
    torch.manual_seed(0)
    module = MixinClassifier()
    trainer = tl.trainer(tmp_path, max_steps=2)
    trainer.fit(module, tl.loader(8))
    ckpt = tmp_path / "mixin.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.manual_seed(1)
    restored = MixinClassifier.load_from_checkpoint(ckpt)
    for (k, v), (k2, v2) in zip(module.state_dict().items(), restored.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert any(MODULE_NAME in k for k in restored.state_dict())
    for k, v in dynamicvit_teacher(module.model).state_dict().items():
        assert torch.equal(dynamicvit_teacher(restored.model).state_dict()[k], v)


def test_callback_init_from_loads_trained_weights_before_the_teacher_is_copied(tmp_path):
    torch.manual_seed(0)
    trained = tl.TinyClassifier()
    module_ckpt, backbone_file = tmp_path / "module.ckpt", tmp_path / "backbone.pt"
    torch.save({"state_dict": trained.state_dict()}, module_ckpt)  # LightningModule keys ("model.…")
    torch.save(trained.model.state_dict(), backbone_file)  # a bare model's keys
    for path in (module_ckpt, backbone_file):
        torch.manual_seed(1)
        module = tl.TinyClassifier()  # random weights, unlike the checkpoint
        tl.trainer(tmp_path, [DynamicViT(rho=0.7, locations=[1, 2], init_from=str(path))], max_steps=1).fit(
            module, tl.loader(8)
        )
        for k, v in trained.model.state_dict().items():  # the teacher is the loaded model
            assert torch.equal(dynamicvit_teacher(module.model).state_dict()[k], v), k
    other = tmp_path / "other.pt"
    torch.save({"blocks.0.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="does not fit"):
        tl.trainer(tmp_path, [DynamicViT(init_from=str(other))], max_steps=1).fit(tl.TinyClassifier(), tl.loader(8))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        tl.trainer(tmp_path, [DynamicViT(init_from=str(tmp_path / "missing.ckpt"))], max_steps=1).fit(
            tl.TinyClassifier(), tl.loader(8)
        )


class SyncCheck(pl.Callback):
    """At the end of DDP training, predictor weights must agree across ranks and have moved."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        self.start = torch.cat(
            [p.detach().flatten().clone() for p in dynamicvit_predictors(pl_module.model)[0].parameters()]
        )

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in dynamicvit_predictors(pl_module.model)[0].parameters()])
        gathered = trainer.strategy.all_gather(flat)
        same = bool(torch.equal(gathered[0], gathered[1]))
        moved = not torch.equal(flat, self.start)
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(f"{same} {moved}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_ddp_two_processes_cpu(tmp_path):
    # ddp_fork: gloo workers forked from this process (ddp_spawn would re-import torch and
    # Lightning in each worker, ~30 s on a busy 2-core machine, for the same check)
    module = tl.TinyClassifier()
    trainer = tl.trainer(
        tmp_path,
        [DynamicViT(rho=0.7, locations=[1, 2]), SyncCheck(tmp_path)],
        max_steps=2,
        devices=2,
        strategy="ddp_fork",
    )
    trainer.fit(module, tl.loader(16))
    assert trainer.state.finished
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "True True"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), gap=st.floats(0.0, 200.0), seed=st.integers(0, 2**16))
def test_keep_masked_softmax_equals_softmax_over_allowed_keys(n, gap, seed):
    """Each row is a softmax over the kept keys plus itself, whatever the dropped keys' logits:
    a dropped key far above the rest (a large ``gap``) must not leak weight."""
    from vleff.backbones.block import keep_masked_softmax

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 2, n, n, generator=g, dtype=torch.float64)
    keep = (torch.rand(1, n, generator=g) < 0.5).double()
    keep[0, 0] = 1.0
    dropped = (keep[0] == 0).nonzero().flatten()
    logits[..., dropped] += gap  # dropped keys dominate every row
    logits.requires_grad_(True)
    keep.requires_grad_(True)
    probs = keep_masked_softmax(logits, keep)
    allowed = (keep[0] > 0)[None, :] | torch.eye(n, dtype=torch.bool)
    ref = logits.detach().masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    torch.testing.assert_close(probs.detach(), ref, atol=1e-5, rtol=0)
    (probs * torch.randn(probs.shape, generator=g, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(keep.grad).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_keep_masked_softmax_gives_keys_the_attention_bias_hides_no_weight(n, seed):
    """A causal mask (-inf logits) hides later keys exactly: no epsilon reaches them, so an
    earlier position never depends on a later one (text towers in training); rows still sum to 1
    and without -inf logits the formula is the unmasked one."""
    from vleff.backbones.block import KEEP_MASK_EPS, keep_masked_softmax

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 2, n, n, generator=g, dtype=torch.float64)
    keep = (torch.rand(1, n, generator=g) < 0.5).double()
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    probs = keep_masked_softmax(logits.masked_fill(causal, float("-inf")), keep)
    assert (probs[..., causal] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, n, dtype=torch.float64))
    # no -inf: DynamicViT's formula, (w·e^l + eps/n) / (Σ w·e^l + eps)
    weight = keep[:, None, None, :] + (1 - keep[:, None, None, :]) * torch.eye(n, dtype=torch.float64)
    free = keep_masked_softmax(logits, keep)
    shifted = logits - logits.masked_fill(weight == 0, float("-inf")).amax(-1, keepdim=True)
    e = torch.where(weight > 0, shifted, shifted.clamp(max=0)).exp() * weight
    torch.testing.assert_close(free, (e + KEEP_MASK_EPS / n) / (e.sum(-1, keepdim=True) + KEEP_MASK_EPS))


def test_callback_on_a_model_without_a_tower_names_the_families(tmp_path):
    """Issue 13: on a ResNet the callback suggested ``module=`` values that could not exist."""
    import torchvision

    class ResNetModule(tl.TinyClassifier):
        def __init__(self):
            super().__init__()
            self.model = torchvision.models.resnet18(num_classes=10)

    trainer = tl.trainer(tmp_path, [DynamicViT(rho=0.7)], max_steps=1)
    with pytest.raises(TypeError, match="no child of ResNetModule holds a supported image tower.*timm"):
        trainer.fit(ResNetModule(), tl.loader(4))


def test_model_with_distillation_pickles_and_still_distils():
    """Issue 13: the distiller held a local closure, so a DynamicViT model with distillation
    (the default) could not be pickled or ``torch.save``d whole."""
    import io
    import pickle

    torch.manual_seed(0)
    model = tm.timm_vit(depth=3)
    apply_dynamicvit(model, rho=0.5, locations=[1], distill=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        copy_.train()
        copy_(tm.images(2))
        assert {"dynamicvit/ratio", "dynamicvit/kl", "dynamicvit/token"} <= set(pop_aux_losses(copy_))
        assert dynamicvit_teacher(copy_) is not dynamicvit_teacher(model)
