"""The helpers several callbacks share live in neutral modules (``targets``, ``init_weights``,
``schedulers``), not in one method's callback: their behaviour, and that no callback imports
another callback's private names."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import nn

import vleff
from vleff.lightning.schedulers import step_lr_schedulers
from vleff.lightning.targets import resolve_backbone, single_backbone


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def test_resolve_backbone_finds_the_one_image_tower_child():
    vit = tm.timm_vit(depth=1)
    holder = Holder(head=nn.Linear(2, 2), net=vit)
    assert resolve_backbone(holder, None, "dynamicvit") is vit
    assert single_backbone(holder, "evit") is vit
    assert resolve_backbone(holder, "net", "dynamicvit") is vit  # an attribute path
    assert resolve_backbone(holder, vit, "dynamicvit") is vit  # the module object


def test_resolve_backbone_refuses_several_and_single_backbone_gives_none():
    holder = Holder(student=tm.timm_vit(depth=1), teacher=tm.timm_vit(depth=1))
    with pytest.raises(ValueError, match="student, teacher each hold an image tower; pass module= one of"):
        resolve_backbone(holder, None, "dynamicvit")
    assert single_backbone(holder, "lst") is None  # init_from then loads into the whole module


def test_resolve_backbone_names_the_calling_method_when_nothing_holds_a_tower():
    holder = Holder(conv=nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="no child of Holder holds a supported image tower.*EViT supports: "):
        single_backbone(holder, "evit")
    with pytest.raises(TypeError, match="DynamicViT supports: "):
        resolve_backbone(holder, None, "dynamicvit")


def _trainer(configs, global_step=0, current_epoch=0, metrics=None):
    return SimpleNamespace(
        strategy=SimpleNamespace(lr_scheduler_configs=configs),
        global_step=global_step,
        current_epoch=current_epoch,
        callback_metrics=metrics or {},
    )


def _lrs(*schedulers):
    return [s.optimizer.param_groups[0]["lr"] for s in schedulers]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_step_lr_schedulers_follows_interval_and_frequency():
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    per_step = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([p], lr=1.0), step_size=1, gamma=0.5)
    every_2_steps = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([p], lr=1.0), step_size=1, gamma=0.5)
    per_epoch = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([p], lr=1.0), step_size=1, gamma=0.5)
    configs = [
        LRSchedulerConfig(per_step, interval="step"),
        LRSchedulerConfig(every_2_steps, interval="step", frequency=2),
        LRSchedulerConfig(per_epoch, interval="epoch"),
    ]
    step_lr_schedulers(_trainer(configs, global_step=1), "step")  # 1 % 2 != 0: the second waits
    assert _lrs(per_step, every_2_steps, per_epoch) == [0.5, 1.0, 1.0]
    step_lr_schedulers(_trainer(configs, global_step=2), "step")
    assert _lrs(per_step, every_2_steps, per_epoch) == [0.25, 0.5, 1.0]
    step_lr_schedulers(_trainer(configs, current_epoch=0), "epoch")  # the first epoch has ended
    assert _lrs(per_step, every_2_steps, per_epoch) == [0.25, 0.5, 0.5]
    with pytest.raises(ValueError, match="interval='batch' is not allowed; use 'step' or 'epoch'"):
        step_lr_schedulers(_trainer(configs), "batch")  # type: ignore[arg-type]


def test_step_lr_schedulers_gives_plateau_its_metric_and_waits_without_it():
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([p], lr=1.0), patience=0, factor=0.5)
    configs = [LRSchedulerConfig(plateau, interval="epoch", reduce_on_plateau=True, monitor="val/loss")]
    step_lr_schedulers(_trainer(configs), "epoch")  # not logged yet: not stepped
    assert plateau.last_epoch == 0
    for _ in range(2):  # the first sets the best, the second is a bad epoch: patience 0 halves the rate
        step_lr_schedulers(_trainer(configs, metrics={"val/loss": torch.tensor(1.0)}), "epoch")
    assert plateau.last_epoch == 2 and plateau.optimizer.param_groups[0]["lr"] == 0.5


def test_no_callback_imports_another_callbacks_private_names():
    root = Path(vleff.__file__).parent / "callbacks"
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("vleff.callbacks.")
                and node.module != "vleff.lightning.mixin"
            ):  # the mixins' own shared base
                bad += [
                    f"{path.relative_to(root)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert not bad, bad
