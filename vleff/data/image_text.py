"""Image-text pairs for CLIP fine-tuning: the bundled digits set and users' CSV/JSONL files.

Every item is ``(image [3, H, W] float, caption str, caption_id int, label int)``:

* ``caption_id`` groups identical captions (retrieval counts a hit for any image/text with
  the same id; the contrastive loss treats them as positives of one another) — the digits
  set has ten captions, so this matters there; users' data usually has unique captions.
* ``label`` is the class for zero-shot accuracy (``-1`` when the data has none).

Batches (:func:`collate_image_text`) hold ``images``, ``tokens`` (open_clip's tokenizer),
``caption_ids`` and ``labels``.

Files: CSV with a header (default columns ``image`` and ``caption``, optional ``label``) or
JSONL with the same keys. Relative image paths are resolved against ``image_root`` or the
file's folder. Images are resized (bicubic, shorter side), centre-cropped to
``image_size`` and normalised with CLIP's mean/std.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from vleff.data.captions import (
    DIGIT_TEMPLATE,
    clip_tokenizer,
    digit_caption,
    digit_prompts,
)
from vleff.data.checks import check_image_size, verify_images

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DigitsImageText",
    "ImageTextDataModule",
    "ImageTextFiles",
    "collate_image_text",
    "read_pairs",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Item = tuple[torch.Tensor, str, int, int]


class DigitsImageText(Dataset):
    """scikit-learn's digits (8x8, upsampled to ``image_size``) with captions like
    "a photo of the digit seven". Deterministic split from :func:`vleff.data.digits.digits_arrays`."""

    def __init__(
        self, split: str = "train", image_size: int = 32, seed: int = 0, template: str = DIGIT_TEMPLATE
    ) -> None:
        from vleff.data.digits import digits_arrays

        self.images, labels = digits_arrays(image_size=image_size, split=split, seed=seed)
        self.labels = labels.long()
        self.template = template
        self.captions = [digit_caption(int(y), template) for y in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Item:
        y = int(self.labels[i])
        return self.images[i], self.captions[i], y, y

    @property
    def class_prompts(self) -> list[str]:
        return digit_prompts(self.template)


def read_pairs(
    path: str | Path, image_key: str = "image", caption_key: str = "caption", label_key: str = "label"
) -> list[dict[str, Any]]:
    """Rows ``{"image", "caption", "label", "line"}`` from a CSV (header row) or JSONL file.

    Every row is checked here (columns present, label an integer or empty), and errors name
    the file, the line and the column; ``line`` is where the row ends in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image-text file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = []
            for row in reader:  # the line a row ends on (header = line 1), for error messages
                rows.append((reader.line_num, row))
    elif suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{str(path)!r} line {line_no}: not valid JSON ({err})") from None
    else:
        raise ValueError(f"{str(path)!r}: image-text files must be .csv or .jsonl, got {suffix!r}")
    if not rows:
        raise ValueError(f"{str(path)!r} holds no rows")
    out = []
    for line_no, row in rows:
        for key in (image_key, caption_key):
            if key not in row or row[key] in (None, ""):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{str(path)!r} line {line_no}: no {key!r} column/key (or it is empty); found {found}")
        label = row.get(label_key)
        if label in (None, ""):
            value = -1
        else:
            try:
                value = int(label) if not isinstance(label, float) or label.is_integer() else None
            except (TypeError, ValueError):
                value = None
            if value is None or isinstance(label, bool):
                raise ValueError(
                    f"{str(path)!r} line {line_no}, column {label_key!r}: label={label!r} is not an "
                    "integer class index; use an int (or leave it empty for no label)"
                )
        out.append({"image": str(row[image_key]), "caption": str(row[caption_key]), "label": value, "line": line_no})
    return out


def _clip_transform(image_size: int) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


