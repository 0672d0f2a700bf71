"""A small vision-language model: any supported image tower joined to a Hugging Face causal LM.

Two ways to give the LM the image (``visual_prompt``):

* ``"prefix"`` (the LLaVA baseline): the tower's patch tokens, projected to the LM width by a
  ``Linear → GELU → Linear`` projector, are prepended to the text embeddings: every sequence
  is ``N_v`` tokens longer in every layer (and in the KV cache during generation);
* ``"memvp"``: the patch tokens become MemVP's FFN memory (:mod:`vleff.methods.memvp.core`), applied to
  the LM at construction; the text keeps its length.

The image tower is any tower :func:`vleff.backbones.find_tower` finds (timm ViT, open_clip
visual, Hugging Face CLIP vision); the visual features are its last block's output tokens
without the prefix (class, register) tokens, as LLaVA and MemVP read CLIP features. The LM is
any Hugging Face causal LM whose decoder layers MemVP supports (Llama-family gated MLP, GPT-2
plain MLP) — prefix mode needs only ``inputs_embeds``.

:meth:`VisionLanguageModel.generate` is greedy decoding with the LM's KV cache, for prompts
of one length or left-padded with an attention mask: in prefix mode the first step runs the
visual prefix and the prompt, later steps one token against the cache; in MemVP mode the
memory is set once per image and read at every step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import find_tower
from vleff.backbones.hosts import Host, Slot, causal_lm_sites
from vleff.checks import check_choice, check_int
from vleff.methods.memvp.core import MemVPConfig, memvp_applied
from vleff.methods.memvp.core import apply_memvp as _apply_memvp
from vleff.side.common import train_only

VisualPrompt = Literal["prefix", "memvp"]
__all__ = ["VisionLanguageModel", "VisualEncoder"]


def _cache(output: Any) -> Any:
    """The KV cache of a Hugging Face model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


