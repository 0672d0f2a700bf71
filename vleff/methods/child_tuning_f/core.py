"""Child-Tuning_F (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"), the task-free
variant: at every optimizer step each gradient entry is kept with probability ``p`` (a fresh
Bernoulli draw) and the kept entries are scaled by ``1/p``, before the optimizer's moments see it.

**Not parameter-efficient.** Every parameter updates and the whole model is stored; Child-Tuning
is a regulariser (a random "child network" of the gradient per step, unbiased in expectation)
for full fine-tuning, not a way to train less. Nothing is frozen and nothing is added: the
forward is the model's own and :func:`remove_child_tuning_f` only drops the record.

As the reference (``ChildTuningOptimizer.py``, ``ChildTuningAdamW.step`` in mode
``ChildTuning-F``): ``grad ← grad · Bernoulli(p) / p`` element-wise, then AdamW's moments and
update as usual; decoupled weight decay acts on every entry, masked or not. Default
``reserve_p = 0.3`` (``run.sh``).

In vleff the mask covers every parameter of the chosen towers (the classifier head included:
the reference masks every parameter its optimizer holds); parameters outside the towers (CLIP's
``logit_scale``, a LightningModule's own layers) update in full. The masking is not an optimizer:

* with Lightning, the callback and the mixin mask the gradients in ``on_before_optimizer_step``
  (after the backward, before the optimizer step), so it works with whatever optimizer
  ``configure_optimizers`` returns (:mod:`vleff.lightning.selection`);
* in a plain PyTorch loop, :func:`vleff.side.selection.attach_masked_step` masks in an optimizer
  step pre-hook (``optimizer.step()`` without a closure).

**The draws and exact resume.** The mask of optimizer step ``t`` comes from a generator seeded
with ``(seed, t)`` (:func:`vleff.side.selection.mask_gradients`), not from the global RNG: a
resumed run (the counter ``t`` travels in the checkpoint) draws the same masks as the run it
continues, every DDP rank draws the same mask (the replicas stay equal), and dropout or data
order draws do not shift it. The draw depends on the device type (CPU and CUDA generators
differ), so a run resumed on another device type goes on with other (equally distributed) masks.

>>> vleff.apply_child_tuning_f(model, reserve_p=0.3)
>>> handles = vleff.side.selection.attach_masked_step(optimizer, model)   # plain PyTorch loops
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import selection as sel

NAME = "child_tuning_f"
LABEL = "Child-Tuning_F"
TOWERS = ("image", "text")


@dataclass
class ChildTuningFConfig(MethodConfig):
    """Child-Tuning_F's settings.

    Attributes:
        reserve_p: probability that a gradient entry is kept at a step (the reference's
            ``reserve_p``, 0.3 in ``run.sh``); kept entries are scaled by ``1/reserve_p``. In
            ``(0, 1]``; 1 keeps every entry (plain fine-tuning).
        seed: seeds the per-step draws (with the step counter): same seed, same masks.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    reserve_p: float = 0.3
    seed: int = 0
    towers: str = "image"

    def __post_init__(self) -> None:
        self.reserve_p = check_number("reserve_p", self.reserve_p, low=0.0, high=1.0, low_open=True)
        self.seed = check_int("seed", self.seed, low=0)
        check_towers(self.towers, TOWERS)


def masked_names(model: nn.Module, towers: str = "image") -> list[str]:
    """Full names of the parameters whose gradients Child-Tuning_F masks: every parameter of the
    towers (the heads included)."""
    return list(sel.tower_parameters(model, sel.chosen_towers(model, towers)))


def apply_child_tuning_f(model: nn.Module, config: ChildTuningFConfig | None = None, **settings: Any) -> nn.Module:
    """Child-Tuning_F on the towers ``towers`` names, in place: no flag, weight or forward
    changes; the record says which gradients the masked step draws masks for. Applying again
    replaces (the draw counter restarts). :func:`remove_child_tuning_f` undoes it exactly.

    Raises:
        TypeError: no tower ``towers`` names.
        ValueError: a bad setting; another method that chooses what trains is applied.
    """
    cfg = ChildTuningFConfig.build(config, **settings)
    if child_tuning_f_applied(model):
        remove_child_tuning_f(model)
    chosen = sel.chosen_towers(model, cfg.towers)
    names = masked_names(model, cfg.towers)
    refuse_applied_conflicts(model, NAME)
    sel.select_parameters(model, NAME, LABEL, chosen, None, cfg.as_dict(), train_head=False)
    record = sel.record_of(model, NAME)
    record["masked"], record["bernoulli"], record["seed"] = names, cfg.reserve_p, cfg.seed
    return model


def remove_child_tuning_f(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_child_tuning_f`: the record gone (flags were never changed)."""
    return sel.release_parameters(model, NAME, LABEL)


def child_tuning_f_applied(model: nn.Module) -> bool:
    return sel.selected_in(model, NAME)


def child_tuning_f_settings(model: nn.Module) -> dict[str, Any]:
    return sel.applied_settings(model, NAME)


def child_tuning_f_step(model: nn.Module) -> int:
    """How many masked optimizer steps were drawn (the draw counter a checkpoint keeps)."""
    record = sel.record_of(model, NAME)
    if record is None:
        raise ValueError(f"{LABEL} is not applied to this {type(model).__name__}")
    return int(record["step"])
