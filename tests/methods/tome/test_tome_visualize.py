"""Merge-group pictures: labels come from the source map, each group is one colour."""

from __future__ import annotations

import tiny_models as tm
import torch
from vleff.tokens.tome import apply_tome
from vleff.tokens.visualize import group_labels, merge_groups, plot_merge_groups, render_groups, sample_photo

import vleff


def test_group_labels_and_rendering():
    source = torch.zeros(4, 5)  # 1 prefix token + 4 patches on a 2x2 grid, patches 0,3 merged
    source[0, 0] = 1
    source[1, 1] = source[1, 4] = 1
    source[2, 2] = 1
    source[3, 3] = 1
    labels = group_labels(source, 1, (2, 2))
    assert labels.tolist() == [[1, 2], [3, 1]]
    image = torch.rand(3, 4, 4)
    painted = render_groups(image, labels)
    assert painted.shape == (4, 4, 3)
    # interior pixels of one group share its mean colour (before border darkening)
    mean = torch.cat([image[:, :2, :2].reshape(3, -1), image[:, 2:, 2:].reshape(3, -1)], 1).mean(1)
    assert torch.allclose(torch.from_numpy(painted[0, 0]), mean, atol=1e-6)


def test_merge_groups_on_a_real_photo(tmp_path):
    model = tm.timm_vit(img_size=64, depth=2).eval()
    photo = sample_photo(size=64)
    assert photo.shape == (3, 64, 64) and 0 <= photo.min() and photo.max() <= 1
    apply_tome(model, r=10, trace_source=True)
    labels, groups = merge_groups(model, photo)
    assert labels.shape == (8, 8) and groups == 64 - 20
    assert labels.unique().numel() == groups
    fig = plot_merge_groups(model, photo, r_values=(4,), path=tmp_path / "groups.png")
    assert (tmp_path / "groups.png").stat().st_size > 1000
    fig.clear()


def test_plotting_leaves_the_model_as_it_was(tmp_path):
    from vleff.tokens.tome import tome_r

    model = tm.timm_vit(img_size=64, depth=2).eval()
    photo = sample_photo(size=64)
    with torch.no_grad():
        plain = model(photo[None])
    plot_merge_groups(model, photo, r_values=(4,)).clear()
    assert not vleff.token_counts(model)  # no ToMe before -> none after
    with torch.no_grad():
        torch.testing.assert_close(model(photo[None]), plain, atol=0, rtol=0)
    apply_tome(model, r=[3, 1])
    plot_merge_groups(model, photo, r_values=(4, 8)).clear()
    assert tome_r(model) == [3, 1]  # the user's ToMe is back with its own r
