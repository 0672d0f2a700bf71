"""The exportable stable order (``vleff.kernels.order``) equals ``argsort(stable=True)``, ties
included, in both directions — checked on the counting path that export takes."""

from __future__ import annotations

from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vleff.kernels.order import stable_argsort


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    n=st.integers(1, 40),
    levels=st.integers(1, 6),
    descending=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_counting_order_equals_stable_argsort(rows, n, levels, descending, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (rows, n), generator=g).float()  # few levels: many ties
    values[values == 0] = float("-inf")  # forbidden edges rank last, as in ToMe's scores
    expected = values.argsort(dim=-1, descending=descending, stable=True)
    with mock.patch.object(torch.compiler, "is_exporting", lambda: True):
        got = stable_argsort(values, descending=descending)
    assert torch.equal(got, expected)
