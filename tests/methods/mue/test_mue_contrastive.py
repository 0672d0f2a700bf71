"""MuE's contrastive layer-wise loss (vleff's addition for CLIP): in a real ``Trainer.fit`` the loss
added to the user's is, for every exit of every tower MuE is on, CLIP's symmetric loss between
that exit's embedding and the other tower's final one. The reference is independent of the code
under test: an exit after block ``l`` is what the library's own encode path returns from a copy of
the model cut to its first ``l + 1`` blocks."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from torch import nn

import vleff
from vleff.callbacks import MuE
from vleff.methods.mue.contrastive import ContrastiveLayerwiseLoss, exit_contrastive_loss
from vleff.tokens.aux import pop_aux_losses


def _clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class Family:
    """One CLIP family: the model, its embeddings as the library computes them, and a copy of the
    model whose image or text tower keeps only its first ``blocks`` blocks."""

    def __init__(self, name: str) -> None:
        self.name = name

    def make(self) -> nn.Module:
        torch.manual_seed(0)
        return tm.open_clip_model(vision_layers=3, text_layers=3) if self.name == "open_clip" else tm.hf_clip_model()

    def encode(self, model: nn.Module, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "open_clip":
            return model.encode_image(images), model.encode_text(ids)
        mask = (ids != 0).long()
        img = model.get_image_features(pixel_values=images).pooler_output
        return img, model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output

    def cut(self, model: nn.Module, modality: str, blocks: int) -> nn.Module:
        cut = copy.deepcopy(model)
        if self.name == "open_clip":
            holder = cut.visual.transformer if modality == "image" else cut.transformer
            holder.resblocks = nn.ModuleList(list(holder.resblocks)[:blocks])
        else:
            holder = (cut.vision_model if modality == "image" else cut.text_model).encoder
            holder.layers = nn.ModuleList(list(holder.layers)[:blocks])
        return cut

    def depth(self, model: nn.Module, modality: str) -> int:
        if self.name == "open_clip":
            return len((model.visual.transformer if modality == "image" else model.transformer).resblocks)
        return len((model.vision_model if modality == "image" else model.text_model).encoder.layers)


class PairModule(pl.LightningModule):
    """A CLIP trained with the symmetric contrastive loss (lr 0: the step's weights are the ones checked)."""

    def __init__(self, family: Family) -> None:
        super().__init__()
        self.family = family
        self.model = family.make()

    def training_step(self, batch, batch_idx):
        images, ids = batch
        img, txt = self.family.encode(self.model, images, ids)
        return _clip_loss(img, txt, self.model.logit_scale.exp())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


def _expected(family: Family, model: nn.Module, images, ids, towers: str) -> torch.Tensor:
    """The user's loss plus every exit's, worked out on cut copies of the unpatched model."""
    scale = model.logit_scale.exp()
    img, txt = family.encode(model, images, ids)
    total = _clip_loss(img, txt, scale)
    for modality in ("image", "text"):
        if towers not in (modality, "all"):
            continue
        for blocks in range(1, family.depth(model, modality)):
            early = family.encode(family.cut(model, modality, blocks), images, ids)
            exit_img, exit_txt = (early[0], txt) if modality == "image" else (img, early[1])
            total = total + _clip_loss(exit_img, exit_txt, scale)
    return total


@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
@pytest.mark.parametrize("towers", ["image", "text", "all"])
def test_each_exit_is_trained_with_the_contrastive_loss_of_its_embedding(tmp_path, family, towers):
    fam = Family(family)
    module = PairModule(fam)
    loader = tl.pair_loader(n=4, batch_size=4)
    images, ids = next(iter(loader))
    library = copy.deepcopy(module.model)
    record = Record()
    callback = MuE(layerwise_loss=True, towers=towers)
    tl.trainer(tmp_path, [callback, record], max_steps=1, limit_val_batches=0).fit(module, loader)
    with torch.no_grad():
        expected = _expected(fam, library, images, ids, towers)
        without = _clip_loss(*fam.encode(library, images, ids), library.logit_scale.exp())
    assert float(expected - without) > 0.1  # the exits' share is there to be seen
    torch.testing.assert_close(record.losses[0], expected, rtol=1e-5, atol=1e-5)
    blocks = [*module.model.visual.transformer.resblocks] if family == "open_clip" else []
    assert all(not block._forward_hooks for block in blocks)  # gone at teardown


def test_exit_contrastive_loss_pairs_each_exit_with_the_other_towers_final_embedding():
    torch.manual_seed(0)
    image, text, scale = torch.randn(3, 5, 4).double(), torch.randn(2, 5, 4).double(), torch.tensor(7.0)
    expected = sum(_clip_loss(image[i], text[-1], scale) for i in range(2)) + _clip_loss(image[-1], text[0], scale)
    torch.testing.assert_close(exit_contrastive_loss(image, text, scale.log()), expected.float())  # log temperature
    only_final = exit_contrastive_loss(image[-1:], text[-1:], scale.log())
    assert float(only_final) == 0.0  # the final pair is the user's loss, never added again


def test_a_forward_whose_partner_never_came_is_not_paired_with_a_later_step():
    """An image-only training forward that backpropagated leaves nothing for the next text forward."""
    model = Family("open_clip").make().train()
    vleff.apply_mue(model, towers="image")
    loss = ContrastiveLayerwiseLoss(model, "mue/layerwise")
    images, ids = tm.images(4), tm.token_ids(4)
    model.encode_image(images).sum().backward()
    model.encode_text(ids)
    assert pop_aux_losses(model) == {}
    model.encode_image(images)  # a whole step: image then text
    model.encode_text(ids)
    assert set(pop_aux_losses(model)) == {"mue/layerwise"}
    loss.remove()
    assert all(not block._forward_hooks for block in model.visual.transformer.resblocks)


def test_a_pair_without_a_temperature_is_refused(tmp_path):
    with pytest.raises(TypeError, match="has no logit_scale"):
        tl.trainer(tmp_path, [MuE(layerwise_loss=True)], max_steps=1).fit(tl.TinyBLIP(), tl.blip_loader(4))
