"""``VisualQueryTuning``: VQT on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.VisualQueryTuning(num_queries=1)])

The shared side-method callback (:class:`vleff.lightning.side.SideTuning`): VQT is applied in
``setup`` (before ``configure_optimizers`` and before checkpoint weights are restored, so its
parameters exist when a checkpoint loads), the backbone is frozen there and kept in eval mode
(dropout and drop-path off) for every training batch while the VQT module trains. At fit start
any backbone weight that requires grad is refused: it would make the frozen token stream build a
graph and silently destroy the memory saving. Checkpoints leave out only the frozen backbone
(they hold the queries, projection, trainable head and the module's own weights beside the
backbone) unless ``full_checkpoint=True``.
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.side import SideMixin, SideTuning
from vleff.methods.vqt.core import VQTConfig


class VisualQueryTuning(SideTuning):
    """Apply VQT to the image towers of the LightningModule and train only it (and the head).

    Args:
        train_head: keep the tower's classifier head trainable (a new task needs it; it reads
            the pooled features only, so no backbone activation is saved for it).
        full_checkpoint: save the whole model in checkpoints (default: the side state only).
        remove_on_teardown: restore the plain model when the run ends.
        init_from: a checkpoint or ``state_dict`` of the trained backbone, loaded in ``setup``.
        **settings: :class:`vleff.methods.vqt.core.VQTConfig` fields (``num_queries``, ``dropout``,
            ``towers``), validated here.
    """

    method = "vqt"
    settings_config = VQTConfig


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class VQTMixin(SideMixin):
    """``use_vqt(train_head=True, full_checkpoint=False, **settings)``: VQT
    (:mod:`vleff.methods.vqt.core`) on this module's image towers, backbone frozen; checkpoints leave out
    only the frozen backbone (:func:`vleff.side.side_state_dict`) unless ``full_checkpoint``, as with
    :class:`vleff.callbacks.VisualQueryTuning`."""

    def use_vqt(
        self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None, **settings: Any
    ) -> None:
        from vleff.methods.vqt.core import VQTConfig

        self._use_side("vqt", train_head, full_checkpoint, VQTConfig.build(**settings), module=module)
