"""MuE's callback in a real ``Trainer.fit``: the layer-wise loss (vleff's addition for ViT
classifiers: every block's output but the last through the model's own final norm and head,
cross-entropy against the batch's labels) joins the user's loss; exits stay off in training and on
in validation; the hooks leave at teardown; what it cannot read is refused."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import torch
import torch.nn.functional as F

from vleff.callbacks import MuE
from vleff.methods.mue import mue_exit_blocks


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.val_blocks: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val_blocks.append(mue_exit_blocks(pl_module.model)["image"].tolist())


def _expected_loss(model, x, y) -> torch.Tensor:
    """The user's loss plus the layer-wise loss, worked out on the unpatched model."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    total = torch.zeros(())
    for block in model.blocks:
        h = block(h)
        total = total + F.cross_entropy(model.forward_head(model.norm(h)), y)  # the last one: the user's
    return total


@pytest.mark.parametrize("layerwise", [True, False])
def test_layerwise_loss_joins_the_users_loss(tmp_path, layerwise):
    torch.manual_seed(0)
    module = tl.TinyClassifier(depth=3, lr=0.0)  # lr 0: the step's weights are the ones checked
    loader = tl.loader(n=4, batch_size=4)
    x, y = next(iter(loader))
    library = copy.deepcopy(module.model)
    record = Record()
    tl.trainer(tmp_path, [MuE(layerwise_loss=layerwise, image_threshold=-1.0), record], max_steps=1).fit(
        module, loader, loader
    )
    with torch.no_grad():
        expected = _expected_loss(library, x, y) if layerwise else F.cross_entropy(library(x), y)
    torch.testing.assert_close(record.losses[0], expected, rtol=1e-5, atol=1e-5)
    assert record.val_blocks == [[1, 1, 1, 1]]  # validation exits (threshold -1: after the first block)
    assert all(not block._forward_hooks for block in module.model.blocks)  # gone at teardown


def test_layerwise_loss_refuses_a_model_without_a_classifier_head_or_a_pair(tmp_path):
    module = tl.TinyClassifier()
    module.model.reset_classifier(0)  # a feature extractor: no head, and no image-text pair
    with pytest.raises(TypeError, match="layerwise_loss=True reads each block's output .*classifier head.*CLIPModel"):
        tl.trainer(tmp_path, [MuE(layerwise_loss=True)], max_steps=1).fit(module, tl.loader(4))


def test_layerwise_loss_names_labels_it_cannot_find(tmp_path):
    with pytest.raises(ValueError, match="labels=3 found no integer class-label tensor"):
        tl.trainer(tmp_path, [MuE(layerwise_loss=True, labels=3)], max_steps=1).fit(tl.TinyClassifier(), tl.loader(4))


@pytest.mark.parametrize("bad, match", [({"layerwise_loss": 1}, "layerwise_loss=1"), ({"labels": 1.5}, "labels=1.5")])
def test_bad_callback_options_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        MuE(**bad)


def test_layerwise_loss_refuses_a_training_forward_without_gradients():
    """Re-entrant checkpointing runs the training forward without gradients: the layer-wise loss
    would get none, so it stops with the alternative instead."""
    import tiny_models as tm

    import vleff
    from vleff.methods.mue.lightning import LayerwiseLoss

    model = tm.timm_vit().train()
    vleff.apply_mue(model)
    loss = LayerwiseLoss(model)
    loss.set_labels(torch.tensor([1, 2]))
    with torch.no_grad(), pytest.raises(RuntimeError, match="layerwise_loss: a training forward ran without gradients"):
        model(tm.images())
    loss.remove()
    with torch.no_grad():
        model(tm.images())  # hooks gone: nothing to refuse
