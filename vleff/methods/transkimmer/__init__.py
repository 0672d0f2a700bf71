"""Transkimmer: learned layer-wise token skimming (Guan et al., ACL 2022).

The method's folder: :mod:`.core` holds its config, hook and ``apply``/``remove``; the Lightning
callback and mixin live beside it and the core never imports them. Importing this package
registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.transkimmer.core import (
    TOWERS,
    UPDATABLE,
    TranskimmerConfig,
    apply_transkimmer,
    remove_transkimmer,
    transkimmer_applied,
    transkimmer_budget_steps,
    update_transkimmer,
)
from vleff.registry import Budget, Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="Transkimmer",
        traits=frozenset({"tower_hook", "reduces_tokens"}),
        refuses=(
            Refusal(
                "reduces_tokens",
                "Transkimmer puts every token back at its input position at the end of the tower (skimmed "
                "tokens forwarded to the output); a second method changing the sequence would leave positions "
                "without a token or tokens without a position",
            ),
        ),
        required_on_load=True,
        updatable=UPDATABLE,
        name="transkimmer",
        kind="tokens",
        config=TranskimmerConfig,
        apply=apply_transkimmer,
        remove=remove_transkimmer,
        update=update_transkimmer,
        is_applied=transkimmer_applied,
        callback="vleff.methods.transkimmer.lightning.Transkimmer",
        mixin="vleff.methods.transkimmer.lightning.TranskimmerMixin",
        towers=TOWERS,
        # untrained predictors (the unbalanced init) skim nothing: the benchmark shows their overhead
        # (ViT-B/16: 1.079x the FLOPs); a trained model's counts need its trained predictors
        bench_settings={},
        description="Transkimmer learned layer-wise token skimming (skim predictors + skim loss)",
        # the inference keep threshold, stepped through the keep margins the predictors give on the
        # batches; the margins come from the trained predictors, so a trained model is fitted again
        budget=Budget("keep_threshold", steps=transkimmer_budget_steps, data_dependent=True),
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "TranskimmerConfig",
    "apply_transkimmer",
    "remove_transkimmer",
    "transkimmer_applied",
    "update_transkimmer",
]
