"""Install the generic block forward on a tower, and the hooks token methods add to it.

``patch_tower(adapter)`` replaces each block's ``forward`` by an instance attribute that
calls :func:`vleff.backbones.block.run_block`; ``unpatch_tower`` deletes it, which restores
the class's own ``forward`` exactly. Weights, parameter names and ``state_dict`` never change.
A :class:`TowerPatch` is stored on the tower root as ``_vleff_patch``; it owns the hooks and
the token state of the latest forward.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vleff.backbones.base import LAYOUTS, CrossInputs, TowerAdapter
from vleff.backbones.block import run_block, run_post_norm_block
from vleff.backbones.hooks import TowerHook
from vleff.backbones.state import TokenState

PATCH_ATTR = "_vleff_patch"
#: set on a tower's root (to the method's name) by a method that runs the tower's blocks itself,
#: as reversible stacks do: the generic block forward, and with it every tower hook, would not run
BLOCK_RUNNER_ATTR = "_vleff_block_runner"

#: why two methods (named by their hooks) cannot share a tower of a family, or ``None``. The
#: registry installs its rule here when it is imported (:func:`vleff.registry.conflict`, the
#: methods' declared refusals): the backbone layer asks it without knowing any method.
MethodConflictRule = Callable[[str, str, str], "str | None"]
_method_conflict_rule: MethodConflictRule | None = None


def set_method_conflict_rule(rule: MethodConflictRule | None) -> None:
    """Install the rule :func:`check_attachable` asks before any hook's own ``conflict_with``."""
    global _method_conflict_rule
    _method_conflict_rule = rule


#: forwards whose block entries are kept for replay: gradient accumulation or two losses may run
#: several forwards before one backward; the newest entries are searched first
REPLAY_FORWARDS = 8
#: a recorded block entry: ``(block index, input data pointer, input shape)``
EntryKey = tuple[int, int, tuple[int, ...]]
#: what a replay starts from: the token state the block started from, whether (the first block)
#: the hooks' ``start`` left the tower's input unchanged, and otherwise what each running hook's
#: ``start`` read besides its arguments (:meth:`TowerHook.forward_inputs`), to run it again
Entry = tuple[TokenState, bool, list[Any] | None]


