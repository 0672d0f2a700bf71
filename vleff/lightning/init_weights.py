"""Start a run from trained weights: ``init_from=<checkpoint>`` on a callback.

DynamicViT and EViT are meant to fine-tune a trained model, the side methods and LoRA tune
beside a trained backbone, and every callback of a method that changes the model takes the option
(:class:`InitFromOption`, its one implementation). When the LightningModule's
``__init__`` does not load trained weights itself (a randomly initialised model built from a
config, as in ``vleff-train``), the callback can load them in ``setup`` — before its surgery,
so the DynamicViT teacher is the trained model and not the random one.

This is not a resume: optimizer, schedule and step start fresh (use ``Trainer.fit(ckpt_path=...)``
to resume a run). A resumed run restores its own weights after ``setup`` and so overrides
these.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vleff.lightning.targets import single_backbone

# submodules that token methods add; weights saved from a method run may carry them
METHOD_PARAM_PREFIXES = ("vleff_",)


def _is_method_key(key: str) -> bool:
    return any(part.startswith(METHOD_PARAM_PREFIXES) for part in key.split("."))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors saved at ``path``: a Lightning checkpoint (its ``state_dict``) or a plain
    ``state_dict`` file. Lightning checkpoints hold pickled objects (hyper-parameters), so only
    load files you trust."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_from={str(path)!r}: no such checkpoint file")
    obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"init_from={str(path)!r} is neither a Lightning checkpoint nor a state_dict")
    return dict(obj)


def load_initial_weights(pl_module: nn.Module, path: str | Path, backbone: nn.Module | None = None) -> str:
    """Load the weights at ``path`` into ``pl_module`` (keys as the LightningModule names them)
    or, failing that, into ``backbone`` (a bare model's ``state_dict``). Keys of method
    submodules (``vleff_*``, e.g. DynamicViT predictors) are ignored; any other mismatch raises.
    Returns ``"module"`` or ``"backbone"``: where the weights went."""
    weights = {k: v for k, v in read_state_dict(path).items() if not _is_method_key(k)}
    targets = [("module", pl_module)] + ([("backbone", backbone)] if backbone is not None else [])
    problems = []
    for where, target in targets:
        expected = {k for k in target.state_dict() if not _is_method_key(k)}
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if not missing and not unexpected:
            target.load_state_dict(weights, strict=False)
            return where
        problems.append(
            f"as the {where} ({type(target).__name__}): {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    raise ValueError(f"init_from={str(path)!r} does not fit: " + "; ".join(problems))


def _load_target(pl_module: nn.Module, target: nn.Module, method: str) -> nn.Module | None:
    """Where a bare model's ``state_dict`` goes: the model the method acts on, or, when that is
    the whole LightningModule, its one backbone (:func:`vleff.lightning.targets.single_backbone`;
    ``None`` when it has none or several)."""
    if target is not pl_module:
        return target
    try:
        return single_backbone(pl_module, method)
    except TypeError:  # no child holds an image tower (a vision-language host, a pair)
        return None


class InitFromOption:
    """The ``init_from`` option of a method callback, written once: a Lightning checkpoint or
    ``state_dict`` file loaded into the module (or, with a bare model's keys, into the model the
    method acts on) at the start of the first ``fit``, before the method is applied — fine-tuning a
    trained model, not resuming (:func:`vleff.lightning.init_weights.load_initial_weights`)."""

    method: str = ""

    def init_initial(self, init_from: str | None) -> None:
        self.init_from = None if init_from is None else str(init_from)
        self._initialised = False

    def load_initial_once(self, pl_module: nn.Module, target: nn.Module, stage: str) -> None:
        """Load once per callback: a second ``fit`` (after ``remove_on_teardown``) keeps what
        the first trained instead of loading the initial weights over it."""
        if stage == "fit" and self.init_from is not None and not self._initialised:
            load_initial_weights(pl_module, self.init_from, backbone=_load_target(pl_module, target, self.method))
            self._initialised = True
