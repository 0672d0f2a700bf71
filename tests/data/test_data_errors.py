"""Data: bad files fail at setup naming the file, the line and the column (not
mid-epoch in a worker); image_size <= 0 is rejected; large sets show a progress bar."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from vleff.data import ImageFolderDataModule, ImageTextDataModule, ImageTextFiles, checks


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path)


def _csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_row_naming_a_missing_image_fails_at_construction(tmp_path):
    _image(tmp_path / "a.png")
    _csv(
        tmp_path / "pairs.csv",
        [{"image": "a.png", "caption": "one", "label": "0"}, {"image": "gone.png", "caption": "two", "label": "1"}],
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"pairs\.csv' line 3, column 'image': image '.*gone\.png' "
        r"does not exist",
    ):
        ImageTextFiles(tmp_path / "pairs.csv", image_size=8)
    dm = ImageTextDataModule(source="files", train_file=str(tmp_path / "pairs.csv"), image_size=8)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        dm.setup("fit")


def test_non_integer_label_names_line_and_column(tmp_path):
    _image(tmp_path / "a.png")
    _csv(
        tmp_path / "pairs.csv",
        [{"image": "a.png", "caption": "one", "label": "0"}, {"image": "a.png", "caption": "two", "label": "cat"}],
    )
    with pytest.raises(ValueError, match=r"pairs\.csv' line 3, column 'label': label='cat' is not an integer"):
        ImageTextFiles(tmp_path / "pairs.csv", image_size=8)
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "caption": "x", "label": 2.5}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl' line 1, column 'label': label=2\.5"):
        ImageTextFiles(tmp_path / "pairs.jsonl", image_size=8)


def test_corrupt_image_in_csv_and_in_image_folder(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    _csv(tmp_path / "pairs.csv", [{"image": "a.png", "caption": "one"}, {"image": "bad.png", "caption": "two"}])
    with pytest.raises(ValueError, match=r"line 3, column 'image': image '.*bad\.png' is not a readable image"):
        ImageTextFiles(tmp_path / "pairs.csv", image_size=8)

    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _image(root / cls / f"{i}.png", seed=i)
    good = ImageFolderDataModule(root, image_size=8, batch_size=2, num_workers=0)
    good.setup("fit")
    assert len(good.train_set) + len(good.val_set) == 6
    (root / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    dm = ImageFolderDataModule(root, image_size=8, batch_size=2, num_workers=0)  # construction stays cheap
    with pytest.raises(ValueError, match=r"class 'dog': image '.*dog/3\.png' is not a readable image"):
        dm.setup("fit")


@pytest.mark.parametrize("size", [0, -8, 2.5, True])
def test_image_size_must_be_positive(size, tmp_path):
    (tmp_path / "c").mkdir()
    _image(tmp_path / "c" / "0.png")
    message = rf"image_size={size!r} is not allowed; it must be a positive int"
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(tmp_path, image_size=size)
    with pytest.raises(ValueError, match=message):
        ImageTextDataModule(source="digits", image_size=size)


def test_large_sets_show_a_progress_bar(tmp_path, monkeypatch, capsys):
    rows = []
    for i in range(5):
        _image(tmp_path / f"{i}.png", seed=i)
        rows.append({"image": f"{i}.png", "caption": f"picture {i}", "label": str(i)})
    _csv(tmp_path / "pairs.csv", rows)
    monkeypatch.setattr(checks, "PROGRESS_ABOVE", 3)
    ds = ImageTextFiles(tmp_path / "pairs.csv", image_size=8)
    assert [r["label"] for r in ds.rows] == [0, 1, 2, 3, 4]
    assert "checking pairs.csv" in capsys.readouterr().err
    image, caption, _, label = ds[4]
    assert tuple(image.shape) == (3, 8, 8) and caption == "picture 4" and label == 4
