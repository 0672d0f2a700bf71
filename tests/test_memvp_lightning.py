"""MemVP and the prefix baseline through Lightning on the digits vision-language task.

One data module for both modes; a real ``Trainer.fit``; only the visual-prompt parameters
move (the host stays bit-identical); the logged accuracy equals the accuracy recomputed from
``generate``; the mixin rebuilds MemVP so a saved ``state_dict`` loads into a fresh module.
"""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import host_families
import tiny_lightning as tl
import vleff.callbacks as cb
from vleff.callbacks.side_mixins import MemVPMixin
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
    assert (labels_qa[0, :len(prompt("qa"))] == -100).all()
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
        "model.vleff_memvp." + n for n, _ in a.model.vleff_memvp.named_parameters()}
    with torch.no_grad():
        a.model.vleff_memvp.value_offset.normal_()
    torch.manual_seed(1)
    b = _MixinTask().eval()
    b.load_state_dict(a.state_dict())
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(0, len(VOCAB), (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(b(x, ids)["logits"], a(x, ids)["logits"], atol=0, rtol=0)
    assert isinstance(a, pl.LightningModule)
