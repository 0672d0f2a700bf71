"""Data modules: bundled digits (deterministic, stratified) and ImageFolder on PNGs the test writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vleff.data import DigitsDataModule, ImageFolderDataModule, digits_arrays


def test_digits_split_is_deterministic_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    train_x, train_y = digits_arrays(image_size=8, split="train", seed=3, channels=1)
    val_x, val_y = digits_arrays(image_size=8, split="val", seed=3, channels=1)
    again_x, _ = digits_arrays(image_size=8, split="train", seed=3, channels=1)
    assert torch.equal(train_x, again_x)
    assert len(train_y) + len(val_y) == 1797
    assert abs(len(val_y) - 0.2 * 1797) <= 1
    # every image is one of sklearn's, and no image index is in both splits
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16 * 2 - 1
    flat_raw = {tuple(r.flatten().tolist()): i for i, r in enumerate(raw)}
    train_ids = {flat_raw[tuple(x.flatten().tolist())] for x in train_x}
    val_ids = {flat_raw[tuple(x.flatten().tolist())] for x in val_x}
    assert len(train_ids & val_ids) <= 5  # sklearn's digits contain a few exact duplicates
    counts = torch.bincount(val_y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    other_seed, _ = digits_arrays(image_size=8, split="train", seed=4, channels=1)
    assert not torch.equal(train_x, other_seed)


def test_digits_upsampling_shape_range_and_channels():
    x, y = digits_arrays(image_size=32, split="val")
    assert x.shape == (360, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(x[:, 0], x[:, 2])
    # bilinear upsampling keeps the mean of each image close to the 8x8 original's
    small, _ = digits_arrays(image_size=8, split="val")
    assert torch.allclose(x.mean(dim=(1, 2, 3)), small.mean(dim=(1, 2, 3)), atol=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split='test'"),
        ({"image_size": 4}, "image_size=4"),
        ({"val_fraction": 1.5}, "val_fraction=1.5"),
        ({"channels": 2}, "channels=2"),
    ],
)
def test_digits_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits_arrays(**kwargs)


def test_digits_datamodule_batches_and_augment():
    dm = DigitsDataModule(image_size=16, batch_size=32, augment=True)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 16, 16) and labels.shape == (32,)
    assert dm.num_classes == 10
    with pytest.raises(ValueError, match="batch_size=0"):
        DigitsDataModule(batch_size=0)


def _write_tree(root, classes=("cat", "dog"), per_class=5, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_split_and_transforms(tmp_path):
    _write_tree(tmp_path)
    dm = ImageFolderDataModule(tmp_path, image_size=16, batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 16, 16) and set(labels.tolist()) <= {0, 1}


def test_image_folder_with_train_val_subfolders(tmp_path):
    _write_tree(tmp_path / "train", per_class=3)
    _write_tree(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(tmp_path, image_size=8)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 4


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageFolderDataModule(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found|Couldn't find any class"):
        ImageFolderDataModule(tmp_path / "empty")
