"""Serial adapter (Houlsby et al., ICML 2019): bottleneck adapters after every block's attention
and MLP (:mod:`.core`). The Lightning callback and mixin live in :mod:`.lightning`; importing this
package registers the method."""

from __future__ import annotations

from vleff.methods.serial_adapter.core import (
    TOWERS,
    SerialAdapterConfig,
    apply_serial_adapter,
    remove_serial_adapter,
    serial_adapter_applied,
    serial_adapter_num_parameters,
    serial_adapter_parameters,
)
from vleff.registry import Method, Refusal, register_method
from vleff.side.common import FREEZES_PEFT_TUNERS

METHOD = register_method(
    Method(
        display_name="Serial adapter",
        name="serial_adapter",
        kind="side",
        config=SerialAdapterConfig,
        apply=apply_serial_adapter,
        remove=remove_serial_adapter,
        is_applied=serial_adapter_applied,
        # the adapters rewrite sublayer outputs through the branch seam; token methods, early exit
        # and other hooks keep working (the tower_hook trait brings the shared refusals)
        traits=frozenset({"tower_hook"}),
        # applying the adapter freezes the backbone, a peft tuner's adapters in it included; a peft
        # tuner applied after it would freeze the adapters: refused both ways, naming both
        refuses=(Refusal("peft_tuner", FREEZES_PEFT_TUNERS),),
        required_on_load=True,
        callback="vleff.methods.serial_adapter.lightning.SerialAdapter",
        mixin="vleff.methods.serial_adapter.lightning.SerialAdapterMixin",
        towers=TOWERS,
        bench_settings={"bottleneck": 64},
        description="Serial adapter (Houlsby): a bottleneck after each block's attention and MLP",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "SerialAdapterConfig",
    "apply_serial_adapter",
    "remove_serial_adapter",
    "serial_adapter_applied",
    "serial_adapter_num_parameters",
    "serial_adapter_parameters",
]
