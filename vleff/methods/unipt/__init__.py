"""UniPT: universal parallel tuning over a frozen backbone's layer outputs (Diao et al., CVPR 2024).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.unipt.core import (
    TOWERS,
    UniPTConfig,
    apply_unipt,
    remove_unipt,
    unipt_applied,
    unipt_settings,
)
from vleff.registry import Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="UniPT",
        settings_of=unipt_settings,
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reads_full_stream"}),
        refuses=(
            Refusal(
                "reduces_tokens",
                "UniPT reads every block's output of the full frozen token stream, which token reduction changes",
            ),
        ),
        required_on_load=True,
        name="unipt",
        kind="side",
        config=UniPTConfig,
        apply=apply_unipt,
        remove=remove_unipt,
        is_applied=unipt_applied,
        callback="vleff.methods.unipt.lightning.UniPT",
        mixin="vleff.methods.unipt.lightning.UniPTMixin",
        towers=TOWERS,
        bench_settings={"factor": 2},
        description="UniPT: parallel interaction + confidence aggregation over frozen layer outputs, zero-init Up",
    )
)

__all__ = ["METHOD", "TOWERS", "UniPTConfig", "apply_unipt", "remove_unipt", "unipt_applied"]
