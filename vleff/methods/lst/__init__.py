"""LST: ladder side-tuning, a width-reduced side network fed by gated ladders (Sung et al., NeurIPS 2022).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.lst.core import (
    TOWERS,
    LSTConfig,
    apply_lst,
    fisher_information,
    lst_applied,
    lst_reapply_settings,
    lst_settings,
    remove_lst,
)
from vleff.registry import Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="LST",
        settings_of=lst_settings,
        reapply_settings=lst_reapply_settings,
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reads_full_stream"}),
        refuses=(
            Refusal(
                "reduces_tokens",
                "LST reads every block's output of the full frozen token stream, which token reduction changes",
            ),
        ),
        required_on_load=True,
        name="lst",
        kind="side",
        config=LSTConfig,
        apply=apply_lst,
        remove=remove_lst,
        is_applied=lst_applied,
        callback="vleff.methods.lst.lightning.LadderSideTuning",
        mixin="vleff.methods.lst.lightning.LSTMixin",
        towers=TOWERS,
        bench_settings={"reduction": 8},
        description="LST: width-reduced side network with gated ladders, initialised from the backbone by importance",
    )
)

__all__ = ["LSTConfig", "METHOD", "TOWERS", "apply_lst", "fisher_information", "lst_applied", "remove_lst"]
