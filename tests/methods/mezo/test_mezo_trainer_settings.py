"""Issue 24 item 14: trainer settings a MeZO step cannot honour are refused or warned, never ignored.

A MeZO step (the reference's ``zo_step``/``zo_update``) updates with one scalar projected
gradient from two losses of one batch: no ``.grad`` buffers exist to clip, and the reference
asserts gradient accumulation off. Lightning would silently skip ``gradient_clip_val`` (it
clips only in automatic optimization, which MeZO switches off at fit start).
"""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import torch

from vleff.callbacks import MeZO, MeZOMixin


class MixinClassifier(MeZOMixin, tl.TinyClassifier):
    def __init__(self) -> None:
        super().__init__(depth=1)
        self.use_mezo(eps=1e-3, lr=1e-3)


def _fit(tmp_path, module, callbacks, **trainer_kwargs):
    trainer = tl.trainer(tmp_path, callbacks=callbacks, max_steps=1, **trainer_kwargs)
    trainer.fit(module, tl.loader(n=4, batch_size=4))
    return trainer


@pytest.mark.parametrize("use", ["callback", "mixin"])
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_refused_before_any_step(use, algorithm, tmp_path):
    torch.manual_seed(0)
    module = MixinClassifier() if use == "mixin" else tl.TinyClassifier(depth=1)
    callbacks = [] if use == "mixin" else [MeZO(eps=1e-3, lr=1e-3)]
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"gradient_clip_val=0\.5.*allowed: gradient_clip_val=None or 0"):
        _fit(tmp_path, module, callbacks, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))  # nothing trained


def test_accumulation_still_refused_and_no_clipping_still_trains(tmp_path):
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 is not supported"):
        _fit(tmp_path, tl.TinyClassifier(depth=1), [MeZO(eps=1e-3, lr=1e-3)], accumulate_grad_batches=2)
    trainer = _fit(tmp_path, tl.TinyClassifier(depth=1), [MeZO(eps=1e-3, lr=1e-3)], gradient_clip_val=None)
    assert trainer.global_step == 1


class ClipsItself(tl.TinyClassifier):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        raise AssertionError("never called under MeZO")

    def on_after_backward(self):
        raise AssertionError("never called under MeZO")


def test_backward_hooks_the_module_overrides_are_named_in_a_warning(tmp_path):
    with pytest.warns(
        UserWarning,
        match="ClipsItself overrides on_after_backward, configure_gradient_clipping, which MeZO never calls",
    ):
        trainer = _fit(tmp_path, ClipsItself(depth=1), [MeZO(eps=1e-3, lr=1e-3)])
    assert trainer.global_step == 1
