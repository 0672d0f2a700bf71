"""Captions for the bundled digits image-text set, and the tokenizer every CLIP job here uses."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["DIGIT_NAMES", "DIGIT_TEMPLATE", "clip_tokenizer", "digit_caption", "digit_prompts"]

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATE = "a photo of the digit {}"


def digit_caption(label: int, template: str = DIGIT_TEMPLATE) -> str:
    """``digit_caption(7) == "a photo of the digit seven"``."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label={label!r} is not a digit; allowed: 0..9")
    return template.format(DIGIT_NAMES[int(label)])


def digit_prompts(template: str = DIGIT_TEMPLATE) -> list[str]:
    """One class prompt per digit, in label order (for zero-shot classification)."""
    return [template.format(name) for name in DIGIT_NAMES]


@functools.lru_cache(maxsize=8)
def _open_clip_tokenizer(name: str) -> Any:
    """open_clip's tokenizer ``name``, built once per process: ``get_tokenizer`` logs three INFO
    lines per call, and a CLIP run asks for it in the training collate, the validation collate
    and the zero-shot prompts (the lines printed four times per ``vleff-train`` run)."""
    import open_clip

    return open_clip.get_tokenizer(name)


def clip_tokenizer(
    name: str = "ViT-B-32", context_length: int | None = None
) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel: works offline).

    Returns ``tokenize(texts) -> LongTensor [B, context_length]`` with start/end tokens and
    zero padding. The ids are the OpenAI CLIP vocabulary, so Hugging Face CLIP text towers
    accept them too (``bos=49406``, ``eos=49407``). A shorter ``context_length`` suits small
    models trained from scratch.
    """
    tokenizer = _open_clip_tokenizer(name)
    length = context_length or getattr(tokenizer, "context_length", 77)

    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(texts), context_length=length)

    return tokenize
