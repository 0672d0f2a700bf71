"""The hook seams: BlockInfo's attention rows against the block's own probabilities, keys and
rows following an earlier hook's reduction, stale per-token tensors refused clearly."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vleff.backbones import StaleBlockInfo, TowerHook, find_tower, patch_tower, unpatch_tower
from vleff.backbones.block import keep_masked_softmax
from vleff.backbones.hooks import _keep_row


class Probe(TowerHook):
    """Asks for the full probabilities and row 0 at every block; records both."""

    name = "probe"

    def __init__(self, keep: torch.Tensor | None = None) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.keep = keep

    def needs_attention_probs(self, index: int) -> bool:
        return True

    def attention_rows(self, index: int) -> tuple[int, ...]:
        return (0,)

    def attention_keep(self, state):
        return self.keep

    def between(self, x, info, state):
        self.seen.append((info.probs.float(), info.row_attention(0)))
        return x


@pytest.mark.parametrize("masked", [False, True])
def test_row_attention_equals_the_blocks_probabilities(masked):
    torch.manual_seed(0)
    model = tm.timm_vit().eval()
    keep = None
    if masked:
        keep = (torch.rand(2, 17) > 0.5).float()
        keep[:, 0] = 1
    probe = Probe(keep)
    tower = find_tower(model)
    patch_tower(tower).add_hook(probe)
    with torch.no_grad():
        model(tm.images())
    unpatch_tower(tower.root)
    assert len(probe.seen) == 3
    for probs, row in probe.seen:
        torch.testing.assert_close(row, probs[:, :, 0].mean(dim=1), atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 1000), scale=st.floats(0.1, 20.0))
def test_keep_row_equals_the_keep_masked_softmax_rows(n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, n, n, generator=g) * scale
    keep = (torch.rand(2, n, generator=g) > 0.5).float()
    rows = torch.randint(0, n, (2,), generator=g)
    index = rows[:, None, None, None].expand(-1, 2, 1, n)
    torch.testing.assert_close(
        _keep_row(logits.gather(2, index), keep, rows),
        keep_masked_softmax(logits, keep).gather(2, index),
        atol=1e-6,
        rtol=1e-5,
    )


class DropHalf(TowerHook):
    """Keeps the prefix and the first half of the other tokens (a reducer for the tests)."""

    name = "drop_half"

    def between(self, x, info, state):
        keep = 1 + (x.shape[1] - 1) // 2
        idx = torch.arange(keep).expand(x.shape[0], keep)
        return state.select(x, idx)


class ReadAfter(TowerHook):
    name = "read_after"

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.errors: list[str] = []

    def attention_rows(self, index: int) -> tuple[int, ...]:
        return (0,)

    def between(self, x, info, state):
        self.keys.append((info.keys.shape[2], info.row_attention(0).shape[1], x.shape[1]))
        try:
            info.q
        except StaleBlockInfo as err:
            self.errors.append(str(err))
        return x


def test_keys_and_rows_follow_an_earlier_reduction_and_stale_tensors_are_refused():
    model = tm.timm_vit().eval()
    tower = find_tower(model)
    reader = ReadAfter()
    patch = patch_tower(tower)
    patch.add_hook(DropHalf())
    patch.add_hook(reader)
    with torch.no_grad():
        model(tm.images())
    unpatch_tower(tower.root)
    assert reader.keys == [(9, 9, 9), (5, 5, 5), (3, 3, 3)]  # 17 -> 9 -> 5 -> 3 tokens
    assert len(reader.errors) == 3 and "before an earlier hook changed them" in reader.errors[0]


def test_hooks_must_be_tower_hooks_and_names_unique():
    patch = patch_tower(find_tower(tm.timm_vit()))
    with pytest.raises(TypeError, match="TowerHook"):
        patch.add_hook(object())
    patch.add_hook(DropHalf())
    with pytest.raises(ValueError, match="already has a 'drop_half' hook"):
        patch.add_hook(DropHalf())
