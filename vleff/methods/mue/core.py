"""MuE: similarity-based early exit, "You Need Multiple Exiting" (Tang et al., CVPR 2023).

After block ``l`` a sample leaves the tower when its tokens barely changed:
``cos(flatten(h_l), flatten(h_{l-1})) > threshold`` (strict), with ``h_l`` the block's output and
``h_{l-1}`` its input (the embeddings for the first block), flattened over the sample's tokens and
channels. A sample that exited keeps its tokens: the remaining blocks pass them unchanged, and the
tower's final norm, pooling and head read the exited state (MuE applies the final LayerNorm to
whatever layer exited). Image and text towers have their own threshold, as MuE's image and text
streams do. No parameters; exits only in inference (``model.eval()``), as the reference's
``is_train=False``; in training the hook computes nothing.

vleff decides **per sample** where the official code (``Tangshengku/OFA``,
``TransformerEncoder_MuE``) takes one cosine over the whole batch tensor, so its batch exits
together (``docs/fidelity.md``). The batch keeps running only the samples that have not exited:
the hook answers :meth:`~vleff.backbones.TowerHook.running_samples`, and the patched forward runs
each block on those samples' rows alone (no compute for the exited ones in eager mode; FLOPs
counted by :mod:`vleff.profile` are those of the blocks each sample ran).

A threshold of 1.0 (the reference's default) never exits: the library's forward exactly (vleff
also does not exit at a cosine that rounds above 1). Causal decoders (BLIP's text decoder,
captioning) are refused at apply: MuE's decoder exit is per generated token, filling the skipped
layers' key/value cache with the exit layer's, which vleff does not implement; a whole-sequence
exit would make earlier positions depend on later tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerHook, find_towers, get_patch
from vleff.backbones.text import runs_as_causal_decoder
from vleff.checks import check_number, check_towers
from vleff.registry import MethodConfig
from vleff.tokens.common import hooks_named, install_hooks, remove_hooks, select_towers

HOOK_NAME = "mue"
TOWERS = ("image", "text")


@dataclass
class MuEConfig(MethodConfig):
    """MuE's settings (defaults: the reference's, 1.0 = never exit).

    Attributes:
        image_threshold: a sample leaves an image tower after the first block whose output has a
            cosine similarity above this with its input (shipped: 0.99 captioning, 0.7 SNLI-VE).
            Allowed: ``[-1, 1]``, the cosine's range (``-1``: every sample leaves after its first
            block; a block can turn its input's direction, so ``0`` does not guarantee that).
        text_threshold: the same for text towers (shipped: 0.7 captioning, 0.99 SNLI-VE).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "mue"
    image_threshold: float = 1.0
    text_threshold: float = 1.0
    towers: str = "image"

    def __post_init__(self) -> None:
        self.image_threshold = check_number("image_threshold", self.image_threshold, low=-1, high=1, owner="MuE")
        self.text_threshold = check_number("text_threshold", self.text_threshold, low=-1, high=1, owner="MuE")
        check_towers(self.towers, TOWERS)


def sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B]`` cosine similarity of each sample's flattened tokens (at least float32)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.flatten(1).to(dtype), b.flatten(1).to(dtype)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


