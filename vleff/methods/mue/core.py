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
also does not exit at a cosine that rounds above 1).

**Decoder exit** (BLIP captioning's ``text_decoder``; a text tower the model runs as a causal
decoder gets ``decoder_threshold`` instead of ``text_threshold``, as the reference has a threshold
of its own for its decoder). Only a generation step exits: inference, the library's key/value
cache passed, one new token. After layer ``l`` a sample leaves when ``cos(h_l, h_{l-1}) > tau_t``
(strict; the vectors are the step's new token), decided per sample as in the encoders. The layers
it skips pass its state unchanged (the final head reads the exited state), and their
self-attention cache entries for this position are set to the exit layer's, so later steps find
keys and values there (the reference copies the exit layer's incremental state into the skipped
layers). The image keys of the cross-attention are the same at every step and stay each layer's
own. As in the encoders, a layer runs on the rows of the samples still in (its self-attention reads
their rows of the cache, its cross-attention their rows of the image keys the library cached at
the first step), and the exited rows only get their cache entries (:meth:`MuEHook.skipped_cache`).
A forward over a whole sequence (training, teacher forcing, a prompt of several tokens)
runs unchanged: an exit decided on the whole sequence would make earlier positions depend on later
tokens.

The threshold decays over the generation (:func:`mue_decoder_threshold`, the reference's
``sequence_generator``): ``tau_t = 1`` (no exit) while ``3 t < max_len``, then
``0.9 decoder_threshold + 0.1 exp(-(t + 1) / (max_len + 1))``, with ``t`` the index of the token
the step predicts (0 for the first generated token: the cache length minus the prompt's, which the
hook records at the step that starts on an empty cache) and ``max_len`` the most new tokens
(``decoder_max_length``, default the decoder's ``generation_config``: ``max_new_tokens``, else
``max_length`` minus the prompt). ``decoder_threshold=1.0`` never exits (no schedule): the
library's generation exactly.

Training the exits: :func:`mue_decoder_loss`, MuE's layer-wise loss (the LM head's cross-entropy
summed over every decoder layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerHook, find_towers, get_patch
from vleff.backbones.text import runs_as_causal_decoder
from vleff.checks import check_int, check_number, check_towers
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
        decoder_threshold: the same for a text tower the model runs as a causal decoder (BLIP
            captioning's ``text_decoder``), per generated token, decayed over the generation
            (see the module docstring; shipped: 0.9 captioning, 0.7 SNLI-VE). ``1.0``: never exit.
            Allowed: ``[-1, 1]``.
        decoder_max_length: ``max_len`` of the decoder's threshold schedule, the most tokens a
            generation adds; ``None``: the decoder's ``generation_config`` (``generate(max_length=...)``
            overrides it for one call unseen by MuE: pass the same here). An integer ``>= 1``.
        towers: ``"image"``, ``"text"`` or ``"all"`` (``"text"`` covers a decoder).
    """

    method = "mue"
    image_threshold: float = 1.0
    text_threshold: float = 1.0
    decoder_threshold: float = 1.0
    decoder_max_length: int | None = None
    towers: str = "image"

    def __post_init__(self) -> None:
        self.image_threshold = check_number("image_threshold", self.image_threshold, low=-1, high=1, owner="MuE")
        self.text_threshold = check_number("text_threshold", self.text_threshold, low=-1, high=1, owner="MuE")
        self.decoder_threshold = check_number("decoder_threshold", self.decoder_threshold, low=-1, high=1, owner="MuE")
        if self.decoder_max_length is not None:
            self.decoder_max_length = check_int("MuE: decoder_max_length", self.decoder_max_length, low=1)
        check_towers(self.towers, TOWERS)


def mue_decoder_threshold(threshold: float, step: int, max_length: int) -> float:
    """The decoder's exit threshold at generation step ``step`` (0: the first generated token) of
    at most ``max_length`` new tokens: 1.0 (no exit) while ``3 step < max_length`` and for a
    ``threshold`` of 1.0, else ``0.9 threshold + 0.1 exp(-(step + 1) / (max_length + 1))``."""
    if threshold >= 1.0 or 3 * step < max_length:
        return 1.0
    return 0.9 * threshold + 0.1 * math.exp(-(step + 1) / (max_length + 1))


def sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B]`` cosine similarity of each sample's flattened tokens (at least float32)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.flatten(1).to(dtype), b.flatten(1).to(dtype)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


class MuEHook(TowerHook):
    """Per-sample early exit on one tower (see the module docstring).

    Per forward (inference, threshold below 1) the token state's scratch holds, under ``"mue"``,
    ``exited`` (``[B]`` bool) and ``blocks`` (``[B]``: how many blocks each sample ran); on a decoder,
    per generation step, also the step's ``threshold`` (the schedule's)."""

    name = HOOK_NAME
    replayable = True  # decisions live in the token state; a replay starts from the recorded copy

    def __init__(self, config: MuEConfig, depth: int, modality: str, decoder: nn.Module | None = None) -> None:
        self.config, self.depth, self.modality = config, depth, modality
        #: the language model whose causal decoder this tower is (its ``generation_config`` gives
        #: the schedule's length), or ``None`` for an encoder tower
        self.decoder = decoder
        #: while :func:`mue_budget_steps` traces: every cosine a running sample reached (no exits)
        self.trace: list[torch.Tensor] | None = None
        #: the decoder's latest generation: ``(id of its cache, prompt length)``
        self._prompt: tuple[int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["trace"] = None  # per-forward: a copy of the model does not carry a trace along
        return state

    def configure(self, config: MuEConfig) -> None:
        self.config = config

    @property
    def threshold(self) -> float:
        if self.decoder is not None:
            return self.config.decoder_threshold
        return self.config.image_threshold if self.modality == "image" else self.config.text_threshold

    def exits(self, block: nn.Module | None) -> bool:
        """Whether this forward may exit (inference, and a threshold below 1), or is traced."""
        return (self.threshold < 1.0 or self.trace is not None) and block is not None and not block.training

    def running_samples(self, index: int, state: TokenState) -> torch.Tensor | None:
        record = state.scratch.get(HOOK_NAME)
        return None if record is None else ~record["exited"]

    def skipped_cache(
        self, index: int, adapter: Any, cache: Any, rows: torch.Tensor, count: int, state: TokenState
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decoder's exited samples: the previous layer's entries (the exit layer's, or filled
        from it), as the reference fills the skipped layers' incremental state."""
        if self.decoder is None or HOOK_NAME not in state.scratch:
            return None
        return adapter.cache_entries(cache, adapter.blocks()[index - 1], rows, count)

    def before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if self.decoder is not None:
            return self._decoder_before(x, info, state)
        if info.index == 0 and state.rows is None and self.exits(info.block):
            if torch.compiler.is_exporting():
                raise RuntimeError(
                    f"torch.export cannot take MuE on the {self.modality} tower: which samples run each block "
                    "depends on the data (each exits when its tokens stop changing), and an exported graph "
                    "needs it fixed. Export with MuE removed (vleff.remove_mue) or with its threshold at 1.0"
                )
            if runs_as_causal_decoder(state):
                raise RuntimeError(
                    "MuE was applied to this text tower as an encoder, but it runs as a causal decoder "
                    "(is_decoder=True): an exit decided on the whole sequence would make earlier positions depend "
                    "on later tokens. Apply MuE to the model that holds the decoder (BlipForConditionalGeneration "
                    "or its text_decoder): it then exits per generated token with decoder_threshold"
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
        threshold = record.get("threshold", self.threshold)  # the decoder's: this step's
        if (
            self.trace is not None and self.decoder is None
        ):  # traced: record, never exit (every sample reaches every block)
            self.trace.append(cosine.detach().cpu())
            return x
        leave = cosine > threshold
        rows = state.rows if state.rows is not None else torch.arange(x.shape[0], device=x.device)
        gone = rows[leave]
        record["exited"] = record["exited"].index_fill(0, gone, True)
        record["blocks"] = record["blocks"].index_fill(0, gone, info.index + 1)
        return x

    # --- the decoder: one generated token per forward ---------------------------------------
    def step_threshold(self, x: torch.Tensor, info: BlockInfo) -> float | None:
        """The threshold of this decoder forward, or ``None`` when it may not exit (training, no
        cache, several new tokens, or ``decoder_threshold`` 1.0). Records the prompt's length
        at the forward that starts a generation (an empty cache)."""
        if info.cache is None:
            return None
        past = info.adapter.cache_length(info.cache)
        if past == 0:
            self._prompt = (id(info.cache), x.shape[1])
        if info.block is None or info.block.training or x.shape[1] != 1 or self.config.decoder_threshold >= 1.0:
            return None
        prompt = self._prompt[1] if self._prompt is not None and self._prompt[0] == id(info.cache) else 1
        step = past + 1 - prompt  # the index of the token this step predicts among the new ones
        return mue_decoder_threshold(self.config.decoder_threshold, step, self.max_length(prompt))

    def max_length(self, prompt: int) -> int:
        """``max_len`` of the schedule: ``decoder_max_length``, else the decoder's generation config."""
        if self.config.decoder_max_length is not None:
            return self.config.decoder_max_length
        generation = getattr(self.decoder, "generation_config", None)
        new = getattr(generation, "max_new_tokens", None)
        if new is None:
            new = int(getattr(generation, "max_length", None) or 20) - prompt
        return max(int(new), 1)

    def _decoder_before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if info.index == 0 and state.rows is None:
            threshold = self.step_threshold(x, info)
            if threshold is not None:
                if torch.compiler.is_exporting():
                    raise RuntimeError(
                        "torch.export cannot take MuE on the text decoder: which samples leave at which layer "
                        "depends on the data. Export with MuE removed (vleff.remove_mue) or decoder_threshold=1.0"
                    )
                b = x.shape[0]
                state.scratch[HOOK_NAME] = {
                    "exited": torch.zeros(b, dtype=torch.bool, device=x.device),
                    "blocks": torch.full((b,), self.depth, dtype=torch.long, device=x.device),
                    "threshold": threshold,
                }
        record = state.scratch.get(HOOK_NAME)
        if record is not None and info.index < self.depth - 1:
            record["input"] = x
        return x


def apply_mue(model: nn.Module, config: MuEConfig | None = None, **settings: Any) -> nn.Module:
    """MuE on every tower of ``model`` that ``towers`` names (in place); applying twice replaces the
    earlier settings. ``ValueError`` for a bad setting or a causal decoder tower."""
    cfg = MuEConfig.build(config, **settings)
    select_towers(model, cfg.towers)  # a model without such a tower is refused before anything changes
    if hooks_named(model, HOOK_NAME):
        remove_mue(model)
    install_hooks(
        model,
        lambda tower: MuEHook(cfg, len(tower.blocks()), tower.modality, decoder=_decoder_of(model, tower)),
        cfg.towers,
    )
    return model


def _decoder_of(model: nn.Module, tower: Any) -> nn.Module | None:
    """The language model of ``model`` that runs ``tower`` as its causal decoder, or ``None``."""
    if tower.modality != "text" or not tower.causal_decoder_in(model):
        return None
    return next((m for m in model.modules() if getattr(m, "bert", None) is tower.root), model)


def mue_decoder_loss(
    model: nn.Module,
    hidden_states: Sequence[torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float | None = None,
) -> torch.Tensor:
    """MuE's training loss of a decoder (``MuE_Task_Loss``): the next-token cross-entropy of the
    shared language-model head on every decoder layer's output, summed unweighted over the layers.

    Args:
        model: BLIP's ``BlipTextLMHeadModel`` (``text_decoder``) or a model holding one
            (``BlipForConditionalGeneration``): its head ``cls`` reads each layer.
        hidden_states: the decoder's ``output_hidden_states=True`` output (embeddings first, then
            one ``[B, N, C]`` per layer; the embeddings get no loss).
        labels: ``[B, N]`` token ids, ``-100`` where no loss is taken (the library's rule: the
            prediction at position ``i`` is scored against ``labels[:, i + 1]``).
        label_smoothing: the cross-entropy's (default: the decoder's own, ``config.label_smoothing``).

    The last layer's term is the library's own language-model loss, so this replaces it."""
    decoder = model if callable(getattr(model, "cls", None)) else getattr(model, "text_decoder", None)
    if decoder is None or not isinstance(getattr(decoder, "cls", None), nn.Module):
        raise TypeError(
            f"mue_decoder_loss reads each layer through a BLIP text decoder's language-model head (cls); "
            f"{type(model).__name__} has none. Pass BlipForConditionalGeneration or its text_decoder"
        )
    if len(hidden_states) < 2:
        raise ValueError(
            f"mue_decoder_loss needs the decoder's hidden states with output_hidden_states=True (the embeddings "
            f"and one per layer); got {len(hidden_states)} tensor(s)"
        )
    if label_smoothing is None:
        label_smoothing = float(getattr(decoder, "label_smoothing", 0.0))
    target = labels[:, 1:].reshape(-1)
    total = hidden_states[1].new_zeros((), dtype=torch.promote_types(hidden_states[1].dtype, torch.float32))
    for h in hidden_states[1:]:
        logits = decoder.cls(h)[:, :-1]
        total = total + F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).to(total.dtype), target, label_smoothing=label_smoothing
        )
    return total


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
    if not keys:
        raise ValueError("MuE's budget steps the encoder thresholds; this model has MuE on its decoder only")
    return [dict.fromkeys(keys, t) for t in thresholds_between(cosines, low=-1.0, high=1.0)]


def _modalities(hooks: list[MuEHook]) -> set[str]:
    """The modalities of the encoder towers MuE is on (the decoder's threshold is not stepped)."""
    return {hook.modality for hook in hooks if hook.decoder is None}
