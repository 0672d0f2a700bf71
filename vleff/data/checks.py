"""Up-front checks of users' data files, so a bad file fails at ``setup`` and not mid-epoch.

Without them, a CSV row naming a missing image, a corrupt image in an image folder or a
label that is not an integer only fails when the batch holding it loads — minutes into
training, inside a DataLoader worker, with a traceback that names neither the file nor the
row. :func:`verify_images` opens every image once (header and integrity check with PIL's
``verify``, no full decode), with a tqdm progress bar on large sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["PROGRESS_ABOVE", "check_image_size", "verify_images"]

#: show a progress bar when checking more images than this
PROGRESS_ABOVE = 2000


def check_image_size(image_size: object) -> int:
    """``image_size`` as a positive int, or ``ValueError`` naming it."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(
            f"image_size={image_size!r} is not allowed; it must be a positive int (the side, in "
            "pixels, of the square images the model sees)"
        )
    return image_size


def verify_images(items: Sequence[tuple[Path, str]], what: str) -> None:
    """Open every image in ``items`` (``(path, where it is listed)``) and check it is readable.

    Raises ``FileNotFoundError``/``ValueError`` naming the file and where it is listed (the
    CSV row and column, or the class folder) for the first bad one.
    """
    from PIL import Image, UnidentifiedImageError

    iterator: Sequence[tuple[Path, str]] | object = items
    if len(items) > PROGRESS_ABOVE:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc=f"checking {what}", unit="img", leave=False)
    for path, where in iterator:  # type: ignore[union-attr]
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(
                f"{where}: image {str(path)!r} is not a readable image "
                f"({err.__class__.__name__}: {err}); fix or remove it"
            ) from None
