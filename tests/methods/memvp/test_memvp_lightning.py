"""MemVP and the prefix baseline through Lightning on the digits vision-language task.

One data module for both modes; a real ``Trainer.fit``; only the visual-prompt parameters
move (the host stays bit-identical); the logged accuracy equals the accuracy recomputed from
``generate``; the mixin rebuilds MemVP so a saved ``state_dict`` loads into a fresh module;
a Hugging Face BLIP captioning host trains through ``Trainer.fit`` with the ``MemVP`` callback
exactly as a plain PyTorch loop does.
"""

from __future__ import annotations

import copy

import host_families
import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from vleff.side.memvp import freeze_host_for_memvp

import vleff
import vleff.callbacks as cb
from vleff.callbacks.mixins import MemVPMixin
from vleff.data.digits import digits_arrays
from vleff.data.digits_vlm import DIGIT_TOKEN, VOCAB, DigitsVLMDataModule, answer_position, digit_text_batch, prompt
from vleff.models.vlm_task import VisionLanguageTask


def test_data_module_batches_are_prompt_plus_target():
    dm = DigitsVLMDataModule("caption", batch_size=4, limit_train=8)
    dm.setup()
    images, ids, labels, digits = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and ids.shape == (4, 1 + 7)
    for i in range(4):
        words = [VOCAB[t] for t in ids[i]]
        assert words[:6] == ["<bos>", "a", "photo", "of", "the", "digit"] and words[-1] == "<eos>"
        assert int(ids[i, 1 + answer_position("caption")]) == int(DIGIT_TOKEN[digits[i]])
    assert (labels[:, :1] == -100).all() and torch.equal(labels[:, 1:], ids[:, 1:])
    ids_qa, labels_qa = digit_text_batch("qa", torch.tensor([3]))
    assert [VOCAB[t] for t in ids_qa[0]] == ["<bos>", "which", "digit", "is", "this", "?", "three", "<eos>"]
    assert (labels_qa[0, : len(prompt("qa"))] == -100).all()
    with pytest.raises(ValueError, match="task='count'"):
        DigitsVLMDataModule("count")


@pytest.mark.parametrize("mode", ["prefix", "memvp"])
def test_fit_trains_only_the_visual_prompt_and_logs_true_accuracy(mode, tmp_path):
    torch.manual_seed(0)
    vlm = host_families.vlm("llama", "timm", visual_prompt=mode, vocab=len(VOCAB))
    module = VisionLanguageTask(vlm, "qa", lr=1e-2)
    callbacks = [cb.MemVP(n_mem=16)] if mode == "memvp" else []
    host_before = {k: v.clone() for k, v in vlm.state_dict().items()}
    dm = DigitsVLMDataModule("qa", batch_size=8, limit_train=16)
    trainer = tl.trainer(tmp_path, callbacks, max_steps=3, limit_val_batches=1)
    trainer.fit(module, dm)
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    prefix = "model.projector." if mode == "prefix" else "model.vleff_memvp."
    assert trained and all(n.startswith(prefix) for n in trained)
    after = vlm.state_dict()
    moved = {k for k in host_before if not torch.equal(host_before[k], after[k])}
    assert all(("model." + k).startswith(prefix) for k in moved), sorted(moved)  # the host is bit-identical
    if mode == "prefix":
        assert moved
    else:  # MemVP's parameters exist from setup on; E_v starts at zero and has been trained
        assert vlm.vleff_memvp.value_offset.abs().sum() > 0
    # the logged accuracy is the digit word of greedy generation, recomputed here
    images, _, _, digits = next(iter(dm.val_dataloader()))
    module.eval()
    p = torch.tensor(prompt("qa")).expand(images.shape[0], -1)
    tokens = vlm.generate(images, p, max_new_tokens=1)[:, 0]
    expect = (tokens == DIGIT_TOKEN[digits]).float().mean()
    torch.testing.assert_close(trainer.callback_metrics["val/acc"], expect)


class _MixinTask(MemVPMixin, VisionLanguageTask):
    def __init__(self) -> None:
        super().__init__(host_families.vlm("llama", "timm", vocab=len(VOCAB)), "qa")
        self.use_memvp(n_mem=16)


def test_mixin_rebuilds_memvp_so_a_saved_state_loads():
    torch.manual_seed(0)
    a = _MixinTask().eval()
    assert {n for n, p in a.named_parameters() if p.requires_grad} == {
        "model.vleff_memvp." + n for n, _ in a.model.vleff_memvp.named_parameters()
    }
    with torch.no_grad():
        a.model.vleff_memvp.value_offset.normal_()
    torch.manual_seed(1)
    b = _MixinTask().eval()
    b.load_state_dict(a.state_dict())
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(0, len(VOCAB), (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(b(x, ids)["logits"], a(x, ids)["logits"], atol=0, rtol=0)
    assert isinstance(a, pl.LightningModule)


class _BlipCaptioner(pl.LightningModule):
    """A tiny Hugging Face BLIP captioning model trained on its own captioning loss (the
    library's ``labels=`` cross entropy); MemVP comes from the callback."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tm.hf_blip_captioning()

    def training_step(self, batch, batch_idx):
        images, ids = batch
        loss = self.model(pixel_values=images, input_ids=ids, labels=ids).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _blip_digit_captions(n: int = 8) -> torch.utils.data.TensorDataset:
    """Digits images with "a photo of the digit <d>" as BLIP token ids (the digits vocabulary
    shifted past BLIP's pad id 0, opened with BLIP's bos id)."""
    images, digits = digits_arrays(tm.IMG, "train")
    ids, _ = digit_text_batch("caption", digits[:n])
    ids = ids + 1
    ids[:, 0] = tm.blip_config().text_config.bos_token_id
    return torch.utils.data.TensorDataset(images[:n], ids)


def test_blip_captioning_trains_through_lightning_with_the_memvp_callback():
    """``Trainer.fit`` of a BLIP host with ``callbacks=[MemVP]``: the result equals a plain PyTorch
    loop (same batches, ``apply_memvp`` + AdamW by hand), only MemVP's parameters move, and the
    captioning loss on the training set falls."""
    data = _blip_digit_captions()
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = _BlipCaptioner()
    host = copy.deepcopy(module.model)
    images, ids = data.tensors
    with torch.no_grad():
        before = host(pixel_values=images, input_ids=ids, labels=ids).loss
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb.MemVP(n_mem=16, scale=1.0)],
    )
    torch.manual_seed(1)
    trainer.fit(module, loader)
    # the same run written out, from the same host and MemVP's init under the same seed
    torch.manual_seed(1)
    vleff.apply_memvp(host, n_mem=16, scale=1.0)
    trainable = freeze_host_for_memvp(host)
    opt = torch.optim.AdamW([p for p in host.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # 2 epochs of 2 batches = the 4 steps
        for x, t in loader:
            loss = host(pixel_values=x, input_ids=t, labels=t).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    got, want = module.model.state_dict(), host.state_dict()
    assert sorted(n for n, p in module.model.named_parameters() if p.requires_grad) == sorted(trainable)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        after = module.model(pixel_values=images, input_ids=ids, labels=ids).loss
    assert after < before - 0.1, (float(before), float(after))
