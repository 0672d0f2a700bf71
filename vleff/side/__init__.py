"""What the side-tuning methods share (:mod:`vleff.side.common`: layer reader, final-feature
insertion, freezing, the unfrozen-backbone refusal, side-only state dicts), and the side methods'
public names for code written against vleff 0.1 (each method lives in ``vleff/methods/<name>/``):

* VQT (:mod:`vleff.methods.vqt`), LST (:mod:`vleff.methods.lst`), UniPT (:mod:`vleff.methods.unipt`),
  MemVP (:mod:`vleff.methods.memvp`), LoRA through ``peft`` (:mod:`vleff.methods.lora`).

The names are resolved lazily, so importing :mod:`vleff.side.common` from a method never imports
the other methods.
"""

from __future__ import annotations

from vleff._lazy import lazy_getattr

_COMMON = (
    "backbone_eval",
    "freeze_backbone",
    "load_side_state_dict",
    "refuse_unfrozen_backbone",
    "side_state_dict",
    "unfrozen_backbone_parameters",
)
_LAZY = {
    **{name: "vleff.side.common" for name in _COMMON},
    **{
        name: "vleff.methods.lst"
        for name in ("LSTConfig", "apply_lst", "fisher_information", "lst_applied", "remove_lst")
    },
    **{
        name: "vleff.methods.memvp"
        for name in ("MemVPConfig", "apply_memvp", "memvp_applied", "remove_memvp", "set_memvp_memory")
    },
    **{name: "vleff.methods.unipt" for name in ("UniPTConfig", "apply_unipt", "remove_unipt", "unipt_applied")},
    **{
        name: "vleff.methods.vqt"
        for name in ("VQTConfig", "apply_vqt", "freeze_backbone_for_vqt", "remove_vqt", "vqt_applied", "vqt_parameters")
    },
}
__getattr__ = lazy_getattr("vleff.side", _LAZY, ("common",))
__all__ = sorted(_LAZY)  # noqa: PLE0605 -- a list, built from the table above


def __dir__() -> list[str]:
    return sorted(_LAZY)
