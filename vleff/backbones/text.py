"""Text towers under token reduction: causal order, padding and the EOT token, tower-level.

A text tower (open_clip's, Hugging Face CLIP's) runs causal attention and pools at the EOT
token, whose position the library reads from the token ids *after* the blocks. Methods that
merge or drop tokens would break both. The patch of a text tower therefore installs one
:class:`TextLayout` hook ahead of every method's hooks. It

* captures the token ids from the tower's token embedding (a forward pre-hook), finds each
  sample's EOT with the library's own rule (:meth:`TowerAdapter.eot_positions`), and
  registers the tower's token fields: ``position`` (the last input position a token holds,
  reduce ``max``), ``protected`` (the EOT: reducers never merge or drop it), ``pad`` (the
  tokens after the EOT: a merge group of their own, so padding never merges into or
  displaces a real token) and ``text_source`` (which input positions each token holds);
* once the sequence has changed, replaces the library's mask by a causal mask rebuilt from
  the positions (token ``i`` sees token ``j`` iff ``position[j] <= position[i]``: nothing of a
  later input position reaches an earlier token, and real tokens never see padding);
* after the last block, scatters the tokens back to the input layout (each input position
  gets the token that holds it; dropped positions get zeros), so the library's EOT pooling
  (``x[arange, eot]``), its final norm and ``last_hidden_state`` work unchanged.

A sentence's embedding then does not depend on its padded length or on what follows its EOT
(tested), as long as a method sizes its reduction from the real tokens.

**Causal encoders and causal decoders.** The rebuilt mask keeps every token from *attending* to a
later position, but a reduction is decided on the whole sequence (ToMe's matching, MADTP's
threshold) and a merged token holds several positions, so after a reduction the output at an
input position may depend on later tokens. For a causal *encoder* pooled at its EOT (CLIP's
text tower) that is harmless: its result is the pooled EOT, which sees every real token anyway
(the other positions of ``last_hidden_state`` are then not per-position features). A causal
*decoder* (BLIP's text decoder, run with ``is_decoder=True``) predicts at every position, and
teacher-forced training would read the future. Its layout hook marks the forward
(:func:`runs_as_causal_decoder`, read from the library's causal mask), and each token method
states its rule: the methods that reduce by a whole-sequence decision refuse such a tower
(:func:`refuse_causal_decoder`); EViT, whose ranking token (BLIP: token 0) sees no later token,
keeps the first tokens and stays causal (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from vleff.backbones.hooks import BlockInfo, TowerHook
from vleff.backbones.state import PROTECTED, TokenState, eot_rows, gather_tokens

POSITION = "position"
PAD = "pad"
SOURCE = "text_source"
LAYOUT_HOOK = "text_layout"
#: ``TokenState.scratch`` key set (``True``) when the library ran the tower as a causal decoder
CAUSAL_DECODER = "causal_decoder"


class TextLayout(TowerHook):
    """The tower-level hook of a patched text tower (see the module docstring)."""

    name = LAYOUT_HOOK
    replayable = True

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.ids: torch.Tensor | None = None

    # forward pre-hook on the token embedding (a bound method: the model stays picklable)
    def capture_ids(self, module: nn.Module, args: tuple) -> None:
        self.ids = args[0] if args else None

    def forward_inputs(self) -> torch.Tensor | None:
        return self.ids

    def restore_forward_inputs(self, inputs: torch.Tensor | None) -> None:
        self.ids = inputs

    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        ids = self.ids
        if ids is None or ids.shape[:2] != x.shape[:2]:
            raise RuntimeError(
                f"{self.adapter.describe()}: the blocks ran without token ids from the tower's token "
                "embedding in this forward; call the text tower through its own forward / encode_text"
            )
        self.ids = None
        b, n = x.shape[:2]
        eot = self.adapter.eot_positions(ids).to(x.device).long()
        positions = torch.arange(n, device=x.device).expand(b, n)
        state.register(POSITION, positions, "max")
        state.register(PROTECTED, (positions == eot[:, None]).long(), "max")
        state.register(PAD, (positions > eot[:, None]).long(), "max")
        state.register(SOURCE, torch.eye(n, device=x.device, dtype=torch.float32).expand(b, n, n), "sum")
        return x

    def changed(self, state: TokenState) -> bool:
        return state.num_tokens != state.num_input_tokens

    def library_mask(self, mask: torch.Tensor | None, is_causal: bool, state: TokenState):
        if self.changed(state):  # the library's mask is for the input length: rebuilt in attention_bias
            return None, False
        return mask, is_causal

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.changed(state):
            return None
        pos = state.get(POSITION)
        visible = pos[:, None, :] <= pos[:, :, None]  # [B, query, key]
        bias = torch.zeros(visible.shape, dtype=dtype, device=pos.device).masked_fill(~visible, float("-inf"))
        return bias[:, None]

    def finish(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        if not self.changed(state):
            return x
        source = state.get(SOURCE)  # [B, N, N0]
        holder = source.argmax(dim=1)  # [B, N0]: the token holding each input position
        held = (source.amax(dim=1) > 0).to(x.dtype)[..., None]
        return gather_tokens(x, holder) * held


def runs_as_causal_decoder(state: TokenState) -> bool:
    """Whether the tower forward of ``state`` runs as a causal decoder (see the module docstring)."""
    return bool(state.scratch.get(CAUSAL_DECODER, False))


def refuse_causal_decoder(state: TokenState, method: str) -> None:
    """``RuntimeError`` naming ``method`` when it is about to reduce the tokens of a tower the
    library runs as a causal decoder (outputs at earlier positions would depend on later tokens)."""
    if runs_as_causal_decoder(state):
        raise RuntimeError(
            f"{method} cannot reduce the tokens of a text tower that runs as a causal decoder (is_decoder=True, "
            "e.g. BLIP's text_decoder: a prediction at every position): its reduction is decided on the whole "
            "sequence, so the outputs at earlier positions would depend on later tokens and teacher-forced training "
            f"would read the future. Apply {method} to the image tower or to a text encoder only (EViT is "
            "allowed on a decoder)"
        )


def refuse_causal_decoder_towers(
    model: nn.Module, towers: list, method: str, setting: str, hint: str | None = None
) -> None:
    """``ValueError`` at apply time when one of ``towers`` (the adapters a method is about to
    patch) is a causal decoder of ``model`` (:meth:`TowerAdapter.causal_decoder_in`).
    ``setting``: the offending setting as the user wrote it (``"towers='all'"``); ``hint``: what
    to do instead (default: the image tower, or the text encoder alone)."""
    hint = hint or (
        f"Use towers='image', or apply {method} to the text encoder alone (e.g. model.text_encoder); "
        "EViT is allowed on a decoder"
    )
    for tower in towers:
        if tower.modality == "text" and tower.causal_decoder_in(model):
            raise ValueError(
                f"{setting}: {method} cannot reduce the tokens of {tower.describe()}: {type(model).__name__} runs it "
                "as a causal decoder (a prediction at every position, teacher-forced in training), and a reduction "
                f"decided on the whole sequence makes the outputs at earlier positions depend on later tokens. {hint}"
            )


__all__ = [
    "BlockInfo",
    "CAUSAL_DECODER",
    "LAYOUT_HOOK",
    "PAD",
    "POSITION",
    "PROTECTED",
    "SOURCE",
    "TextLayout",
    "eot_rows",
    "refuse_causal_decoder",
    "refuse_causal_decoder_towers",
    "runs_as_causal_decoder",
]
