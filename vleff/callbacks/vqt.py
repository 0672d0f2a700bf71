"""``VisualQueryTuning``: VQT on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.VisualQueryTuning(num_queries=1)])

The shared side-method callback (:class:`vleff.callbacks.side.SideTuning`): VQT is applied in
``setup`` (before ``configure_optimizers`` and before checkpoint weights are restored, so its
parameters exist when a checkpoint loads), the backbone is frozen there and kept in eval mode
(dropout and drop-path off) for every training batch while the VQT module trains. At fit start
any backbone weight that requires grad is refused: it would make the frozen token stream build a
graph and silently destroy the memory saving. Checkpoints leave out only the frozen backbone
(they hold the queries, projection, trainable head and the module's own weights beside the
backbone) unless ``full_checkpoint=True``.
"""
from __future__ import annotations

from vleff.callbacks.side import SideTuning
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