class MuEHook(TowerHook):
    """Per-sample early exit on one tower (see the module docstring).

    Per forward (inference, threshold below 1) the token state's scratch holds, under ``"mue"``,
    ``exited`` (``[B]`` bool) and ``blocks`` (``[B]``: how many blocks each sample ran)."""

    name = HOOK_NAME
    replayable = True  # decisions live in the token state; a replay starts from the recorded copy

    def __init__(self, config: MuEConfig, depth: int, modality: str) -> None:
        self.config, self.depth, self.modality = config, depth, modality
        #: while :func:`mue_budget_steps` traces: every cosine a running sample reached (no exits)
        self.trace: list[torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["trace"] = None  # per-forward: a copy of the model does not carry a trace along
        return state

    def configure(self, config: MuEConfig) -> None:
        self.config = config

    @property
    def threshold(self) -> float:
        return self.config.image_threshold if self.modality == "image" else self.config.text_threshold

    def exits(self, block: nn.Module | None) -> bool:
        """Whether this forward may exit (inference, and a threshold below 1), or is traced."""
        return (self.threshold < 1.0 or self.trace is not None) and block is not None and not block.training

    def running_samples(self, index: int, state: TokenState) -> torch.Tensor | None:
        record = state.scratch.get(HOOK_NAME)
        return None if record is None else ~record["exited"]

    def before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if info.index == 0 and state.rows is None and self.exits(info.block):
            if torch.compiler.is_exporting():
                raise RuntimeError(
                    f"torch.export cannot take MuE on the {self.modality} tower: which samples run each block "
                    "depends on the data (each exits when its tokens stop changing), and an exported graph "
                    "needs it fixed. Export with MuE removed (vleff.remove_mue) or with its threshold at 1.0"
                )
            if runs_as_causal_decoder(state):
                raise RuntimeError(
                    "MuE cannot exit a text tower that runs as a causal decoder (is_decoder=True, e.g. BLIP's "
                    "text_decoder): MuE's decoder exit is per generated token with the key/value cache of the "
                    "skipped layers filled from the exit layer, which vleff does not implement. Apply MuE to the "
                    "image tower or a text encoder"
                )
            b = x.shape[0]
            state.scratch[HOOK_NAME] = {
                "exited": torch.zeros(b, dtype=torch.bool, device=x.device),
                "blocks": torch.full((b,), self.depth, dtype=torch.long, device=x.device),
            }
        record = state.scratch.get(HOOK_NAME)
        if record is not None and info.index < self.depth - 1:
            record["input"] = x
        return x

    def after(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        record = state.scratch.get(HOOK_NAME)
        if record is None or "input" not in record:
            return x
        previous = record.pop("input")
        cosine = sample_cosine(x, previous)
        if self.trace is not None:  # traced: record, never exit (every sample reaches every block)
            self.trace.append(cosine.detach().cpu())
            return x
        leave = cosine > self.threshold
        rows = state.rows if state.rows is not None else torch.arange(x.shape[0], device=x.device)
        gone = rows[leave]
        record["exited"] = record["exited"].index_fill(0, gone, True)
        record["blocks"] = record["blocks"].index_fill(0, gone, info.index + 1)
        return x


def apply_mue(model: nn.Module, config: MuEConfig | None = None, **settings: Any) -> nn.Module:
    """MuE on every tower of ``model`` that ``towers`` names (in place); applying twice replaces the
    earlier settings. ``ValueError`` for a bad setting or a causal decoder tower."""
    cfg = MuEConfig.build(config, **settings)
    towers = select_towers(model, cfg.towers)
    for tower in towers:
        if tower.modality == "text" and tower.causal_decoder_in(model):
            raise ValueError(
                f"towers={cfg.towers!r}: MuE cannot exit {tower.describe()}: {type(model).__name__} runs it as a "
                "causal decoder (a prediction at every position). MuE's decoder exit is per generated token, with "
                "the skipped layers' key/value cache filled from the exit layer, which vleff does not implement; "
                "an exit decided on the whole sequence would make earlier positions depend on later tokens. Use "
                "towers='image', or apply MuE to the text encoder alone (e.g. model.text_encoder)"
            )
    if hooks_named(model, HOOK_NAME):
        remove_mue(model)
    install_hooks(model, lambda tower: MuEHook(cfg, len(tower.blocks()), tower.modality), cfg.towers)
    return model


def remove_mue(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_mue`: the towers run the library's own forward again."""
    if remove_hooks(model, HOOK_NAME) == 0:
        raise ValueError(f"MuE is not applied to this {type(model).__name__}; nothing to remove")
    return model


def update_mue(model: nn.Module, **changes: Any) -> None:
    """Change the thresholds of an applied MuE (no re-patching); ``towers`` cannot change."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"MuE is not applied to this {type(model).__name__}; call apply_mue first")
    new = hooks[0].config.replace(**changes)
    if new.towers != hooks[0].config.towers:
        raise ValueError(f"towers cannot change on an applied MuE ({hooks[0].config.towers!r} -> {new.towers!r})")
    for hook in hooks:
        hook.configure(new)


def mue_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def mue_exit_blocks(model: nn.Module) -> dict[str, torch.Tensor]:
    """How many blocks each sample ran in the latest forward, by tower modality (``[B]`` long; every
    block when that forward did not exit: training, or threshold 1.0). Towers without MuE are left out."""
    out: dict[str, torch.Tensor] = {}
    for tower in find_towers(model):
        patch = get_patch(tower.root)
        hook = patch.get_hook(HOOK_NAME) if patch is not None else None
        if hook is None or patch.state is None:
            continue
        record = patch.state.scratch.get(HOOK_NAME)
        depth = len(tower.blocks())
        out[tower.modality] = (
            record["blocks"] if record is not None else torch.full((patch.state.batch_size,), depth, dtype=torch.long)
        )
    return out


def mue_budget_steps(model: nn.Module, batches: list[Any], forward: Any) -> list[dict[str, Any]]:
    """The thresholds at which the FLOPs of ``model`` on ``batches`` change, from none exiting (1.0)
    to every sample leaving after its first block (-1.0), as ``update`` settings of every tower MuE
    is on (one threshold for the whole model): :attr:`vleff.registry.Budget.steps`.

    A sample's cosines do not depend on the threshold (it runs its blocks as it would alone until it
    leaves), so one traced forward that exits nothing gives every cosine that can decide an exit; a
    step lets the next highest one pass ``cos > threshold``, and a lower threshold never runs more
    blocks."""
    from vleff.budget import run_batches, thresholds_between

    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"MuE is not applied to this {type(model).__name__}; call apply_mue first")
    for hook in hooks:
        hook.trace = []
    try:
        run_batches(model, batches, forward)
        cosines = [float(c) for hook in hooks for t in hook.trace or [] for c in t.tolist()]
    finally:
        for hook in hooks:
            hook.trace = None
    keys = [k for k, on in (("image_threshold", "image"), ("text_threshold", "text")) if on in _modalities(hooks)]
    return [dict.fromkeys(keys, t) for t in thresholds_between(cosines, low=-1.0, high=1.0)]


def _modalities(hooks: list[MuEHook]) -> set[str]:
    return {hook.modality for hook in hooks}
