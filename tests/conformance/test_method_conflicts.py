"""Issue 24 item 16 (part): settings a method would ignore are refused, conflicts are named truthfully.

* Rev-ViT's RevNet couplings (``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, as minREV runs them) have
  no λ, β and nothing to balance: ``coupling="revvit"`` used to accept and silently ignore them.
* CrossGET refused a side method (LST reduces no token) with "both reduce that tower's tokens".
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from vleff.memory.reversible import ReversibleConfig, apply_reversible

import vleff
from vleff.callbacks import Reversible


@pytest.mark.parametrize(
    "settings", [{"lam": 0.1}, {"beta": 0.5}, {"balance": True}, {"lam": 0.1, "beta": 0.1, "balance": True}]
)
def test_revvit_refuses_meft_only_settings(settings):
    model = tm.timm_vit(depth=2).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(settings))
    pattern = rf"coupling='revvit' takes no {first}=.*allowed with revvit: lam=1\.0, beta=1\.0, balance=False"
    for build in (
        lambda: ReversibleConfig(coupling="revvit", **settings),
        lambda: Reversible(coupling="revvit", **settings),
        lambda: apply_reversible(model, coupling="revvit", **settings),
    ):
        with pytest.raises(ValueError, match=pattern):
            build()
    assert not vleff.registry.applied_methods(model)  # nothing half-applied
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # MEFT takes them; revvit at the defaults still works
    assert ReversibleConfig(coupling="meft", **settings).scales == (settings.get("lam", 1.0), settings.get("beta", 1.0))
    assert ReversibleConfig(coupling="revvit").scales == (1.0, 1.0)


def test_crossget_names_the_real_conflict_with_a_side_method():
    model = tm.open_clip_model().double()
    vleff.apply_lst(model)
    with pytest.raises(ValueError) as err:
        vleff.apply_crossget(model, r_image=2, r_text=2)
    message = str(err.value)
    assert "reduce" not in message  # LST reduces no token
    assert "cannot apply crossget while lst is applied" in message
    assert "reads every block's output of the tower's full token stream, which CrossGET changes" in message

    other = tm.open_clip_model().double()
    vleff.apply_tome(other, r=2)
    with pytest.raises(
        ValueError, match="cannot apply crossget while tome is applied .*both reduce that tower's tokens"
    ):
        vleff.apply_crossget(other, r_image=2, r_text=2)


@pytest.mark.parametrize(("method", "settings"), [("tome", {"r": 2}), ("evit", {}), ("lst", {})])
def test_a_tower_hook_on_reversible_blocks_is_refused_at_apply(method, settings):
    """The reversible stack runs F and G itself, so a tower hook would be skipped: refused when it is
    applied (it used to apply and fail at the first forward), leaving the model as it was."""
    model = tm.timm_vit(depth=2).double().eval()
    apply_reversible(model, coupling="revvit")
    images = tm.images().double()
    with torch.no_grad():
        before = model(images)
    keys = set(model.state_dict())
    with pytest.raises(
        ValueError, match=rf"cannot apply {method} while reversible is applied .*remove reversible first"
    ):
        getattr(vleff, f"apply_{method}")(model, **settings)
    assert vleff.registry.applied_methods(model) == ["reversible"] and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=0, atol=0)
    vleff.remove_reversible(model)
    getattr(vleff, f"apply_{method}")(model, **settings)  # allowed once the stack is gone


def test_hook_conflicts_are_asked_both_ways_when_either_is_attached():
    """The seam every method uses: a hook's ``conflict_with`` refuses its partner whichever comes
    first, before any tower is patched."""
    from vleff.backbones import TowerHook, find_towers, get_patch
    from vleff.tokens.common import attach_hooks, remove_hooks

    class Picky(TowerHook):
        name = "picky"

        def conflict_with(self, other):
            return f"picky shares no tower with {other.name}"

    model = tm.open_clip_model().double()
    towers = find_towers(model)
    vleff.apply_tome(model, r=2, towers=towers[-1].modality)  # the conflict is on the last tower attached
    with pytest.raises(ValueError, match="cannot apply picky while tome is applied .*picky shares no tower with tome"):
        attach_hooks(towers, [Picky() for _ in towers])
    assert all(get_patch(t.root) is None or get_patch(t.root).get_hook("picky") is None for t in towers)
    vleff.remove_tome(model)
    attach_hooks(towers, [Picky() for _ in towers])
    with pytest.raises(ValueError, match="cannot apply tome while picky is applied .*picky shares no tower with tome"):
        vleff.apply_tome(model, r=2)
    remove_hooks(model, "picky")
    vleff.apply_tome(model, r=2)


def test_crossget_conflicts_are_refused_at_apply_in_both_orders():
    model = tm.open_clip_model().double()
    vleff.apply_crossget(model, r_image=2, r_text=2)
    with pytest.raises(ValueError, match="tome.*crossget|crossget.*tome"):
        vleff.apply_tome(model, r=2)
    assert vleff.registry.applied_methods(model) == ["crossget"]
