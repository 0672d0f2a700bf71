"""The Lightning callbacks and mixins of the prompt methods (VPT-deep, prefix-tuning, APrompt) on
one base.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.VPT(num_tokens=10)])

A prompt method trains a few learned keys and values in front of every block's attention of a
frozen backbone (:mod:`vleff.side.prompts`); its prompts live in a side module on each tower root,
so everything the side-method callbacks do holds as it is (:class:`vleff.lightning.side.SideTuning`):
the method is applied in ``setup`` (before ``configure_optimizers`` and before checkpoint weights
load), the backbone is frozen and kept in eval mode while the prompts train (VPT's reference trains
so), a backbone weight that requires grad is refused at fit start, and checkpoints hold only the
prompts, trainable heads and the module's own weights beside the backbone unless
``full_checkpoint=True``. What differs from the side methods is what is saved for backward: the
prompts' gradients run through every block above them, so a prompt method saves the frozen blocks'
activations (as LoRA does), not only a side network's.

Subclasses (one per method, beside the method) set ``method`` and ``settings_config``; this module
names no method.
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.side import SideMixin, SideTuning


class PromptTuning(SideTuning):
    """Base of the prompt methods' callbacks.

    Args:
        train_head: keep the tower's classifier head trainable (a new task needs it).
        full_checkpoint: save the whole model in checkpoints (default: the prompts and what trains).
        remove_on_teardown: restore the plain model when the run ends.
        init_from: a checkpoint or ``state_dict`` of the trained backbone, loaded in ``setup``.
        module: which model of the LightningModule (when it holds several).
        **settings: the method's config fields, validated here.
    """


class PromptMixin(SideMixin):
    """Shared by the prompt methods' mixins: ``_use_prompts(method, train_head, full_checkpoint,
    config, module)`` applies the method and freezes the backbone; the rest is
    :class:`vleff.lightning.side.SideMixin`'s (eval-mode backbone, prompt-only checkpoints)."""

    def _use_prompts(self, method: str, train_head: bool, full_checkpoint: bool, config: Any, module: Any) -> None:
        self._use_side(method, train_head, full_checkpoint, config, module=module)
