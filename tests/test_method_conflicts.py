"""Issue 24 item 16 (part): settings a method would ignore are refused, conflicts are named truthfully.

* Rev-ViT's RevNet couplings (``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, as minREV runs them) have
  no λ, β and nothing to balance: ``coupling="revvit"`` used to accept and silently ignore them.
* CrossGET refused a side method (LST reduces no token) with "both reduce that tower's tokens".
"""
from __future__ import annotations

import pytest
import tiny_models as tm
import torch

import vleff
from vleff.callbacks import Reversible
from vleff.memory.reversible import ReversibleConfig, apply_reversible


@pytest.mark.parametrize("settings", [{"lam": 0.1}, {"beta": 0.5}, {"balance": True},
                                      {"lam": 0.1, "beta": 0.1, "balance": True}])
def test_revvit_refuses_meft_only_settings(settings):
    model = tm.timm_vit(depth=2).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(settings))
    pattern = rf"coupling='revvit' takes no {first}=.*allowed with revvit: lam=1\.0, beta=1\.0, balance=False"
    for build in (lambda: ReversibleConfig(coupling="revvit", **settings),
                  lambda: Reversible(coupling="revvit", **settings),
                  lambda: apply_reversible(model, coupling="revvit", **settings)):
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
    with pytest.raises(ValueError, match="cannot apply crossget while tome is applied .*both reduce that tower's tokens"):
        vleff.apply_crossget(other, r_image=2, r_text=2)
