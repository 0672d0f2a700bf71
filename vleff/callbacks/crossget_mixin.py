"""``CrossGETMixin``: CrossGET for users who own the LightningModule (one call in ``training_step``).

>>> class Finetuner(CrossGETMixin, L.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.clip = open_clip.create_model("ViT-B-16")
...         self.use_crossget(r_image=16, r_text=6)         # in __init__: offsets exist before
...     def training_step(self, batch, i):                 # weights load / optimizers are built
...         img, txt = self.clip.encode_image(batch[0]), self.clip.encode_text(batch[1])
...         return contrastive(img, txt) + self.vleff_aux_loss()   # + the cross-token JS loss
"""
from __future__ import annotations

from typing import Any

from vleff.callbacks.mixins import AuxLossMixin
from vleff.tokens.crossget import CrossGETConfig, apply_crossget


class CrossGETMixin(AuxLossMixin):
    """``use_crossget(**settings)`` in ``__init__`` + ``self.vleff_aux_loss()`` in the loss.
    Settings: :class:`vleff.tokens.crossget.CrossGETConfig`. The offsets are parameters of the
    module, so they are saved in and restored from checkpoints with the weights."""

    def use_crossget(self, **settings: Any) -> None:
        apply_crossget(self, CrossGETConfig.build(**settings))  # type: ignore[arg-type]
