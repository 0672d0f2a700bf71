"""The shared aux-loss plumbing: pop semantics, step-output handling, callback and mixin paths."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from vleff.tokens.dynamicvit import apply_dynamicvit

from vleff.callbacks.mixins import AuxLossMixin
from vleff.lightning.aux_loss import AuxLoss, attach_aux_loss, aux_loss_attached, detach_aux_loss
from vleff.tokens.aux import add_to_step_output, pop_aux_losses, total_aux_loss, vleff_aux_loss


def test_pop_counts_each_loss_once():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3)
    assert pop_aux_losses(model) == {} and total_aux_loss(model) is None
    apply_dynamicvit(model, rho=0.7, locations=[1], distill=False).train()
    model(tm.images(2))
    losses = pop_aux_losses(model)
    assert set(losses) == {"dynamicvit/ratio"}
    assert pop_aux_losses(model) == {}
    assert vleff_aux_loss(model).item() == 0.0
    model(tm.images(2))
    assert total_aux_loss(model).requires_grad
    model.eval()
    with torch.no_grad():
        model(tm.images(2))
    assert pop_aux_losses(model) == {}  # evaluation forwards record nothing
    assert pop_aux_losses(torch.nn.Linear(2, 2)) == {}  # no tower: nothing, no error


def test_add_to_step_output():
    aux = torch.tensor(0.5)
    assert add_to_step_output(torch.tensor(1.0), aux).item() == 1.5
    out = {"loss": torch.tensor(1.0), "logits": 3}
    new = add_to_step_output(out, aux)
    assert new["loss"].item() == 1.5 and new["logits"] == 3 and out["loss"].item() == 1.0
    assert add_to_step_output(None, aux) is None
    assert add_to_step_output(torch.tensor(2.0), None).item() == 2.0
    with pytest.raises(TypeError, match="str"):
        add_to_step_output("loss", aux)


def test_attach_is_refcounted_and_restores_the_step():
    module = tl.TinyClassifier()
    original = module.training_step
    attach_aux_loss(module)
    attach_aux_loss(module)
    assert aux_loss_attached(module) and "training_step" in module.__dict__
    detach_aux_loss(module)
    assert aux_loss_attached(module)
    detach_aux_loss(module)
    assert not aux_loss_attached(module) and "training_step" not in module.__dict__
    assert module.training_step == original


class ExplicitAux(AuxLossMixin, tl.TinyClassifier):
    """Adds the aux loss itself (the mixin path); records what it returned."""

    def __init__(self):
        super().__init__()
        apply_dynamicvit(self.model, rho=0.7, locations=[1, 2], distill=False)
        self.returned = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        ce = F.cross_entropy(self(x), y)
        aux = self.vleff_aux_loss()
        self.returned.append((ce.detach(), aux.detach()))
        return ce + aux


class LossSpy(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.losses.append(loss.detach())


def test_mixin_and_callback_paths_do_not_double_count(tmp_path):
    torch.manual_seed(0)
    module = ExplicitAux()
    spy = LossSpy()
    tl.trainer(tmp_path, [AuxLoss(), spy], max_steps=2).fit(module, tl.loader(8))
    assert len(spy.losses) == 2
    for loss, (ce, aux) in zip(spy.losses, module.returned):
        assert aux.item() > 0
        assert loss.item() == pytest.approx((ce + aux).item(), rel=1e-6)  # the wrapper added nothing more


class DictStep(tl.TinyClassifier):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "extra": 1}


def test_callback_path_adds_to_dict_outputs_and_logs(tmp_path):
    torch.manual_seed(0)
    module = DictStep()
    apply_dynamicvit(module.model, rho=0.7, locations=[1], distill=False)
    trainer = tl.trainer(tmp_path, [AuxLoss()], max_steps=2)
    trainer.fit(module, tl.loader(8))
    assert "train/aux/dynamicvit/ratio" in trainer.callback_metrics
    assert "training_step" not in module.__dict__