class ImageTextFiles(Dataset):
    """Users' image-text pairs listed in a CSV or JSONL file (see the module docstring).

    With ``verify`` (default) every listed image is opened once at construction (PIL's
    integrity check, a progress bar on large sets), so a missing or corrupt file fails here,
    naming the line and column, instead of mid-epoch in a DataLoader worker.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        image_size: int = 224,
        transform: Callable[[Any], torch.Tensor] | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        label_key: str = "label",
        verify: bool = True,
    ) -> None:
        check_image_size(image_size)
        self.rows = read_pairs(path, image_key, caption_key, label_key)
        self.root = Path(image_root) if image_root is not None else Path(path).parent
        self.transform = transform or _clip_transform(image_size)
        if verify:  # fail now, naming the row, not in a worker when the batch loads
            verify_images(
                [(self._path(r), f"{str(path)!r} line {r['line']}, column {image_key!r}") for r in self.rows],
                what=Path(path).name,
            )
        ids: dict[str, int] = {}
        self.caption_ids = [ids.setdefault(r["caption"], len(ids)) for r in self.rows]

    def _path(self, row: dict[str, Any]) -> Path:
        path = Path(row["image"])
        return path if path.is_absolute() else self.root / path

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Item:
        from PIL import Image

        row = self.rows[i]
        with Image.open(self._path(row)) as img:
            image = self.transform(img.convert("RGB"))
        return image, row["caption"], self.caption_ids[i], row["label"]


def collate_image_text(items: Sequence[Item], tokenize: Callable[[Sequence[str]], torch.Tensor]) -> dict[str, Any]:
    images, captions, caption_ids, labels = zip(*items)
    return {
        "images": torch.stack(list(images)),
        "tokens": tokenize(captions),
        "captions": list(captions),
        "caption_ids": torch.tensor(caption_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


class _Collate:
    """Picklable collate (DataLoader workers) that tokenizes captions in the batch."""

    def __init__(self, tokenizer: str, context_length: int | None) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length
        self._tokenize: Callable[[Sequence[str]], torch.Tensor] | None = None

    def __call__(self, items: Sequence[Item]) -> dict[str, Any]:
        if self._tokenize is None:
            self._tokenize = clip_tokenizer(self.tokenizer, self.context_length)
        return collate_image_text(items, self._tokenize)

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "context_length": self.context_length, "_tokenize": None}


class ImageTextDataModule(pl.LightningDataModule):
    """Digits captions (``source="digits"``) or CSV/JSONL files (``train_file``/``val_file``).

    Args:
        source: ``"digits"`` or ``"files"``.
        train_file, val_file, image_root: for ``"files"``.
        image_size: side of the square images the model sees.
        tokenizer: open_clip model name whose tokenizer to use (all share the CLIP BPE).
        context_length: token sequence length (77 for pretrained CLIP; shorter for tiny models).
        class_prompts: zero-shot prompts per class (digits fills these in).
        train_limit: keep only the first N training pairs (quick runs).
    """

    def __init__(
        self,
        source: str = "digits",
        train_file: str | None = None,
        val_file: str | None = None,
        image_root: str | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        tokenizer: str = "ViT-B-32",
        context_length: int | None = None,
        seed: int = 0,
        class_prompts: Sequence[str] | None = None,
        train_limit: int | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if source not in ("digits", "files"):
            raise ValueError(f"source={source!r} is not allowed; use 'digits' or 'files'")
        check_image_size(image_size)
        if source == "files" and train_file is None:
            raise ValueError("source='files' needs train_file=<path to .csv or .jsonl>")
        self.source, self.train_file, self.val_file, self.image_root = source, train_file, val_file, image_root
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.seed, self.train_limit, self.shuffle = seed, train_limit, shuffle
        self.collate = _Collate(tokenizer, context_length)
        self.class_prompts = (
            list(class_prompts) if class_prompts is not None else (digit_prompts() if source == "digits" else None)
        )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.source == "digits":
            self.train_set = DigitsImageText("train", self.image_size, self.seed)
            self.val_set = DigitsImageText("val", self.image_size, self.seed)
        else:
            self.train_set = ImageTextFiles(self.train_file, self.image_root, self.image_size)
            self.val_set = ImageTextFiles(self.val_file, self.image_root, self.image_size) if self.val_file else None
        if self.train_limit is not None:
            self.train_set = torch.utils.data.Subset(self.train_set, range(min(self.train_limit, len(self.train_set))))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            generator=g,
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._loader(self.val_set, False) if self.val_set is not None else []
