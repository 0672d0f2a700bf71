"""Issue 24: one rule for what the side methods freeze and save, LoRA's removal, MADTP's messages.

Each test pins one point of the issue (numbered as there) on a tiny randomly initialised model.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from torch import nn

import vleff
from vleff.side.common import load_side_state_dict, side_state_dict

SIDE = ("vqt", "lst", "unipt")
CLIPS = {"open_clip": tm.open_clip_model, "hf_clip": tm.hf_clip_model}


def _apply(name: str, model: nn.Module) -> None:
    getattr(vleff, f"apply_{name}")(model)


def _side_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if "vleff_" in n}


# --- 6 / 15: apply_* freezes the whole backbone (both CLIP towers, projections, logit_scale) -------------
@pytest.mark.parametrize("family", sorted(CLIPS))
@pytest.mark.parametrize("name", SIDE)
def test_apply_side_method_trains_only_the_side_module_on_every_clip(name, family):
    torch.manual_seed(0)
    model = CLIPS[family]()
    _apply(name, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _side_names(model) and trainable
    # the callback's freezing is the same rule (VQT on a CLIP: the text tower frozen too)
    vleff.side.freeze_backbone(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == _side_names(model)
    vleff.remove_all(model) if hasattr(vleff, "remove_all") else getattr(vleff, f"remove_{name}")(model)
    assert all(p.requires_grad for p in model.parameters())  # the flags as before apply


def test_apply_keeps_timm_head_trainable_and_other_modules_untouched():
    torch.manual_seed(0)
    holder = nn.Module()
    holder.vit, holder.extra = tm.timm_vit(), nn.Linear(3, 3)
    holder.extra.weight.requires_grad_(False)
    vleff.apply_lst(holder)
    trainable = {n for n, p in holder.named_parameters() if p.requires_grad}
    assert trainable == _side_names(holder) | {"vit.head.weight", "vit.head.bias", "extra.bias"}
    vleff.remove_lst(holder)
    assert not holder.extra.weight.requires_grad and all(p.requires_grad for p in holder.vit.parameters())


# --- 4: side-only state keeps the user's own modules (a BatchNorm's running statistics) -------------------
class _WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vit = tm.timm_vit()
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.vit(x))


@pytest.mark.parametrize("name", SIDE)
def test_side_state_keeps_buffers_of_modules_beside_the_backbone(name):
    torch.manual_seed(0)
    model = _WithNorm().double()
    _apply(name, model)
    model.train()
    with torch.no_grad():
        model(tm.images(4).double())  # the BatchNorm's running statistics move
    state = side_state_dict(model)
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "bn.weight", "bn.bias"):
        assert key in state, key
    assert not any(k.startswith("vit.blocks.") for k in state)  # the frozen backbone stays out
    torch.manual_seed(0)
    fresh = _WithNorm().double()  # the same backbone weights, a fresh BatchNorm
    _apply(name, fresh)
    load_side_state_dict(fresh, state)
    model.eval(), fresh.eval()
    x = tm.images(2, seed=3).double()
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_side_only_checkpoint_keeps_buffers_and_refuses_a_checkpoint_without_them():
    from vleff.lightning.side import check_side_checkpoint, side_only_checkpoint

    torch.manual_seed(0)
    model = _WithNorm()
    vleff.apply_unipt(model)
    checkpoint = {"state_dict": model.state_dict()}
    side_only_checkpoint(model, checkpoint)
    assert "bn.running_mean" in checkpoint["state_dict"]
    del checkpoint["state_dict"]["bn.running_mean"]
    with pytest.raises(KeyError, match="bn.running_mean"):
        check_side_checkpoint(model, checkpoint)


# --- 15: remove_lora keeps open_clip's parameter order, even after a forward -------------------------------
def test_remove_lora_after_forward_keeps_open_clip_parameter_order():
    torch.manual_seed(0)
    model = tm.open_clip_model()
    before = [n for n, _ in model.named_parameters()]
    vleff.apply_lora(model, r=2)
    model.encode_image(tm.images(2)).sum().backward()
    model.encode_text(tm.token_ids(2))
    vleff.remove_lora(model)
    assert [n for n, _ in model.named_parameters()] == before


# --- 15: what "starts exactly at the frozen model" means on open_clip --------------------------------------
@pytest.mark.parametrize("name", SIDE)
def test_open_clip_side_start_is_bit_exact_on_the_training_path(name):
    torch.manual_seed(0)
    model = tm.open_clip_model().eval()
    x, ids = tm.images(2), tm.token_ids(2)
    with torch.enable_grad():
        plain = (model.encode_image(x), model.encode_text(ids))
        _apply(name, model)
        model.requires_grad_(True)  # the same attention path as the plain forward (no fused inference path)
        side = (model.encode_image(x), model.encode_text(ids))
    for a, b in zip(plain, side):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_open_clip_no_grad_fast_path_moves_the_plain_model_by_itself():
    """Why the README's open_clip exactness is stated for the training path: under ``no_grad``
    with every weight frozen, PyTorch's ``nn.MultiheadAttention`` takes its fused inference path,
    which rounds differently: the plain model moves with its flags alone, no vleff involved."""
    torch.manual_seed(0)
    model = tm.open_clip_model().eval()
    ids = tm.token_ids(2)
    with torch.no_grad():
        a = model.encode_text(ids)
        model.requires_grad_(False)
        b = model.encode_text(ids)
    assert 0 < float((a - b).abs().max()) < 1e-5


# --- 16: MADTP's out-of-budget warning names the τ range it tried ------------------------------------------
def test_madtp_warning_names_the_tau_range_actually_tried():
    import re

    from vleff.tokens.madtp import TAU_RANGE, apply_madtp, calibrate_madtp

    torch.manual_seed(0)
    model = tm.open_clip_model().eval()
    apply_madtp(model, tau=1e3)
    batch = (tm.images(2), tm.token_ids(2), (tm.token_ids(2) != 0).long())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = calibrate_madtp(model, [batch], 0.95, max_evals=4)
    text = " ".join(str(w.message) for w in caught if "could not reach" in str(w.message))
    match = re.search(r"τ in \[([^,]+), ([^\]]+)\]", text)
    assert match, text
    lo, hi = float(match.group(1)), float(match.group(2))
    taus = [e[0] for e in result.evaluations]
    assert lo == pytest.approx(min(taus), rel=1e-3) and hi == pytest.approx(max(taus), rel=1e-3)
    assert (lo, hi) != TAU_RANGE and "max_evals=4" in text


# --- 17: MADTP logs with sync_dist -------------------------------------------------------------------------
def test_madtp_epoch_log_is_synced(monkeypatch):
    import vleff.methods.madtp.lightning as cb

    calls = []

    class Module(nn.Module):
        def log_dict(self, values, **kwargs):
            calls.append(kwargs)

    callback = cb.MADTP(flops_reduction=0.3)
    callback._target = nn.Linear(1, 1)
    callback.controller.history.append({"tau": 1.0, "ratio": 0.7})
    monkeypatch.setattr(cb, "controller_epoch_end", lambda *a: True)
    callback.on_train_epoch_end(None, Module())
    assert calls and calls[0].get("sync_dist") is True


# --- 8: MemVP's memory belongs to the call that made it ------------------------------------------------------
def _memvp_host(host: nn.Module, **settings) -> nn.Module:
    from vleff.side.memvp import memvp_module

    vleff.apply_memvp(host, scale=1.0, **settings)
    module = memvp_module(host)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # E_v = 0 and the ×0.01 projector barely move a random model: make the memory count
        module.value_offset.copy_(torch.randn(module.value_offset.shape, generator=g, dtype=module.value_offset.dtype))
        module.projector[2].weight.mul_(50.0)
    return host


def test_memvp_blip_decoder_reads_the_image_states_it_is_given():
    torch.manual_seed(0)
    model = _memvp_host(tm.hf_blip_captioning().double().eval(), n_mem=16)
    ids, mask = tm.blip_token_ids(2)
    a, b = tm.images(2, seed=1).double(), tm.images(2, seed=2).double()

    def decode(states):
        return model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=states).logits

    with torch.no_grad():
        states_a, states_b = model.vision_model(a)[0], model.vision_model(b)[0]  # b went through last
        on_a = decode(states_a)
        model.vision_model(a)  # a went through last
        on_b = decode(states_b)
        model.vision_model(b)
        torch.testing.assert_close(decode(states_a), on_a, atol=0, rtol=0)
        torch.testing.assert_close(decode(states_b), on_b, atol=0, rtol=0)
    assert not torch.equal(on_a, on_b)


def test_memvp_blip_vqa_beams_read_their_question_image():
    torch.manual_seed(0)
    model = _memvp_host(tm.hf_blip_vqa().eval(), n_mem=16)
    model.config.text_config.sep_token_id = None
    x = tm.images(2)
    ids, mask = tm.blip_token_ids(2)
    kwargs = {"num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 4}
    with torch.no_grad():
        both = model.generate(input_ids=ids, pixel_values=x, attention_mask=mask, **kwargs)
        alone = [
            model.generate(
                input_ids=ids[i : i + 1], pixel_values=x[i : i + 1], attention_mask=mask[i : i + 1], **kwargs
            )
            for i in range(2)
        ]
    torch.testing.assert_close(both, torch.cat(alone), atol=0, rtol=0)


def test_memvp_causal_lm_memory_is_not_spread_over_another_batch():
    from vleff.side.memvp import set_memvp_memory

    torch.manual_seed(0)
    lm = _memvp_host(tm.hf_llama_lm().eval(), visual_dim=12, n_mem=4)
    set_memvp_memory(lm, torch.randn(1, 3, 12))  # one image
    with torch.no_grad():
        lm(input_ids=torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(RuntimeError, match="batch 4 but the visual memory was set for batch 1"):
            lm(input_ids=torch.zeros(4, 3, dtype=torch.long))  # four other prompts


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_memvp_vlm_memory_ends_with_its_call(call):
    from vleff.models import VisionLanguageModel

    torch.manual_seed(0)
    vlm = VisionLanguageModel(tm.timm_vit(), tm.hf_llama_lm(), "memvp", memvp={"n_mem": 16}).eval()
    x, ids = tm.images(1), torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        vlm(x, ids) if call == "forward" else vlm.generate(x, ids, max_new_tokens=2)
        with pytest.raises(RuntimeError, match="without visual memory"):
            vlm.lm(input_ids=torch.randint(0, 64, (4, 3)))  # text-only prompts after the call


# --- 12: load_from_checkpoint of callback-trained checkpoints ------------------------------------------------


class _Restoring:
    """The one line a module needs so ``load_from_checkpoint`` rebuilds the callback's method."""

    def on_load_checkpoint(self, checkpoint):
        vleff.callbacks.restore_methods(self, checkpoint)


