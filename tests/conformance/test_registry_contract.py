"""The registry's declarative contract: traits and refusals instead of name lists, validated when
a method is registered, and :func:`vleff.registry.conflict` asked both ways."""

from dataclasses import dataclass

import pytest

from vleff.registry import TRAITS, Method, MethodConfig, Refusal, all_methods, builtin_method_names, conflict


@dataclass
class _Config(MethodConfig):
    method = "probe"
    level: int = 1


def _method(**contract) -> Method:
    return Method(name="probe", kind="tokens", config=_Config, apply=None, remove=None, **contract)


def test_unknown_traits_and_rules_are_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="trait='fewer_tokens' is not known; use one of tower_hook"):
        Refusal("fewer_tokens", "why")
    with pytest.raises(ValueError, match=r"traits \['fast'\] are not known"):
        _method(traits=frozenset({"fast"}))


def test_updatable_and_schedule_must_name_settings_and_need_an_update():
    with pytest.raises(ValueError, match=r"updatable names \['speed'\], which are not settings of _Config"):
        _method(updatable=("speed",), update=lambda model, **c: None)
    with pytest.raises(ValueError, match=r"schedule names \['speed'\]"):
        _method(schedule="speed")
    with pytest.raises(ValueError, match="declares updatable settings but no update function"):
        _method(updatable=("level",))


def test_a_rule_is_written_once_and_asked_both_ways():
    reader = _method(
        traits=frozenset({"reads_full_stream"}), refuses=(Refusal("reduces_tokens", "reads the full stream"),)
    )
    reducer = _method(traits=frozenset({"reduces_tokens"}))
    assert reader.refusal_of(reducer).reason == "reads the full stream"
    assert reducer.refusal_of(reader) is None  # one direction holds the rule ...
    assert conflict("lst", "tome") == conflict("tome", "lst") is not None  # ... conflict() asks both


def test_family_scoped_rules_apply_only_on_their_families():
    assert conflict("lora", "tome", "open_clip") is not None
    assert conflict("lora", "tome", "timm_vit") is None


def test_builtin_methods_are_found_by_their_folders():
    names = builtin_method_names()
    assert {"tome", "madtp", "galore", "memvp"} <= set(names)
    assert names == sorted(m.name for m in all_methods() if m.name in names)
    assert all(t in TRAITS for m in all_methods() for t in m.traits)


def test_a_declared_rule_is_enforced_when_hooks_attach_without_hook_code():
    """A new method declares its refusal once in its registry entry; the backbone layer enforces it
    on every tower, in either order, and its hook needs no ``conflict_with`` of its own."""
    import tiny_models as tm
    import torch

    import vleff
    from vleff import registry
    from vleff.backbones import TowerHook, find_towers
    from vleff.tokens.common import attach_hooks, remove_hooks

    class ProbeHook(TowerHook):
        name = "probe"

    registry.register_method(
        _method(traits=frozenset({"tower_hook"}), refuses=(Refusal("reduces_tokens", "the probe needs every token"),))
    )
    try:
        model = tm.timm_vit(depth=2).eval()
        attach_hooks(find_towers(model), [ProbeHook()])
        with pytest.raises(ValueError, match="cannot apply tome while probe is applied .*the probe needs every token"):
            vleff.apply_tome(model, r=2)
        remove_hooks(model, "probe")
        vleff.apply_tome(model, r=2)
        with pytest.raises(ValueError, match="cannot apply probe while tome is applied .*the probe needs every token"):
            attach_hooks(find_towers(model), [ProbeHook()])
        with torch.no_grad():
            model(tm.images())  # the refused attach left the model running
    finally:
        registry._METHODS.pop("probe", None)