class _Capture:
    """Forward hook on the tower's last block: keeps its output for :class:`VisualEncoder`."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.slot.value = output if isinstance(output, torch.Tensor) else output[0]


class VisualEncoder(nn.Module):
    """A supported image tower → its last block's patch tokens ``[B, N_v, D]`` (prefix tokens dropped).

    The tower's own forward runs (so token methods applied to it act); what follows the last
    block (final norm, pooling, head) is computed and discarded."""

    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        adapter = find_tower(vision, "image")
        self.embed_dim = int(adapter.embed_dim)
        self.prefix_tokens = int(adapter.num_prefix_tokens)
        self._root = next(n for n, m in vision.named_modules() if m is adapter.root)
        self._tokens = Slot()
        adapter.blocks()[-1].register_forward_hook(_Capture(self._tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        root = self.vision.get_submodule(self._root) if self._root else self.vision
        root(images)
        tokens, self._tokens.value = self._tokens.value, None
        if tokens is None:
            raise RuntimeError("VisualEncoder: the tower's last block did not run in its forward")
        return tokens[:, self.prefix_tokens :]


class VisionLanguageModel(nn.Module):
    """An image tower + a causal LM, with the image as prefix tokens or as MemVP memory.

    Args:
        vision: a module holding one supported image tower.
        lm: a Hugging Face causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...).
        visual_prompt: ``"prefix"`` or ``"memvp"``.
        projector_hidden: hidden width of the prefix projector.
        memvp: MemVP settings (a :class:`MemVPConfig` or a dict) for ``"memvp"`` mode.
        apply_memvp: apply MemVP at construction (``False`` leaves the plain host, for the
            ``MemVP`` callback or :func:`vleff.apply_memvp` to apply later).
    """

    def __init__(
        self,
        vision: nn.Module,
        lm: nn.Module,
        visual_prompt: VisualPrompt = "memvp",
        projector_hidden: int = 128,
        memvp: MemVPConfig | dict[str, Any] | None = None,
        apply_memvp: bool = True,
    ) -> None:
        super().__init__()
        self.visual_prompt = check_choice("visual_prompt", visual_prompt, ("prefix", "memvp"))
        if memvp is not None and (visual_prompt == "prefix" or not apply_memvp):
            raise ValueError(
                f"memvp={memvp!r} is not allowed with visual_prompt={visual_prompt!r} and "
                f"apply_memvp={apply_memvp}: MemVP settings apply only when MemVP is applied here "
                "(visual_prompt='memvp', apply_memvp=True)"
            )
        self.visual = VisualEncoder(vision)
        self.lm = lm
        self.width = int(getattr(lm.config, "hidden_size", 0) or lm.config.n_embd)
        if visual_prompt == "prefix":
            hidden = check_int("projector_hidden", projector_hidden, low=1)
            self.projector = nn.Sequential(
                nn.Linear(self.visual.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, self.width)
            )
        else:
            try:  # an unsupported FFN fails here, in either case
                causal_lm_sites(lm)
            except TypeError as error:
                raise TypeError(f"MemVP {error}") from None
            if apply_memvp:
                config = memvp if isinstance(memvp, MemVPConfig) else MemVPConfig.build(**(memvp or {}))
                _apply_memvp(self, config)

    # --- the host protocol (vleff.backbones.hosts.HostModel) ------------------------------------------
    def vleff_host(self) -> Host:
        """This model as host methods see it: the LM's FFNs, the visual encoder's tokens, and
        one forward (or ``generate``) as one image-text call."""
        if self.visual_prompt != "memvp":
            raise ValueError(
                "MemVP on a VisionLanguageModel needs visual_prompt='memvp'; this one prepends "
                "visual tokens (visual_prompt='prefix'); build it with visual_prompt='memvp'"
            )
        sites, width = causal_lm_sites(self.lm, prefix="lm")
        tower = find_tower(self.visual.vision, "image")
        return Host(sites, width, self.visual, self.visual.embed_dim, 0, None, tower, call=self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What a frozen-host run trains: the prefix projector, or MemVP's parameters."""
        if self.visual_prompt == "prefix":
            return list(self.projector.parameters())
        return list(self.vleff_memvp.parameters()) if memvp_applied(self) else []

    def freeze_host(self) -> list[str]:
        """``requires_grad=False`` on the tower and the LM; returns the trainable parameter names."""
        return train_only(self, self.trainable_parameters())

    # --- forward ---------------------------------------------------------------------------------------
    def _prepare(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[dict[str, Any], int]:
        """The LM's inputs for ``images`` + text, and the number of prefix positions."""
        if self.visual_prompt == "prefix":
            prefix = self.projector(self.visual(images))
            text = self.lm.get_input_embeddings()(input_ids)
            embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(attention_mask.shape[0], prefix.shape[1])
                attention_mask = torch.cat([ones, attention_mask], dim=1)
            return {"inputs_embeds": embeds, "attention_mask": attention_mask}, prefix.shape[1]
        if memvp_applied(self):
            self.visual(images)  # sets the memory (MemVP's hook on the visual encoder)
        return {"input_ids": input_ids, "attention_mask": attention_mask}, 0

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"logits": [B, T, vocab]}`` at the text positions (plus ``"loss"``: next-token cross
        entropy over ``labels``, ``-100`` ignored, when given)."""
        inputs, n_prefix = self._prepare(images, input_ids, attention_mask)
        logits = self.lm(**inputs).logits[:, n_prefix:]
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return out

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        max_new_tokens: int = 16,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with the LM's KV cache: the new tokens ``[B, max_new_tokens]`` (after
        ``eos_token_id`` a sequence repeats it).

        Prompts of different lengths are left-padded with ``attention_mask`` ``[B, T]`` (1 = token,
        0 = padding; the last column must be all ones): padded positions are masked out and the
        positions count only the real tokens, as the library's ``generate`` does (``position_ids =
        cumsum(mask) - 1``). In prefix mode the visual tokens keep their place before the padded
        prompt (the mask covers them with ones)."""
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        if attention_mask is not None:
            _check_left_padding(attention_mask, input_ids)
        try:
            return self._generate(images, input_ids, max_new_tokens, eos_token_id, attention_mask)
        finally:
            if memvp_applied(self):  # MemVP's memory belongs to this call (vleff.methods.memvp.core)
                self.vleff_memvp.clear_memory()

    def _generate(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        inputs, _ = self._prepare(images, input_ids, attention_mask)
        mask = inputs.pop("attention_mask")
        extra: dict[str, torch.Tensor] = {}
        if mask is not None:
            position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            extra = {"attention_mask": mask, "position_ids": position_ids}
        out = self.lm(**inputs, **extra, use_cache=True)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens = []
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(dim=-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            tokens.append(nxt)
            if step + 1 < max_new_tokens:
                if extra:
                    mask = torch.cat([extra["attention_mask"], mask.new_ones(mask.shape[0], 1)], dim=1)
                    extra = {"attention_mask": mask, "position_ids": extra["position_ids"][:, -1:] + 1}
                out = self.lm(input_ids=nxt[:, None], cache=_cache(out), use_cache=True, **extra)
        return torch.stack(tokens, dim=1)


def _check_left_padding(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """``generate`` reads the last position's logits: the mask must match the ids, hold only 0/1 and
    be left padding (ones to the end of each row, no row empty)."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    m = attention_mask.long()
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    bad = (m[:, 1:] < m[:, :-1]).any(dim=1) | (m[:, -1] == 0)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            "attention_mask must be left padding (zeros, then ones to the last column) for "
            f"generate; row {row} is {m[row].tolist()}"
        )
