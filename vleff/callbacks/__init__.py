"""Lightning callbacks and mixins, by name: ``vleff.callbacks.EViT``, ``vleff.callbacks.EViTMixin``.

This package is a facade. Each method's callback and mixin live beside the method, in
``vleff/methods/<name>/lightning.py``, and the method's registry entry names them
(``Method.callback``, ``Method.mixin``): the table below is read from the registry, so a new
method adds no line here. What every method's Lightning code shares (which model, ``init_from``,
checkpoint records, aux-loss attachment, optimizer conversion) is in :mod:`vleff.lightning`; the
measurement callback ``EfficiencyMonitor`` is here. Imported lazily so ``import vleff.callbacks``
stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from vleff._lazy import lazy_getattr

#: names that belong to no single method
SHARED = {
    "EfficiencyMonitor": "vleff.callbacks.efficiency",
    "AuxLoss": "vleff.lightning.aux_loss",
    "AuxLossMixin": "vleff.lightning.mixin",
    "restore_methods": "vleff.lightning.restore",
    "PEFT": "vleff.lightning.peft",
    "PeftMixin": "vleff.lightning.peft",
}


class _Exports(Mapping[str, str]):
    """Public name -> defining module: :data:`SHARED` and every registered method's callback and
    mixin (read from the registry on first use)."""

    def __init__(self, kinds: tuple[str, ...] = ("callback", "mixin")) -> None:
        self.kinds = kinds
        self._table: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._table is None:
            from vleff.registry import all_methods

            table = {n: m for n, m in SHARED.items() if "mixin" in self.kinds or not n.endswith("Mixin")}
            for method in all_methods():
                for kind in self.kinds:
                    path = getattr(method, kind)
                    if path:
                        module, _, name = path.rpartition(".")
                        table[name] = module
            self._table = table
        return self._table

    def __getitem__(self, name: str) -> str:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()


_EXPORTS = _Exports()
_lookup = lazy_getattr("vleff.callbacks", _EXPORTS, submodules=("mixins", "efficiency"), list_available=True)


def __getattr__(name: str) -> object:
    if name == "__all__":
        return sorted(_EXPORTS)
    return _lookup(name)


def __dir__() -> list[str]:
    return sorted(_EXPORTS)
