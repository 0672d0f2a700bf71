"""The Lightning callbacks and mixins of vleff's own additive tuners (the serial adapter, the
parallel adapter / AdaptFormer) on one base.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.SerialAdapter(bottleneck=64)])

An additive tuner trains small modules inside the blocks of a frozen backbone
(:mod:`vleff.side.bottleneck`); they live in a side module on each tower root, so everything the
side-method callbacks do holds as it is (:class:`vleff.lightning.side.SideTuning`): the method is
applied in ``setup`` (before ``configure_optimizers`` and before checkpoint weights load), the
backbone is frozen but what the method trains (the adapters; the serial adapter's LayerNorms) and
kept in eval mode, a backbone weight that requires grad is refused at fit start, and checkpoints
hold only the adapters, what else trains and the module's own weights beside the backbone unless
``full_checkpoint=True``. As for the prompt methods, the adapters' gradients run through every
block above them, so the frozen blocks' activations are saved for backward.

Subclasses (one per method, beside the method) set ``method`` and ``settings_config``; this module
names no method.
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.side import SideMixin, SideTuning


class AdapterTuning(SideTuning):
    """Base of the additive tuners' callbacks.

    Args:
        train_head: keep the tower's classifier head trainable (a new task needs it).
        full_checkpoint: save the whole model in checkpoints (default: what trains and the module's own weights).
        remove_on_teardown: restore the plain model when the run ends.
        init_from: a checkpoint or ``state_dict`` of the trained backbone, loaded in ``setup``.
        module: which model of the LightningModule (when it holds several).
        **settings: the method's config fields, validated here.
    """


class AdapterMixin(SideMixin):
    """Shared by the additive tuners' mixins: ``_use_adapters(method, train_head, full_checkpoint,
    config, module)`` applies the method and freezes the backbone; the rest is
    :class:`vleff.lightning.side.SideMixin`'s."""

    def _use_adapters(self, method: str, train_head: bool, full_checkpoint: bool, config: Any, module: Any) -> None:
        self._use_side(method, train_head, full_checkpoint, config, module=module)
