"""Pictures of ToMe's merge groups: which input patches ended up in the same token.

From the source map (``apply_tome(..., trace_source=True)``), every patch gets the id of the
token that holds it; each group is painted in the mean colour of its pixels with dark borders
between groups, like the figures of the ToMe paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import find_tower, last_token_state


def sample_photo(name: str = "china.jpg", size: int = 224) -> torch.Tensor:
    """A real photograph shipped with scikit-learn, as a ``[3, size, size]`` float image in [0, 1]."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    names = [Path(f).name for f in data.filenames]
    if name not in names:
        raise ValueError(f"name={name!r} is not a scikit-learn sample image; available: {', '.join(names)}")
    img = torch.from_numpy(np.array(data.images[names.index(name)])).permute(2, 0, 1).float() / 255.0
    side = min(img.shape[1:])  # centre crop to a square, then resize
    top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
    img = img[:, top : top + side, left : left + side]
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return img.clamp(0, 1)


def group_labels(source: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Token id holding each patch: ``[h, w]`` from one sample's source map ``[N, N0]``."""
    h, w = grid
    patches = source[:, num_prefix:]
    if patches.shape[1] != h * w:
        raise ValueError(f"source map covers {patches.shape[1]} patches, grid {h}x{w} has {h * w}")
    return patches.argmax(dim=0).reshape(h, w)


def render_groups(image: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Paint each group in its mean colour with dark borders: ``[H, W, 3]`` floats in [0, 1]."""
    _, height, width = image.shape
    h, w = labels.shape
    if height % h or width % w:
        raise ValueError(f"image {height}x{width} is not a multiple of the patch grid {h}x{w}")
    ph, pw = height // h, width // w
    pixel_labels = labels.repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    flat = pixel_labels.flatten()
    n = int(flat.max()) + 1
    sums = torch.zeros(n, 3).index_add_(0, flat, image.reshape(3, -1).T)
    counts = torch.bincount(flat, minlength=n).clamp(min=1)[:, None]
    painted = (sums / counts)[flat].reshape(height, width, 3)
    border = torch.zeros(height, width, dtype=torch.bool)
    border[:-1] |= pixel_labels[:-1] != pixel_labels[1:]
    border[:, :-1] |= pixel_labels[:, :-1] != pixel_labels[:, 1:]
    painted[border] *= 0.25
    return painted.clamp(0, 1).numpy()


def merge_groups(model: nn.Module, image: torch.Tensor, forward=None) -> tuple[torch.Tensor, int]:
    """Run ``model`` on one image (ToMe applied with ``trace_source=True``) and label its patches.

    Returns the ``[h, w]`` group ids and the number of groups (tokens left, prefix excluded).
    """
    tower = find_tower(model)
    with torch.no_grad():
        (forward or model)(image[None])
    state = last_token_state(model)
    if state is None or state.get("source") is None:
        raise RuntimeError(
            "no source map: apply ToMe with trace_source=True first (vleff.apply_tome(model, r, trace_source=True))"
        )
    n0 = state.get("source").shape[-1] - tower.num_prefix_tokens
    side = int(math.isqrt(n0))
    if side * side != n0:
        raise ValueError(f"{n0} patches do not form a square grid; pass a square image")
    labels = group_labels(state.get("source")[0], tower.num_prefix_tokens, (side, side))
    return labels, state.get("source").shape[1] - tower.num_prefix_tokens


def plot_merge_groups(
    model: nn.Module,
    image: torch.Tensor,
    r_values: Sequence[int] = (8, 16),
    path: str | Path | None = None,
    forward=None,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
):
    """Figure: the image, then its merge groups at each r. ``image`` is ``[3, H, W]`` in [0, 1].

    ToMe is (re-)applied at each r with source tracking; afterwards the model is left as it was
    (ToMe removed, or the ToMe it had restored with its own r and settings). ``mean``/``std``
    normalise the image the way the model expects.
    """
    import matplotlib.pyplot as plt  # no backend switch here: that would stop inline plots in notebooks

    from vleff.methods.tome.core import HOOK_NAME, apply_tome, remove_tome
    from vleff.tokens.common import hooks_named

    earlier = hooks_named(model, HOOK_NAME)
    restore = earlier[0].config.replace(r=list(earlier[0].r_per_block)) if earlier else None

    norm = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    fig, axes = plt.subplots(1, len(r_values) + 1, figsize=(3.2 * (len(r_values) + 1), 3.4))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title("input")
    for ax, r in zip(axes[1:], r_values):
        apply_tome(model, r=r, trace_source=True, prop_attn=restore.prop_attn if restore else True)
        labels, groups = merge_groups(model, norm, forward)
        ax.imshow(render_groups(image, labels))
        ax.set_title(f"ToMe r={r}: {groups} tokens")
    remove_tome(model)
    if restore is not None:
        apply_tome(model, restore)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
