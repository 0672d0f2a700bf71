"""LightningModule mixins: the callbacks' behaviour for users who own the module.

One convention for every method: put the mixin first in the bases and call
``self.use_<method>(...)`` in ``__init__`` once the backbone exists (so
``load_from_checkpoint`` rebuilds any new parameters before the weights load). Call
``super()`` in any Lightning hook you override that a mixin also uses, so both run::

    class Classifier(TokenMergingMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("vit_small_patch16_224", num_classes=10)
            self.use_tome(r=16, schedule="linear", warmup_steps=500)

Mixins and callbacks share one implementation (the configs, schedules and aux-loss code of
the method layer); only where it is triggered differs. Methods with aux losses (DynamicViT,
CrossGET, MADTP) need one call in ``training_step``: ``loss + self.vleff_aux_loss()``.
GaLore builds the optimizer (``self.galore_optimizer(...)`` in ``configure_optimizers``) and
MeZO replaces the step (``self.use_mezo(...)``): see :mod:`vleff.callbacks.mixins.memory`.

One home, one module per kind: :mod:`~vleff.callbacks.mixins.base` (what they share),
:mod:`~vleff.callbacks.mixins.tokens`, :mod:`~vleff.callbacks.mixins.memory`,
:mod:`~vleff.callbacks.mixins.side`; every mixin is importable from here.
"""
from __future__ import annotations

from vleff.callbacks.mixins.base import AuxLossMixin
from vleff.callbacks.mixins.memory import GaLoreMixin, MeZOMixin, ReversibleMixin
from vleff.callbacks.mixins.side import LoRAMixin, LSTMixin, MemVPMixin, UniPTMixin, VQTMixin
from vleff.callbacks.mixins.tokens import CrossGETMixin, DynamicViTMixin, EViTMixin, MADTPMixin, TokenMergingMixin

__all__ = ["AuxLossMixin", "CrossGETMixin", "DynamicViTMixin", "EViTMixin", "GaLoreMixin", "LSTMixin", "LoRAMixin",
           "MADTPMixin", "MeZOMixin", "MemVPMixin", "ReversibleMixin", "TokenMergingMixin", "UniPTMixin", "VQTMixin"]
