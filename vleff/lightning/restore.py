"""Loading a callback-trained checkpoint into a freshly built module: ``restore_methods``.

Why: a callback applies its method in ``setup``, so the checkpoints it leaves hold the method's
parameters (``vleff_madtp.*``, ``vleff_memvp.*``, CrossGET's offsets, side modules, LoRA
adapters). ``MyModule.load_from_checkpoint(path)`` builds the module *without* the callback:
its ``load_state_dict`` meets keys it does not have (and, for a side-only checkpoint, misses
every backbone key) and fails with PyTorch's generic key error. Lightning calls the module's
``on_load_checkpoint(checkpoint)`` after building it and before loading the weights, so one
line there makes it work:

>>> class MyModule(L.LightningModule):
...     def on_load_checkpoint(self, checkpoint):
...         vleff.callbacks.restore_methods(self, checkpoint)
>>> model = MyModule.load_from_checkpoint(path)   # the trained method, exactly

Every method callback records what it applied, where and with which settings in the checkpoint
(:func:`record_method`, key ``"vleff_methods"``); :func:`restore_methods` applies each recorded
method that is not applied yet with those settings, and for a side-only checkpoint fills the
backbone entries from the freshly built module (the same pretrained backbone, as a resume
assumes). Without that hook: apply the method first (``vleff.apply_X(model.<backbone>, ...)``
with the training settings), then ``load_state_dict`` (``strict=False`` for a side-only one).
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: the checkpoint key holding the callbacks' records
RECORD_KEY = "vleff_methods"


#: the checkpoint key listing the keys a side-only checkpoint keeps (the frozen backbone left out)
SIDE_ONLY = "vleff_side_only"
#: the checkpoint key listing the keys a peft tuner's adapter-only checkpoint keeps (its frozen
#: base weights left out; :mod:`vleff.lightning.peft`)
ADAPTERS_ONLY = "vleff_peft_adapters_only"


def _path_in(pl_module: nn.Module, target: nn.Module) -> str:
    for name, module in pl_module.named_modules(remove_duplicate=False):
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not part of {type(pl_module).__name__}")


def record_method(
    checkpoint: dict[str, Any], pl_module: nn.Module, target: nn.Module | None, method: str, config: Any
) -> None:
    """Note in ``checkpoint`` that ``method`` was applied to ``target`` (a submodule of
    ``pl_module``; ``None``: the module itself) with ``config`` (a method config dataclass)."""
    path = "" if target is None else _path_in(pl_module, target)
    records = [r for r in checkpoint.get(RECORD_KEY, []) if (r["method"], r["module"]) != (method, path)]
    # a callable setting (DynamicViT's logits_fn) is code, not a setting a checkpoint can hold
    settings = {k: v for k, v in config.as_dict().items() if not callable(v)}
    records.append({"method": method, "module": path, "settings": settings})
    checkpoint[RECORD_KEY] = records


def restore_methods(module: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Apply to ``module`` every method a callback recorded in ``checkpoint`` and that is not
    applied yet (same place, same settings), and complete a side-only checkpoint's
    ``state_dict`` with ``module``'s own backbone entries; returns the methods applied.

    Call it from the module's ``on_load_checkpoint`` (see the module docstring) so that
    ``load_from_checkpoint`` loads the trained method exactly. A checkpoint without records
    (saved before callbacks recorded them, or by no vleff callback) changes nothing."""
    from vleff.lightning.targets import method_label, module_at
    from vleff.registry import get_method

    applied = []
    for record in checkpoint.get(RECORD_KEY, []):
        method, path, settings = record["method"], record["module"], dict(record["settings"])
        target = module_at(module, path) if path else module
        entry = get_method(method)
        if entry.is_applied(target):
            continue
        if entry.reapply_settings is not None:
            settings = entry.reapply_settings(settings)
        try:
            entry.apply(target, entry.config.build(**settings))
        except (TypeError, ValueError) as err:
            label = method_label(method)
            raise ValueError(
                f"the checkpoint was trained with {label} on {path or 'the module'} "
                f"({settings}), which cannot be applied to this {type(module).__name__} ({err}); build "
                "the module as it was trained"
            ) from err
        applied.append(method)
    if ADAPTERS_ONLY in checkpoint:  # a peft tuner's adapter-only checkpoint: the base from the module
        state = checkpoint.get("state_dict", {})
        for key, value in module.state_dict().items():
            state.setdefault(key, value)
    if SIDE_ONLY in checkpoint:
        from vleff.side.common import backbone_keys, side_towers

        state = checkpoint.get("state_dict", {})
        if side_towers(module):
            own = module.state_dict()
            for key in backbone_keys(module):
                state.setdefault(key, own[key])
    return applied
