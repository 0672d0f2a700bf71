"""MuE: similarity-based early exit per sample (Tang et al., "You Need Multiple Exiting", CVPR 2023).

The method's folder: :mod:`.core` holds its config, hook and ``apply``/``remove``; the Lightning
callback and mixin live beside it and the core never imports them. Importing this package
registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.mue.core import (
    TOWERS,
    MuEConfig,
    apply_mue,
    mue_applied,
    mue_budget_steps,
    mue_decoder_loss,
    mue_decoder_threshold,
    mue_exit_blocks,
    remove_mue,
    update_mue,
)
from vleff.registry import Budget, Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="MuE",
        # exited samples skip the remaining blocks: a block runs on part of the batch, which must keep
        # one token count, and hooks that read every block's output would read blocks never run
        traits=frozenset({"tower_hook", "exits_samples"}),
        refuses=(
            Refusal(
                "reduces_tokens",
                "MuE runs each block on the samples that have not exited while the others keep their tokens, "
                "so every sample of the batch must keep one token count; a method that reduces tokens per block "
                "would leave exited and running samples with different counts",
            ),
            Refusal(
                "reads_full_stream",
                "a side network reads every block's output of the tower, and a sample MuE exited has no output "
                "for the blocks it skipped",
            ),
            Refusal(
                "runs_blocks",
                "the method runs the tower's blocks itself, so MuE's exit hook would never run",
            ),
        ),
        updatable=("image_threshold", "text_threshold", "decoder_threshold", "decoder_max_length"),
        name="mue",
        kind="tokens",
        config=MuEConfig,
        apply=apply_mue,
        remove=remove_mue,
        update=update_mue,
        is_applied=mue_applied,
        callback="vleff.methods.mue.lightning.MuE",
        mixin="vleff.methods.mue.lightning.MuEMixin",
        towers=TOWERS,
        bench_settings={"image_threshold": 0.99},
        description="MuE: each sample leaves the tower when a block barely changes its tokens (cosine > threshold)",
        # the exit threshold of every tower MuE is on, stepped through the cosines the batches reach;
        # the cosines come from the model's weights, so a trained model is fitted again
        budget=Budget("threshold", steps=mue_budget_steps, data_dependent=True),
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "MuEConfig",
    "apply_mue",
    "mue_applied",
    "mue_decoder_loss",
    "mue_decoder_threshold",
    "mue_exit_blocks",
    "remove_mue",
    "update_mue",
]
