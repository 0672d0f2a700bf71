"""The bundled digits as a vision-language task: captioning or "which digit is this?" answering.

A word-level vocabulary of 22 tokens (the LM is tiny and trained here, so no pretrained
tokenizer is needed). Every sample of a task has the same length, so batches need no padding
and greedy generation runs on equal-length prompts:

* ``task="caption"``: prompt ``<bos>``, target ``a photo of the digit seven <eos>``;
* ``task="qa"``: prompt ``<bos> which digit is this ?``, target ``seven <eos>``.

A batch is ``(images, input_ids, labels, digits)``: ``labels`` are the ids with the prompt
positions set to ``-100`` (the loss reads the target only), ``digits`` the class labels.
:data:`DIGIT_TOKEN` maps a digit to its token id; :func:`answer_position` is the index of the
digit word among the generated tokens (what accuracy reads).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from vleff.checks import check_choice, check_int
from vleff.data.captions import DIGIT_NAMES
from vleff.data.digits import digits_arrays

__all__ = [
    "DIGIT_TOKEN",
    "DigitsVLMDataModule",
    "VOCAB",
    "answer_position",
    "digit_text_batch",
    "encode",
    "prompt",
    "target",
]

VOCAB: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    "<eos>",
    "which",
    "digit",
    "is",
    "this",
    "?",
    "a",
    "photo",
    "of",
    "the",
    *DIGIT_NAMES,
)
TOKEN = {w: i for i, w in enumerate(VOCAB)}
DIGIT_TOKEN = torch.tensor([TOKEN[name] for name in DIGIT_NAMES])
TASKS = ("caption", "qa")


def encode(words: str) -> list[int]:
    """Token ids of space-separated ``words`` (``ValueError`` naming an unknown word)."""
    ids = []
    for w in words.split():
        if w not in TOKEN:
            raise ValueError(f"word {w!r} is not in the digits vocabulary {VOCAB}")
        ids.append(TOKEN[w])
    return ids


def prompt(task: str) -> list[int]:
    check_choice("task", task, TASKS)
    return encode("<bos>" if task == "caption" else "<bos> which digit is this ?")


def target(task: str, digit: int) -> list[int]:
    name = DIGIT_NAMES[int(digit)]
    return encode(f"a photo of the digit {name} <eos>" if task == "caption" else f"{name} <eos>")


def answer_position(task: str) -> int:
    """Index of the digit word among the target (= generated) tokens."""
    return 5 if check_choice("task", task, TASKS) == "caption" else 0


def digit_text_batch(task: str, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` ``[B, L]`` for ``digits`` ``[B]``; labels hide the prompt with -100."""
    p = prompt(task)
    ids = torch.tensor([p + target(task, int(d)) for d in digits], dtype=torch.long)
    labels = ids.clone()
    labels[:, : len(p)] = -100
    return ids, labels


class DigitsVLMDataModule(pl.LightningDataModule):
    """Digits images with caption / QA text (one data module for prefix and MemVP models)."""

    vocab_size = len(VOCAB)

    def __init__(
        self,
        task: str = "qa",
        image_size: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        val_fraction: float = 0.2,
        limit_train: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.task = check_choice("task", task, TASKS)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.limit_train = None if limit_train is None else check_int("limit_train", limit_train, low=1)
        self.image_size, self.seed, self.val_fraction, self.num_workers = image_size, seed, val_fraction, num_workers
        self.save_hyperparameters()
        digits_arrays(image_size, "val", seed, val_fraction)  # bad arguments fail here

    def _dataset(self, split: str, limit: int | None = None) -> TensorDataset:
        images, digits = digits_arrays(self.image_size, split, self.seed, self.val_fraction)
        if limit is not None:
            images, digits = images[:limit], digits[:limit]
        ids, labels = digit_text_batch(self.task, digits)
        return TensorDataset(images, ids, labels, digits)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._dataset("train", self.limit_train)
        self.val_set = self._dataset("val")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 128), num_workers=self.num_workers)