class _Classifier(_Restoring, tl.TinyClassifier):
    def __init__(self) -> None:
        torch.manual_seed(0)  # the same "pretrained" backbone at every construction
        super().__init__()
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn(self.model(x))


class _CLIP(_Restoring, tl.TinyCLIP):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()


class _Captioner(_Restoring, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tm.hf_blip_captioning()

    def training_step(self, batch, batch_idx):
        images, ids = batch
        return self.model(pixel_values=images, input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _caption_loader():
    ids, _ = tm.blip_token_ids(4)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tm.images(4), ids), batch_size=2)


def _outputs(module):
    module.eval()
    with torch.no_grad():
        if isinstance(module, _Classifier):
            return [module(tm.images(2, seed=5))]
        if isinstance(module, _CLIP):
            return [module.model.encode_image(tm.images(2, seed=5)), module.model.encode_text(tm.token_ids(2, seed=5))]
        ids, mask = tm.blip_token_ids(2)
        return [module.model(pixel_values=tm.images(2, seed=5), input_ids=ids, attention_mask=mask).logits]


CASES = {
    "lst": (_Classifier, tl.loader, lambda: vleff.callbacks.LadderSideTuning(reduction=4)),
    "crossget": (_CLIP, tl.pair_loader, lambda: vleff.callbacks.CrossGET(r_image=2, r_text=2)),
    "madtp": (
        _CLIP,
        tl.pair_loader,
        lambda: vleff.callbacks.MADTP(flops_reduction=0.2, max_evals=4, adjust_every_epoch=False),
    ),
    "memvp": (_Captioner, _caption_loader, lambda: vleff.callbacks.MemVP(n_mem=16)),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_load_from_checkpoint_rebuilds_the_callbacks_method(method, tmp_path):
    make, data, callback = CASES[method]
    module = make()
    trainer = tl.trainer(tmp_path, [callback()], max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert [r["method"] for r in checkpoint["vleff_methods"]] == [method]
    plain = type("Plain", (make,), {"on_load_checkpoint": lambda self, checkpoint: None})
    with pytest.raises(RuntimeError, match="Unexpected key|Missing key"):  # without the hook: torch's own error
        plain.load_from_checkpoint(tmp_path / "m.ckpt")
    loaded = make.load_from_checkpoint(tmp_path / "m.ckpt")
    for a, b in zip(_outputs(loaded), _outputs(module)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
