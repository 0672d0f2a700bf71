"""scikit-learn's bundled digits (1,797 8x8 grey images) as ViT-sized tensors and a DataModule.

The set ships inside the scikit-learn wheel, so training works offline. Images are upsampled
bilinearly from 8x8 to ``image_size`` (so a patch size of ``image_size / 8`` sees one original
pixel), repeated to ``channels`` channels and scaled to [-1, 1]. The train/val split is
stratified and fixed by ``seed``: the same arguments always give the same tensors.
"""

from __future__ import annotations

from functools import lru_cache

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DIGITS_CLASSES", "DigitsDataModule", "digits_arrays"]

DIGITS_CLASSES = 10
_SPLITS = ("train", "val", "all")


@lru_cache(maxsize=4)
def _split_indices(seed: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, val = train_test_split(range(len(labels)), test_size=val_fraction, random_state=seed, stratify=labels)
    return torch.as_tensor(sorted(train)), torch.as_tensor(sorted(val))


def digits_arrays(
    image_size: int = 32, split: str = "train", seed: int = 0, val_fraction: float = 0.2, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, channels, image_size, image_size]`` (float32 in [-1, 1]) and labels ``[N]`` (int64).

    ``split`` is ``"train"``, ``"val"`` or ``"all"``; ``val_fraction`` of every class goes to
    ``"val"``. Raises ``ValueError`` for an unknown split, a non-positive size or a fraction
    outside (0, 1).
    """
    from sklearn.datasets import load_digits

    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not known; use one of {_SPLITS}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size={image_size!r} must be an int >= 8 (the digits are 8x8)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in (0, 1)")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} must be 1 or 3")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    if split != "all":
        train_idx, val_idx = _split_indices(seed, float(val_fraction))
        idx = train_idx if split == "train" else val_idx
        images, labels = images[idx], labels[idx]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).expand(-1, channels, -1, -1).contiguous()
    return images, labels


class DigitsDataModule(pl.LightningDataModule):
    """The bundled digits as a Lightning DataModule (``batch`` = ``(images, labels)``).

    ``augment`` adds a random shift of up to one original pixel, which helps a ViT trained
    from scratch for more than a few epochs.
    """

    num_classes = DIGITS_CLASSES

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.2,
        channels: int = 3,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        self.save_hyperparameters()
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.seed, self.val_fraction, self.channels, self.augment = seed, val_fraction, channels, augment
        # fail at construction, not in a worker, on bad arguments
        digits_arrays(image_size, "val", seed, val_fraction, channels)

    def setup(self, stage: str | None = None) -> None:
        args = (self.image_size, self.seed, self.val_fraction, self.channels)
        self.train_set = TensorDataset(*digits_arrays(args[0], "train", *args[1:]))
        self.val_set = TensorDataset(*digits_arrays(args[0], "val", *args[1:]))

    def _shift(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        if self.augment:
            step = max(1, self.image_size // 8)
            dx, dy = (int(v) * step for v in torch.randint(-1, 2, (2,)))
            images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        return images, labels

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=generator,
            collate_fn=self._shift,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 128), num_workers=self.num_workers)