def in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread: where gradient
    checkpointing recomputes blocks (re-entrant and non-re-entrant alike)."""
    return torch._C._current_graph_task_id() != -1


def checkpoint_refusal(adapter: TowerAdapter, names: list[str]) -> str:
    return (
        f"{adapter.describe()} has gradient checkpointing on, which recomputes blocks in backward; the methods "
        f"applied ({', '.join(names)}) cannot replay a block from its inputs (they read state another tower or "
        "an earlier step left). Turn it off (timm: model.set_grad_checkpointing(False); open_clip: "
        "model.set_grad_checkpointing(False); Hugging Face: model.activation_checkpointing_disable(), "
        "gradient_checkpointing_disable() before transformers 5.24) or run "
        "without gradients"
    )


class TowerPatch:
    """The generic forward installed on one tower: adapter, hooks, and the last token state."""

    def __init__(self, adapter: TowerAdapter) -> None:
        self.adapter = adapter
        self.hooks: list[TowerHook] = []
        self.state: TokenState | None = None
        #: text towers: the tower-level hook that keeps causal order, padding and the EOT
        #: right under reductions (:mod:`vleff.backbones.text`); runs before every method hook
        self.layout: TowerHook | None = None
        self._ids_hook: tuple[nn.Module, int] | None = None
        #: the per-step context both towers of a model pair share (:meth:`vleff.backbones.pairs.ModelPair.context`);
        #: each forward started while it is set records its token state there
        self.context = None
        #: block entries of the latest forwards that ran with checkpointing on (for replay):
        #: the token state each block started from (``None`` for block 0: a fresh start)
        self._recordings: deque[dict[EntryKey, Entry]] = deque(maxlen=REPLAY_FORWARDS)
        self._recording: dict[EntryKey, Entry] | None = None
        self._start_inputs: list[Any] = []  # the running hooks' forward inputs at the latest start

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_recordings"], state["_recording"] = deque(maxlen=REPLAY_FORWARDS), None  # per-forward
        state["_start_inputs"] = []
        state["state"] = None  # the latest forward's token state (a method's records): per-forward
        return state

    @property
    def running_hooks(self) -> list[TowerHook]:
        """The hooks a forward runs: the tower's layout hook (text towers), then the methods'."""
        return ([self.layout] if self.layout is not None else []) + self.hooks

    # --- hooks -------------------------------------------------------------------------
    def add_hook(self, hook: TowerHook) -> None:
        if not isinstance(hook, TowerHook):
            raise TypeError(f"hook must be a vleff.backbones.TowerHook, got {type(hook).__name__}")
        if any(h.name == hook.name for h in self.hooks):
            raise ValueError(f"{self.adapter.describe()} already has a {hook.name!r} hook; remove it first")
        check_attachable(self.adapter, hook)
        self.hooks.append(hook)

    def remove_hook(self, name: str) -> TowerHook | None:
        for i, hook in enumerate(self.hooks):
            if hook.name == name:
                return self.hooks.pop(i)
        return None

    def get_hook(self, name: str) -> TowerHook | None:
        return next((h for h in self.hooks if h.name == name), None)

    # --- forward -------------------------------------------------------------------------
    def _start(self, x: torch.Tensor, replay: bool = False) -> tuple[torch.Tensor, TokenState]:
        if x.shape[0] == 0:
            # the hooks' per-sample work (matching, top-k, thresholds, side layers) has no sample to
            # run on; refused here, once for every method, rather than failing deep inside one
            raise ValueError(
                f"{self.adapter.describe()} got a batch of 0 samples (input shape {tuple(x.shape)}) "
                f"with {', '.join(h.name for h in self.running_hooks) or 'vleff hooks'} applied; "
                "allowed: a batch of at least 1 sample (skip empty batches before the forward)"
            )
        state = TokenState(
            num_prefix=self.adapter.num_prefix_tokens,
            num_input_tokens=x.shape[1],
            num_tokens=x.shape[1],
            batch_size=x.shape[0],
            replaying=replay,
        )
        if not replay:
            # a forward that will be recomputed in backward: gradients on (non-re-entrant), or an
            # input that needs them (re-entrant checkpointing runs the forward without gradients)
            # a forward the library may recompute in backward (the flag's walk only when training)
            training = torch.is_grad_enabled() or x.requires_grad or self.adapter.root.training
            recomputed = training and not torch.compiler.is_compiling() and self.adapter.gradient_checkpointing()
            if recomputed:
                self._check_replayable(x)
                # what the hooks' start reads besides x, before start consumes it (a replay of the
                # first block runs start again); only a recorded forward keeps it
                self._start_inputs = [h.forward_inputs() for h in self.running_hooks]
            self._recording = {} if recomputed else None
            if self._recording is not None:
                self._recordings.append(self._recording)
            self.state = state
            if self.context is not None:
                self.context.attach(self.adapter.modality, state)
        for hook in self.running_hooks:
            x = hook.start(x, state)
        return x, state

    def _check_replayable(self, x: torch.Tensor) -> None:
        """Refuse a forward that checkpointing will recompute when a hook cannot replay, or when
        re-entrant checkpointing (the forward runs without gradients although the tower trains)
        would cut the gradients a hook hands out of the blocks."""
        hooks = self.running_hooks
        unreplayable = [h.name for h in hooks if not h.replayable]
        if unreplayable and (torch.is_grad_enabled() or x.requires_grad):
            raise RuntimeError(checkpoint_refusal(self.adapter, unreplayable))
        exporting = [h.name for h in hooks if h.side_outputs]
        if exporting and not torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.adapter.describe()} runs a training forward without gradients under gradient checkpointing "
                f"(re-entrant checkpointing does that): {', '.join(exporting)} hands tensors that need gradients out "
                "of the blocks, which would get none. Use non-re-entrant checkpointing (timm: "
                "timm.layers.set_reentrant_ckpt(False); Hugging Face: model.activation_checkpointing_enable("
                "activation_checkpointing_kwargs={'use_reentrant': False}), gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs=...) before transformers 5.24; open_clip's is) or put the model in "
                "eval()"
            )

    def run(
        self,
        index: int,
        depth: int,
        block: nn.Module,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cross: CrossInputs | None = None,
    ) -> torch.Tensor:
        """One block of the tower; ``cross`` (post-norm towers) carries the image embeddings,
        their mask and the cache. The block body follows the adapter's layout.

        Replay: with gradient checkpointing, the library calls a block again in backward with the
        same input. The block then runs from a copy of the token state it started from in the
        forward (recorded by its input's storage and shape), so the recomputation is the forward's
        exactly and leaves the forward's state (and everything read from it) untouched."""
        # the entry key is built only where recordings exist (never under torch.compile, whose
        # graphs recompute on their own terms): the plain forward pays nothing for replay
        if self._recordings and not torch.compiler.is_compiling() and in_backward():
            key: EntryKey = (index, x.data_ptr(), tuple(x.shape))
            entry = next((rec[key] for rec in reversed(self._recordings) if key in rec), _MISSING)
            if entry is not _MISSING:
                return self._replay(index, depth, block, x, mask, is_causal, cross, entry)
        x_in = x
        if index == 0 or self.state is None:
            x, state = self._start(x)  # decides whether this forward is recorded
        else:
            state = self.state
        if self._recording is not None:
            same = x is x_in
            inputs = None if same else self._start_inputs
            self._recording[(index, x_in.data_ptr(), tuple(x_in.shape))] = (state.snapshot(), same, inputs)
        return self._run(index, depth, block, x, mask, is_causal, cross, state)

    def _replay(
        self,
        index: int,
        depth: int,
        block: nn.Module,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cross: CrossInputs | None,
        entry: Entry,
    ) -> torch.Tensor:
        recorded, same_input, inputs = entry
        if same_input:  # the state the block started from; x as the library passes it
            state = recorded.snapshot()
            state.replaying = True
        else:  # the first block, whose hooks changed x at the start: start again (in a fresh state)
            for hook, value in zip(self.running_hooks, inputs or (), strict=True):
                hook.restore_forward_inputs(value)
            x, state = self._start(x, replay=True)
        return self._run(index, depth, block, x, mask, is_causal, cross, state)

    def _run(
        self,
        index: int,
        depth: int,
        block: nn.Module,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cross: CrossInputs | None,
        state: TokenState,
    ) -> torch.Tensor:
        running = self._running_samples(index, state)
        if running is None:
            x = self._block(index, depth, block, x, mask, is_causal, cross, state)
        elif bool(running.any()):  # part of the batch runs the block; the others pass it unchanged
            rows = running.nonzero().squeeze(1)
            view = state.rows_view(rows)
            batch = x.shape[0]
            skipped = self._skipped_cache(index, block, x, cross, running, state)
            sub_cross = (
                None
                if cross is None
                else CrossInputs(
                    _rows_of(cross.encoder_hidden_states, rows, batch),
                    _rows_of(cross.encoder_attention_mask, rows, batch),
                    cross.cache,
                    rows if skipped is not None else None,
                    skipped,
                )
            )
            out = self._block(index, depth, block, x[rows], _rows_of(mask, rows, batch), is_causal, sub_cross, view)
            state.absorb_rows(view)
            x = x.index_copy(0, rows, out.to(x.dtype))
        elif cross is not None and cross.cache is not None:  # no sample runs it: the cache still grows
            skipped = self._skipped_cache(index, block, x, cross, running, state)
            assert skipped is not None
            self.adapter.append_cache(cross.cache, block, skipped[1], skipped[2])
        if index == depth - 1:
            for hook in self.hooks:
                x = hook.finish(x, state)
            if self.layout is not None:  # last: restores the input layout the library pools from
                x = self.layout.finish(x, state)
        return x

    def _skipped_cache(
        self,
        index: int,
        block: nn.Module,
        x: torch.Tensor,
        cross: CrossInputs | None,
        running: torch.Tensor,
        state: TokenState,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Under the library's key/value cache: the rows that skip block ``index`` and their cache
        entries for this forward's positions (:meth:`TowerHook.skipped_cache`); ``None`` without one."""
        if cross is None or cross.cache is None:
            return None
        skipped = (~running).nonzero().squeeze(1)
        for hook in self.running_hooks:
            entries = hook.skipped_cache(index, self.adapter, cross.cache, skipped, x.shape[1], state)
            if entries is not None:
                return skipped, entries[0], entries[1]
        raise RuntimeError(
            f"{self.adapter.describe()}: block {index} runs on part of the batch while the library runs with a "
            "key/value cache (generation), whose entries hold every sample, and no method says what the skipped "
            "samples' entries are; pass use_cache=False or remove the method that exits samples early"
        )

    def _running_samples(self, index: int, state: TokenState) -> torch.Tensor | None:
        """``[B]`` bool: the samples that run block ``index`` (every hook's
        :meth:`TowerHook.running_samples` ANDed), or ``None`` when all of them do."""
        running = None
        for hook in self.running_hooks:
            mask = hook.running_samples(index, state)
            if mask is not None:
                running = mask if running is None else running & mask
        if running is None or bool(running.all()):
            return None
        return running

    def _block(
        self,
        index: int,
        depth: int,
        block: nn.Module,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cross: CrossInputs | None,
        state: TokenState,
    ) -> torch.Tensor:
        if self.adapter.layout == "post_norm_cross":
            x = run_post_norm_block(
                self.adapter,
                state,
                self.running_hooks,
                block,
                index,
                depth,
                x,
                mask,
                is_causal,
                cross if cross is not None else CrossInputs(),
            )
        else:
            x = run_block(self.adapter, state, self.running_hooks, block, index, depth, x, mask, is_causal)
        return x


def _rows_of(t: torch.Tensor | None, rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Rows ``rows`` of a per-sample tensor (a mask or cross-attention input ``[B, ...]``, 3 or more
    dims); a tensor shared by every sample (``[N, N]`` causal mask, batch dimension 1) as it is."""
    if t is None or t.dim() < 3 or t.shape[0] != batch:
        return t
    return t[rows]


class PatchedForward:
    """The replacement ``forward`` of one block (an object, so ``deepcopy`` and pickling of the
    model copy it along with the patch instead of pointing at the original model)."""

    def __init__(self, patch: TowerPatch, index: int, depth: int, block: nn.Module) -> None:
        self.patch, self.index, self.depth, self.block = patch, index, depth, block

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        adapter = self.patch.adapter
        if any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            raise TypeError(
                refusal_message(
                    adapter, "torch.fx symbolic tracing (and torchvision's create_feature_extractor, which uses it)"
                )
            )
        checkpoint = adapter.block_checkpoint(self.block)
        if checkpoint is not None:  # the library checkpoints in the forward this one replaced
            return checkpoint(functools.partial(self._forward, **kwargs), *args)
        return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs) -> torch.Tensor:
        adapter = self.patch.adapter
        x, mask, is_causal = adapter.block_inputs(self.block, *args, **kwargs)
        if adapter.layout == "post_norm_cross":
            cross = adapter.cross_inputs(self.block, *args, **kwargs)
            return self.patch.run(self.index, self.depth, self.block, x, mask, is_causal, cross)
        if adapter.sequence_first:
            x = x.transpose(0, 1)
        out = self.patch.run(self.index, self.depth, self.block, x, mask, is_causal)
        return out.transpose(0, 1) if adapter.sequence_first else out


def refusal_message(adapter: TowerAdapter, what: str) -> str:
    """Why ``what`` cannot take a tower vleff patched, and what to use instead."""
    return (
        f"{what} cannot take {adapter.describe()}: vleff replaced its blocks' forward (the token state and its "
        "control flow are Python, not a traceable graph). Export the patched model with torch.export.export or "
        "compile it with torch.compile; or remove vleff's methods first (vleff.registry.remove_all(model)) to "
        "script or trace the library model"
    )


class RefuseScripting:
    """Set as a patched block's ``__prepare_scriptable__``: ``torch.jit.script`` calls it on every
    submodule before compiling, so scripting a patched model stops here with vleff's reason instead
    of TorchScript's "'PatchedForward' object has no attribute '__globals__'". TorchScript is
    deprecated upstream; the export paths that work are named in the message."""

    def __init__(self, adapter: TowerAdapter) -> None:
        self.adapter = adapter

    def __call__(self) -> nn.Module:
        raise TypeError(refusal_message(self.adapter, "torch.jit.script"))


SCRIPT_ATTR = "__prepare_scriptable__"


_MISSING = object()


def get_patch(root: nn.Module) -> TowerPatch | None:
    return root.__dict__.get(PATCH_ATTR)


def set_block_runner(root: nn.Module, method: str | None) -> None:
    """Mark ``root``'s tower as run block by block by ``method`` (``None``: unmark)."""
    if method is None:
        root.__dict__.pop(BLOCK_RUNNER_ATTR, None)
    else:
        root.__dict__[BLOCK_RUNNER_ATTR] = method


def check_attachable(adapter: TowerAdapter, hook: TowerHook) -> None:
    """``ValueError`` when ``hook`` cannot join ``adapter``'s tower: a method runs the tower's
    blocks itself (the hook would be skipped), or a hook already there conflicts with it: by the
    methods' declared rules (the registry's, see :func:`set_method_conflict_rule`), else by either
    hook's own :meth:`TowerHook.conflict_with` (for hooks that are no registered method). Methods check every tower
    before patching any, so a
    refusal leaves the model as it was."""
    unsupported = adapter.unsupported_reason()
    if unsupported:
        raise TypeError(f"cannot apply {hook.name} to {adapter.describe()}: {unsupported}")
    if not hook.replayable and adapter.gradient_checkpointing():
        raise ValueError(f"cannot apply {hook.name}: {checkpoint_refusal(adapter, [hook.name])}")
    runner = adapter.root.__dict__.get(BLOCK_RUNNER_ATTR)
    if runner is not None:
        raise ValueError(
            f"cannot apply {hook.name} while {runner} is applied to {adapter.describe()}: {runner} "
            f"runs the tower's blocks itself and would skip {hook.name} (token reduction inside the "
            f"stack is not supported); remove {runner} first"
        )
    patch = get_patch(adapter.root)
    for other in patch.hooks if patch is not None else ():
        if other.name == hook.name:  # the same method again: add_hook refuses or the method updates it
            continue
        rule = _method_conflict_rule
        reason = (
            (rule(hook.name, other.name, adapter.family) if rule is not None else None)
            or hook.conflict_with(other)
            or other.conflict_with(hook)
        )
        if reason:
            raise ValueError(
                f"cannot apply {hook.name} while {other.name} is applied to {adapter.describe()}: "
                f"{reason}; remove {other.name} first"
            )


def patch_tower(adapter: TowerAdapter) -> TowerPatch:
    """Install the generic forward on every block of ``adapter``'s tower (idempotent)."""
    existing = get_patch(adapter.root)
    if existing is not None:
        return existing
    if adapter.layout not in LAYOUTS:
        raise TypeError(f"{adapter.describe()} declares layout={adapter.layout!r}; vleff runs {LAYOUTS}")
    patch = TowerPatch(adapter)
    embedding = adapter.id_embedding()
    if embedding is not None:
        from vleff.backbones.text import TextLayout

        layout = TextLayout(adapter)
        handle = embedding.register_forward_pre_hook(layout.capture_ids)
        patch.layout, patch._ids_hook = layout, (embedding, handle.id)
    else:
        patch.layout = adapter.layout_hook()
    blocks = adapter.blocks()
    for index, block in enumerate(blocks):
        block.forward = PatchedForward(patch, index, len(blocks), block)
        block.__dict__[SCRIPT_ATTR] = RefuseScripting(adapter)
    for name, guard in adapter.entry_guards().items():
        adapter.root.__dict__[name] = guard
    adapter.root.__dict__[PATCH_ATTR] = patch
    return patch


def unpatch_tower(root: nn.Module) -> bool:
    """Restore the library's own block forwards. Returns whether a patch was removed."""
    patch = get_patch(root)
    if patch is None:
        return False
    for block in patch.adapter.blocks():
        block.__dict__.pop("forward", None)
        block.__dict__.pop(SCRIPT_ATTR, None)
    if patch._ids_hook is not None:
        embedding, hook_id = patch._ids_hook
        embedding._forward_pre_hooks.pop(hook_id, None)
    for name in patch.adapter.entry_guards():
        root.__dict__.pop(name, None)
    del root.__dict__[PATCH_ATTR]
    return True
