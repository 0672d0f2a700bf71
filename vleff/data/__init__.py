"""Data modules that work offline (bundled digits) and on users' files (image folders, CSV/JSONL pairs).

* :class:`DigitsDataModule` — scikit-learn's digits for classification
* :class:`ImageFolderDataModule` — ``root/<class>/<image>`` trees
* :class:`ImageTextDataModule` — image-caption pairs for CLIP (digits with captions, or CSV/JSONL)
* :class:`DigitsVLMDataModule` — digits captioning / "which digit is this?" for vision-language models
"""

from __future__ import annotations

from vleff._lazy import lazy_getattr

_LAZY = {
    "DIGITS_CLASSES": "vleff.data.digits",
    "DigitsDataModule": "vleff.data.digits",
    "digits_arrays": "vleff.data.digits",
    "ImageFolderDataModule": "vleff.data.image_folder",
    "ImageTextDataModule": "vleff.data.image_text",
    "DigitsImageText": "vleff.data.image_text",
    "ImageTextFiles": "vleff.data.image_text",
    "DigitsVLMDataModule": "vleff.data.digits_vlm",
}

__all__ = sorted(_LAZY)  # noqa: PLE0605 -- a list, built from the table above


__getattr__ = lazy_getattr("vleff.data", _LAZY)
