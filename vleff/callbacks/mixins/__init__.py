"""LightningModule mixins, by name: the callbacks' behaviour for users who own the module.

One convention for every method: put the mixin first in the bases and call
``self.use_<method>(...)`` in ``__init__`` once the backbone exists (so
``load_from_checkpoint`` rebuilds any new parameters before the weights load). Call
``super()`` in any Lightning hook you override that a mixin also uses, so both run::

    class Classifier(TokenMergingMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("vit_small_patch16_224", num_classes=10)
            self.use_tome(r=16, schedule="linear", warmup_steps=500)

Each mixin lives beside its method and its callback (``vleff/methods/<name>/lightning.py``,
named by the method's registry entry); every mixin calls the next hook first
(:func:`vleff.lightning.mixin.next_hook`), then does its own work. Methods with aux losses
(DynamicViT, CrossGET, MADTP) need one call in ``training_step``: ``loss + self.vleff_aux_loss()``.
GaLore builds the optimizer (``self.galore_optimizer(...)`` in ``configure_optimizers``) and MeZO
replaces the step (``self.use_mezo(...)``).
"""

from __future__ import annotations

from vleff._lazy import lazy_getattr
from vleff.callbacks import _Exports

_MIXINS = _Exports(kinds=("mixin",))
_lookup = lazy_getattr("vleff.callbacks.mixins", _MIXINS, list_available=True)


def __getattr__(name: str) -> object:
    if name == "__all__":
        return sorted(n for n in _MIXINS if n.endswith("Mixin"))
    return _lookup(name)


def __dir__() -> list[str]:
    return sorted(n for n in _MIXINS if n.endswith("Mixin"))
