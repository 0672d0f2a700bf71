"""Mixins call the next hook first (the user's code, another mixin's), then do their own work:
one rule for every mixin (issue 25), checked with two stacked mixins and a user's hook."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import tiny_models as tm

from vleff.callbacks.mixins import EViTMixin, LSTMixin, TokenMergingMixin
from vleff.methods.evit.lightning import EVIT_KEY
from vleff.methods.tome.lightning import TOME_KEY


class UsersModule(pl.LightningModule):
    def on_save_checkpoint(self, checkpoint):
        checkpoint["user"] = sorted(checkpoint)  # what the user's hook saw: nothing of the mixins yet


class Stacked(TokenMergingMixin, EViTMixin, UsersModule):
    def __init__(self):
        super().__init__()
        self.net = tm.timm_vit(depth=3)
        self.use_tome(r=1)
        self.use_evit(keep_rate=0.7, locations=[2])


def test_the_next_hook_runs_first_then_each_mixin_in_reverse_order():
    checkpoint: dict = {}
    Stacked().on_save_checkpoint(checkpoint)
    assert list(checkpoint) == ["user", EVIT_KEY, TOME_KEY]  # user, then the inner mixin, then the outer
    assert checkpoint["user"] == []


@pytest.mark.parametrize("hook, args", [("on_save_checkpoint", ({},)), ("on_train_start", ())])
def test_every_mixin_hook_calls_the_next_one(hook, args):
    calls = []

    class Spy(pl.LightningModule):
        def on_save_checkpoint(self, checkpoint):
            calls.append("user")

        def on_train_start(self):
            calls.append("user")

    class WithSide(LSTMixin, Spy):
        pass

    getattr(WithSide(), hook)(*args)
    assert calls == ["user"]
