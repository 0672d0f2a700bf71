"""Measurement: FLOPs, throughput and memory, baseline against method, in one process.

>>> from vleff.profile import count_flops, compare_models, print_table
>>> count_flops(model.eval(), images)                # FLOPs of one forward (fused attention counted)
>>> rows = compare_models({"baseline": base, "tome": merged}, images)
>>> print_table(rows)

* :mod:`~vleff.profile.flops` — ``FlopCounterMode`` plus formulas for the ops torch counts as 0
* :mod:`~vleff.profile.throughput` — interleaved, warmed-up, median timing as a ratio
* :mod:`~vleff.profile.memory` — saved-for-backward bytes, optimizer state, peak memory
* :mod:`~vleff.profile.compare` / :mod:`~vleff.profile.report` — rows, tables, CSV/JSON/PNG

The Lightning callback that logs these during training is
:class:`vleff.callbacks.EfficiencyMonitor`.
"""

from vleff.profile.compare import compare_models, preserved_state
from vleff.profile.flops import (
    attention_backward_flops,
    attention_flops,
    count_flops,
    flop_counter,
    mha_fastpath_disabled,
)
from vleff.profile.memory import (
    optimizer_state_bytes,
    peak_memory_bytes,
    saved_activation_bytes,
    tensor_storage_bytes,
)
from vleff.profile.report import plot_rows, print_table, rows_to_csv, rows_to_json
from vleff.profile.throughput import ThroughputResult, measure_throughput

__all__ = [
    "ThroughputResult",
    "attention_backward_flops",
    "attention_flops",
    "compare_models",
    "count_flops",
    "flop_counter",
    "measure_throughput",
    "mha_fastpath_disabled",
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "plot_rows",
    "preserved_state",
    "print_table",
    "rows_to_csv",
    "rows_to_json",
    "saved_activation_bytes",
    "tensor_storage_bytes",
]
