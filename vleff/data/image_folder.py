"""Users' own images: a folder per class (torchvision ``ImageFolder``) as a DataModule.

Either ``root/train/<class>/*`` and ``root/val/<class>/*`` (used as given), or a single
``root/<class>/*`` tree that is split deterministically by ``seed``. Images are resized
(shorter side), centre-cropped to ``image_size`` and normalised with ``mean``/``std``
(ImageNet's by default, which is what timm's pretrained ViTs expect; CLIP users pass
CLIP's). Training adds a random horizontal flip. Every image is opened once at the first
``setup`` (:func:`vleff.data.checks.verify_images`), so a corrupt file fails there, named,
instead of mid-epoch in a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vleff.data.checks import check_image_size, verify_images

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transform(image_size: int, mean, std, train: bool):
    from torchvision import transforms as T

    steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    if train:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class ImageFolderDataModule(pl.LightningDataModule):
    """Classification data from a directory tree of images (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data root {str(self.root)!r} is not a directory; pass root=<folder with one "
                "sub-folder per class> (or with train/ and val/ sub-folders)"
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} must lie in (0, 1)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        check_image_size(image_size)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_fraction, self.seed, self.mean, self.std = val_fraction, seed, tuple(mean), tuple(std)
        self.has_split = (self.root / "train").is_dir() and (self.root / "val").is_dir()
        self._verified: set[str] = set()
        self.classes = self._dataset(
            self.root / "train" if self.has_split else self.root, train=False, verify=False
        ).classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _dataset(self, folder: Path, train: bool, verify: bool = True):
        from torchvision.datasets import ImageFolder

        try:
            dataset = ImageFolder(str(folder), transform=_transform(self.image_size, self.mean, self.std, train))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"no images found under {str(folder)!r}: ImageFolder wants <root>/<class>/<image> files ({err})"
            ) from None
        if verify:
            self._verify(dataset)
        return dataset

    def _verify(self, dataset: Any) -> None:
        """Open every image once (first ``setup`` only), naming the class folder of a bad one."""
        if str(dataset.root) in self._verified:
            return
        verify_images(
            [
                (Path(path), f"image folder {dataset.root!r}, class {dataset.classes[label]!r}")
                for path, label in dataset.samples
            ],
            what=Path(dataset.root).name,
        )
        self._verified.add(str(dataset.root))

    def setup(self, stage: str | None = None) -> None:
        if self.has_split:
            self.train_set: Dataset = self._dataset(self.root / "train", train=True)
            self.val_set: Dataset = self._dataset(self.root / "val", train=False)
            return
        train_full, val_full = self._dataset(self.root, train=True), self._dataset(self.root, train=False)
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, round(self.val_fraction * len(order)))
        if n_val >= len(order):
            raise ValueError(
                f"{len(order)} images under {str(self.root)!r} are too few to split with "
                f"val_fraction={self.val_fraction}"
            )
        self.val_set, self.train_set = Subset(val_full, order[:n_val]), Subset(train_full, order[n_val:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
