"""The conformance suite: every registered method passes the same checks on every tower it declares.

Two tables drive it: the model families (``families.FAMILIES``) and the method settings below
(no-op settings, active settings, refusals). A method that is registered but has no settings
row fails :func:`test_every_registered_method_has_settings`; a new method adds one row in
``tests/method_rows.py``.

Checks, for every hook-based method x every (family, tower) it declares:
no-op equals the library; ``remove`` restores the library bit-exactly (parameter names and
``requires_grad`` flags too); applying again replaces; ``deepcopy`` and pickle keep the output;
``state_dict`` gains only the method's own keys (keys a method moves, as ``peft``'s
``base_layer``, map back by its row's ``renamed_keys`` and keep the library's values); bf16
autocast forward and backward agree with fp32; gradient checkpointing is refused clearly (or, for
a method made of plain modules, gives the same gradients); two methods stacked and one removed
equals the other alone. Per method (one family, to keep the suite fast): ``torch.compile``
(aot_eager) in one graph; a Lightning fit with the callback, saved and resumed, equals the
uninterrupted run; the same fit under ``precision="bf16-mixed"`` moves the weights where the fp32
fit does; the mixin is importable from the
Lightning layer; each bad config value gets an error naming the field.

Host methods (MemVP) act on whole vision-language models, not on one tower: their row names
``hosts`` (``host_families.HOSTS``) instead, they are left out of the tower checks, and the
host section at the end runs the same kind of checks on every host they name (no-op equals the
host, ``remove`` restores it bit-exactly, re-apply / deepcopy / pickle / ``state_dict``, bf16);
their Lightning resume check fits the LightningModule their row's ``fit`` builds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import pickle
import re
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import torch
from families import FAMILIES, family_towers
from host_families import HOSTS
from method_rows import SETTINGS

from vleff.backbones import find_towers, get_patch
from vleff.registry import all_methods, conflict, get_method, update


def _is_host_method(name: str) -> bool:
    return name in SETTINGS and SETTINGS[name].hosts is not None


#: methods that act on towers (the host methods have their own section below)
HOOK_METHODS = [m.name for m in all_methods() if m.apply is not None and not _is_host_method(m.name)]
HOST_METHODS = [m.name for m in all_methods() if m.apply is not None and _is_host_method(m.name)]


def _families(name: str) -> tuple[str, ...] | None:
    """The families a method's row names (``None``: all; also for a method without a row yet,
    which :func:`test_every_registered_method_has_settings` reports)."""
    row = SETTINGS.get(name)
    return None if row is None else row.families


def _method_families(name: str, tower: str = "image") -> list[str]:
    """Families whose ``tower`` the method runs on, in table order."""
    return [
        f
        for f, t in family_towers(get_method(name).towers)
        if t == tower and (_families(name) is None or f in _families(name))
    ]


def _common_family(a: str, b: str) -> str | None:
    """The first family whose image tower both methods run on (``None``: they share none, so they
    can never meet on a tower and there is nothing to stack or refuse)."""
    shared = [f for f in _method_families(a) if f in _method_families(b)]
    return shared[0] if shared else None


def _first_tower(name: str) -> tuple[str, str]:
    """``(family, tower)`` for the per-method checks: the first family whose image tower the method
    runs on, else (a method on text towers only: Xattn) the first text tower it runs on."""
    for tower in ("image", "text"):
        families = _method_families(name, tower)
        if families:
            return families[0], tower
    raise AssertionError(f"{name}: its row names no family tower it runs on")


def _probe(family: str, tower: str) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """``(fn, inputs)``: the tower's forward as ``fn(model, *inputs)`` (what compile and export take)."""
    import tiny_models as tm
    from families import IMAGE, TEXT, text_inputs

    if tower == "image":
        return IMAGE[family], (tm.images(),)
    return TEXT[family], text_inputs(family)


CASES = [
    (name, fam, tower)
    for name in HOOK_METHODS
    for fam, tower in family_towers(get_method(name).towers)
    if _families(name) is None or fam in _families(name)
]
REFUSED_FAMILIES = [
    (name, fam, tower)
    for name in HOOK_METHODS
    for fam, tower in family_towers(get_method(name).towers)
    if _families(name) is not None and fam not in _families(name)
]
CASE_IDS = [f"{n}-{f}-{t}" for n, f, t in CASES]


def _model_and_forward(family: str, tower: str):
    torch.manual_seed(0)
    fam = FAMILIES[family]
    return fam.make().eval(), fam.forwards[tower]


def _apply(name: str, model: torch.nn.Module, settings: dict[str, Any], tower: str) -> None:
    method = get_method(name)
    extra = {"towers": tower} if "towers" in {f.name for f in dataclasses.fields(method.config)} else {}
    inputs = SETTINGS[name].inputs  # data besides the settings (LoRAHub's modules), built for this model
    method.apply(model, **{**extra, **settings, **(inputs(model, tower) if inputs is not None else {})})


def test_every_registered_method_has_settings():
    missing = [m.name for m in all_methods() if m.name not in SETTINGS]
    assert not missing, f"registered methods without a conformance settings row: {missing}"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_registry_entry_is_complete(name):
    method = get_method(name)
    assert method.config.method == name
    defaults = method.config()  # the defaults validate
    assert method.config.build(**method.bench_settings) is not None
    assert dataclasses.is_dataclass(defaults)
    callback, mixin = method.load_callback(), method.load_mixin()
    assert callback.__module__ == mixin.__module__ == f"vleff.methods.{name}.lightning"  # beside the method


UPDATABLE = [(m.name, f) for m in all_methods() if m.name in HOOK_METHODS for f in m.updatable]


@pytest.mark.parametrize("name, setting", UPDATABLE, ids=[f"{n}-{f}" for n, f in UPDATABLE])
def test_update_changes_every_setting_the_contract_declares_updatable(name, setting):
    """``Method.updatable`` is what ``vleff.update`` may change: each declared setting, set to its
    value in the method's active row (else its default), is accepted on an applied model and
    reaches the method (``applied_settings`` reads it back)."""
    from vleff.lightning.targets import applied_settings

    family, tower = _first_tower(name)
    model, fwd = _model_and_forward(family, tower)
    _apply(name, model, SETTINGS[name].noop or SETTINGS[name].active, tower)
    method = get_method(name)
    value = SETTINGS[name].active.get(setting, getattr(method.config(), setting))
    update(model, name, **{setting: value})
    assert applied_settings(name, model)[setting] == value


def test_contract_schedule_and_update_agree():
    for method in all_methods():
        if method.schedule is not None:
            assert method.schedule in method.updatable, (
                f"{method.name}: its schedule drives a setting update cannot change"
            )


@pytest.mark.parametrize("name", HOOK_METHODS)
def test_required_on_load_is_declared_exactly_for_methods_that_add_state(name):
    """``required_on_load`` (re-apply before loading a checkpoint) holds exactly when applying the
    method adds entries to the model's ``state_dict``: a checkpoint of such a model cannot load
    into the library model."""
    family, tower = _first_tower(name)
    model, _ = _model_and_forward(family, tower)
    before = set(model.state_dict())
    _apply(name, model, SETTINGS[name].active, tower)
    adds_state = bool(set(model.state_dict()) - before)
    assert get_method(name).required_on_load == adds_state, (name, adds_state)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_bad_config_values_get_clear_errors(name):
    method = get_method(name)
    for bad, match in SETTINGS[name].refusals:
        with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
            method.config.build(**bad)
    with pytest.raises(TypeError, match="no setting"):
        method.config.build(not_a_setting=1)


@pytest.mark.parametrize("name, family, tower", CASES, ids=CASE_IDS)
def test_noop_equals_library_and_remove_restores_it_exactly(name, family, tower):
    model, fwd = _model_and_forward(family, tower)
    method = get_method(name)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = fwd(model)
        if SETTINGS[name].noop is not None:
            _apply(name, model, SETTINGS[name].noop, tower)
            torch.testing.assert_close(fwd(model), ref, atol=1e-5, rtol=1e-5)
        _apply(name, model, SETTINGS[name].active, tower)  # applying again replaces
        assert method.is_applied(model)
        if SETTINGS[name].activate is not None:
            SETTINGS[name].activate(model)
        active = fwd(model)
        if SETTINGS[name].forward_unchanged:  # a selective method: the same function, other training
            # (as the no-op check: torch's MultiheadAttention picks another kernel once flags change)
            torch.testing.assert_close(active, ref, atol=1e-5, rtol=1e-5)
            acts = SETTINGS[name].acts or (lambda m, f: {n: p.requires_grad for n, p in m.named_parameters()} != f)
            assert acts(model, flags), "the active settings change nothing about what trains"
        else:
            assert not torch.allclose(active, ref, atol=1e-6, rtol=1e-4), "the active settings change nothing"
        method.remove(model)
        assert not method.is_applied(model)
        torch.testing.assert_close(fwd(model), ref, atol=0, rtol=0)
        for t in find_towers(model):  # the library's own forward, not a generic copy of it
            assert get_patch(t.root) is None and all("forward" not in b.__dict__ for b in t.blocks())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # same names, same flags
        with pytest.raises(ValueError, match="not applied"):
            method.remove(model)


@pytest.mark.parametrize("name, family, tower", CASES, ids=CASE_IDS)
def test_reapply_deepcopy_pickle_and_state_dict(name, family, tower):
    model, fwd = _model_and_forward(family, tower)
    keys_before = set(model.state_dict())
    _apply(name, model, SETTINGS[name].active, tower)
    once = copy.deepcopy(model)
    _apply(name, model, SETTINGS[name].active, tower)
    once.load_state_dict(model.state_dict())  # new parameters (predictors) are drawn anew
    with torch.no_grad():
        out = fwd(model)
        torch.testing.assert_close(fwd(once), out, atol=0, rtol=0)  # a second apply replaced, not stacked
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(fwd(loaded), out, atol=0, rtol=0)
        torch.testing.assert_close(fwd(pickle.loads(pickle.dumps(model))), out, atol=0, rtol=0)
    library = dict(model.state_dict())  # keys the method moved, under the library's names
    for pattern, replacement in SETTINGS[name].renamed_keys:
        library = {re.sub(pattern, replacement, k): v for k, v in library.items()}
    added = set(library) - keys_before
    prefix = SETTINGS[name].state_prefix
    replaced = SETTINGS[name].replaced_keys
    stored = set()
    if replaced is not None:  # stored in another form (QLoRA's 4-bit weights): gone, and new keys for them
        keys_before = {k for k in keys_before if not re.search(replaced[0], k)}
        stored = {k for k in added if re.search(replaced[1], k)}
        added -= stored
    assert all(prefix is not None and prefix in k for k in added), sorted(added)
    assert keys_before <= set(library)
    moved = sorted(set(library) - set(model.state_dict()) - added - stored)
    if moved:  # moved entries keep the library's values
        fresh = _model_and_forward(family, tower)[0].state_dict()
        for key in moved:
            torch.testing.assert_close(library[key], fresh[key], atol=0, rtol=0, msg=key)


def _check_bf16_against_fp32(model: torch.nn.Module, fwd: Callable[[torch.nn.Module], torch.Tensor]) -> None:
    """bf16 autocast forward points where fp32's does, and a bf16 backward gives finite gradients."""
    with torch.no_grad():
        ref = fwd(model).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fwd(model).float()
    # bf16 keeps ~3 significant digits; a merge decision may flip on a near tie, so compare
    # directions (cosine) per sample, not elements
    cos = torch.nn.functional.cosine_similarity(low.flatten(1), ref.flatten(1), dim=1)
    assert bool((cos > 0.98).all()), cos
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fwd(model).float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("name, family, tower", CASES, ids=CASE_IDS)
def test_bf16_autocast_forward_and_backward_agree_with_fp32(name, family, tower):
    model, fwd = _model_and_forward(family, tower)
    _apply(name, model, SETTINGS[name].active, tower)
    _check_bf16_against_fp32(model, fwd)


@contextlib.contextmanager
def _checkpointing(family: str, model: torch.nn.Module, reentrant: bool):
    """The library's own gradient checkpointing on ``model``: non-re-entrant, or re-entrant where
    the library offers it (timm through its global switch, restored afterwards; Hugging Face)."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        REENTRANT[family](model, reentrant) if family in REENTRANT else FAMILIES[family].grad_checkpointing(model)
        yield
    finally:
        set_reentrant_ckpt(before)


def _hf_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


#: families whose library offers re-entrant checkpointing too (open_clip's is non-re-entrant)
REENTRANT: dict[str, Callable[[torch.nn.Module, bool], None]] = {
    **{
        f: (lambda m, reentrant: m.set_grad_checkpointing(True))
        for f in ("timm_vit", "deit_distilled", "timm_registers")
    },
    "hf_clip": _hf_checkpointing,
    "hf_blip": _hf_checkpointing,
}


CHECKPOINT_CASES = [
    (*c, reentrant)
    for c in CASES
    if FAMILIES[c[1]].grad_checkpointing
    for reentrant in ((False, True) if c[1] in REENTRANT else (False,))
]


@pytest.mark.parametrize(
    "name, family, tower, reentrant",
    CHECKPOINT_CASES,
    ids=[f"{n}-{f}-{t}-{'reentrant' if r else 'nonreentrant'}" for n, f, t, r in CHECKPOINT_CASES],
)
def test_gradient_checkpointing_replays_exactly_or_is_refused_clearly(name, family, tower, reentrant, monkeypatch):
    """Under the library's checkpointing a method either gives the gradients of the same model
    without it (blocks replay from the token state they started from) or is refused, when applied
    or when run, naming checkpointing. A method whose hooks hand gradients out of the blocks (VQT,
    DynamicViT) may be refused under re-entrant checkpointing only; methods that cannot replay always are."""
    model, fwd = _model_and_forward(family, tower)
    may_refuse = not SETTINGS[name].grad_checkpointing or (reentrant and not SETTINGS[name].reentrant)
    with _checkpointing(family, model, reentrant):
        model.train()
        try:
            _apply(name, model, SETTINGS[name].active, tower)
            SETTINGS[name].activate(model) if SETTINGS[name].activate is not None else None
            plain = copy.deepcopy(model)
            _disable_checkpointing(family, plain)
            grads = []
            replays = _count_replays(monkeypatch)
            for m in (plain, model):
                torch.manual_seed(0)  # the same random decisions (DynamicViT's Gumbel noise) in both runs
                fwd(m).square().mean().backward()
                grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        except (RuntimeError, ValueError) as err:
            if not may_refuse or "gradient checkpointing" not in str(err):
                raise
            return
    assert SETTINGS[name].grad_checkpointing, f"{name} ran under checkpointing but its row says it is refused"
    patched_blocks = [b for t in find_towers(model) if get_patch(t.root) is not None for b in t.blocks()]
    if any(p.grad is not None for b in patched_blocks for p in b.parameters()):  # backward ran through them
        assert replays, f"{family}: no block of the patched tower was recomputed in backward (checkpointing lost)"
    assert grads[0] and set(grads[0]) == set(grads[1])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def _is_method_parameter(name: str) -> bool:
    return any(part.startswith("vleff_") for part in name.split("."))


PAIR_CHECKPOINT_CASES = [
    (name, family)
    for name in HOOK_METHODS
    if get_method(name).needs_pair and SETTINGS[name].grad_checkpointing
    for family in _method_families(name)
]


@pytest.mark.parametrize("name, family", PAIR_CHECKPOINT_CASES, ids=[f"{n}-{f}" for n, f in PAIR_CHECKPOINT_CASES])
def test_pair_training_step_with_its_losses_replays_exactly(name, family):
    """A pair method's training step (both towers, its cross-modal loss paired in the second
    tower's last block) under non-re-entrant checkpointing gives the gradients of the plain model:
    the replayed last block pairs with what the forward paired with."""
    from vleff.tokens.aux import pop_aux_losses

    torch.manual_seed(0)
    model = FAMILIES[family].make()
    _apply(name, model, SETTINGS[name].active, "image")
    SETTINGS[name].activate(model) if SETTINGS[name].activate is not None else None
    with torch.no_grad():  # the method's parameters away from their start values
        for n, p in model.named_parameters():
            if _is_method_parameter(n):
                p.add_(torch.randn_like(p) * 0.1)
    plain = copy.deepcopy(model)
    grads = []
    with _checkpointing(family, model, reentrant=False):
        for m in (plain, model):
            m.train()
            torch.manual_seed(0)
            loss = sum(fwd(m).square().mean() for fwd in FAMILIES[family].forwards.values())
            aux = pop_aux_losses(m)
            assert aux and all(v.requires_grad for v in aux.values()), f"{name} made no trainable pair loss"
            (loss + sum(aux.values())).backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert any(_is_method_parameter(n) for n in grads[0]), "the method's parameters got no gradient"
    assert set(grads[0]) == set(grads[1])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


def _count_replays(monkeypatch) -> list[int]:
    """Block indices the patched towers run in backward (gradient checkpointing's recomputation)."""
    from vleff.backbones import patch

    replays: list[int] = []
    run = patch.TowerPatch.run

    def counted(self, index, *args, **kwargs):
        if patch.in_backward():
            replays.append(index)
        return run(self, index, *args, **kwargs)

    monkeypatch.setattr(patch.TowerPatch, "run", counted)
    return replays


def _disable_checkpointing(family: str, model: torch.nn.Module) -> None:
    if family.startswith("hf_"):
        model.gradient_checkpointing_disable()
    else:
        model.set_grad_checkpointing(False)


def _refuses(a: str, b: str) -> bool:
    """``a``'s own conflict rules refuse ``b`` on the family both are checked on (the registry's
    declarative contract: traits and refusals, never lists of method names)."""
    family = _common_family(a, b)
    return family is not None and get_method(a).refusal_of(get_method(b), family) is not None


def _conflict(a: str, b: str) -> bool:
    return conflict(a, b, _common_family(a, b)) is not None


# pairs derived from the rules: ``a`` declares the rule, so ``a`` applied after ``b`` is refused at apply
CONFLICTS = [(a, b) for a in HOOK_METHODS for b in HOOK_METHODS if a != b and _refuses(a, b)]
# tome + dynamicvit are left out: DynamicViT's training-time masks and ToMe's merged sizes are not
# checked together (neither refuses the other)
STACKABLE = [
    (a, b)
    for a in HOOK_METHODS
    for b in HOOK_METHODS
    if a != b and {a, b} != {"tome", "dynamicvit"} and not _conflict(a, b) and _common_family(a, b)
]


@pytest.mark.parametrize("name, family, tower", REFUSED_FAMILIES, ids=[f"{n}-{f}-{t}" for n, f, t in REFUSED_FAMILIES])
def test_unsupported_families_are_refused_clearly(name, family, tower):
    model, fwd = _model_and_forward(family, tower)
    with torch.no_grad():
        ref = fwd(model)
        with pytest.raises(TypeError, match="does not support"):
            _apply(name, model, SETTINGS[name].active, tower)
        assert not get_method(name).is_applied(model)
        torch.testing.assert_close(fwd(model), ref, atol=0, rtol=0)  # refused before changing anything


@pytest.mark.parametrize("name, other", CONFLICTS, ids=[f"{a}+{b}" for a, b in CONFLICTS])
def test_conflicting_methods_are_refused_clearly(name, other):
    """``name`` refuses to join ``other`` (applied first) with an error naming both; applied
    the other way round, ``other`` refuses too (naming ``name``), or the stack refuses at the
    first forward."""
    model, fwd = _model_and_forward(_common_family(name, other), "image")
    _apply(other, model, SETTINGS[other].active, "image")
    with pytest.raises(ValueError, match=f"cannot apply {name} while {other}"):
        _apply(name, model, SETTINGS[name].active, "image")
    get_method(other).remove(model)
    _apply(name, model, SETTINGS[name].active, "image")
    names = name.upper() + "|" + name
    try:
        _apply(other, model, SETTINGS[other].active, "image")
    except ValueError as refused:  # refused when applied: the earlier method is untouched
        assert re.search(f"cannot apply {other} while ({names})", str(refused)), refused
        assert get_method(name).is_applied(model) and not get_method(other).is_applied(model)
        return
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match=names):
        fwd(model)


@pytest.mark.parametrize("first, second", STACKABLE, ids=[f"{a}+{b}" for a, b in STACKABLE])
def test_two_methods_stacked_then_one_removed_equals_the_other_alone(first, second):
    """Apply ``first`` then ``second``, remove ``first``: the model equals ``second`` alone
    (the bug this catches: ToMe's proportional attention outliving ToMe under EViT)."""
    model, fwd = _model_and_forward(_common_family(first, second), "image")
    alone = copy.deepcopy(model)
    with torch.no_grad():
        _apply(first, model, SETTINGS[first].active, "image")
        _apply(second, model, SETTINGS[second].active, "image")
        fwd(model)  # the stack runs
        get_method(first).remove(model)
        _apply(second, alone, SETTINGS[second].active, "image")
        if SETTINGS[second].state_prefix:  # new parameters: same initial values in both
            alone.load_state_dict(model.state_dict())
        torch.testing.assert_close(fwd(model), fwd(alone), atol=0, rtol=0)


@pytest.mark.parametrize("name", HOOK_METHODS)
def test_torch_compile_one_graph_matches_eager(name):
    import torch._dynamo

    family, tower = _first_tower(name)  # the first family whose image tower the method runs on
    model, _ = _model_and_forward(family, tower)
    _apply(name, model, SETTINGS[name].active, tower)
    forward, inputs = _probe(family, tower)
    fullgraph = SETTINGS[name].fullgraph

    def fwd(m, *xs):
        return forward(m, *xs)

    with torch.no_grad():
        ref = fwd(model, *inputs)
        torch._dynamo.reset()
        # fullgraph=True raises at the first graph break, naming it (one dynamo trace, not a second
        # one through torch._dynamo.explain); graph breaks at data-dependent counts: the cheap "eager"
        # backend still checks dynamo traces it right
        compiled = torch.compile(fwd, backend="aot_eager" if fullgraph else "eager", fullgraph=fullgraph)
        torch.testing.assert_close(compiled(model, *inputs), ref, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


class _TowerForward(torch.nn.Module):
    """One family's tower forward as a module (what ``torch.export`` and ONNX take)."""

    def __init__(self, model: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, *inputs)


def _exportable_model(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    family, tower = _first_tower(name)
    model, _ = _model_and_forward(family, tower)
    _apply(name, model, SETTINGS[name].active, tower)
    SETTINGS[name].activate(model) if SETTINGS[name].activate is not None else None
    forward, inputs = _probe(family, tower)
    return _TowerForward(model.eval(), forward).eval(), inputs


@pytest.mark.parametrize("name", HOOK_METHODS)
def test_torch_export_matches_eager_or_is_refused_clearly(name):
    """Deployment: ``torch.export`` of the patched model (static settings, inference) gives the
    eager output, or, for a method whose token counts depend on the data, a clear refusal."""
    module, inputs = _exportable_model(name)
    if not SETTINGS[name].exportable:
        with pytest.raises(RuntimeError, match="torch.export cannot take"):
            torch.export.export(module, inputs)
        return
    exported = torch.export.export(module, inputs)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), module(*inputs), atol=1e-6, rtol=1e-5)


ONNX_METHODS = [n for n in HOOK_METHODS if get_method(n).kind == "tokens" and SETTINGS[n].exportable]


@pytest.mark.parametrize("name", ONNX_METHODS)
def test_onnx_export_runs_in_onnxruntime_like_eager(name, tmp_path):
    """A merged or pruned model deployed through ONNX (the dynamo exporter) and run by onnxruntime
    gives the eager output."""
    ort = pytest.importorskip("onnxruntime")
    module, inputs = _exportable_model(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(module, inputs, dynamo=True, verbose=False).save(str(path))
    session = ort.InferenceSession(str(path))
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    (out,) = session.run(None, feeds)[:1]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), module(*inputs), atol=1e-5, rtol=1e-4)


class ReseedEachStep(pl.Callback):
    """Same random numbers at each global step in both runs (Lightning checkpoints do not hold
    the global RNG state), so a method drawing random decisions can be compared exactly."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + trainer.global_step)


def _fit(
    tmp_path,
    name: str,
    max_steps: int,
    ckpt: str | None = None,
    save: str | None = None,
    precision: str = "32-true",
    extra: tuple[pl.Callback, ...] = (),
) -> torch.nn.Module:
    torch.manual_seed(0)
    callback = get_method(name).load_callback()(**SETTINGS[name].callback_args)
    fit = SETTINGS[name].fit
    module, loader = fit() if fit is not None else (tl.TinyClassifier(), tl.loader(4, seed=1))
    trainer = tl.trainer(
        tmp_path, [callback, *extra, ReseedEachStep()], max_steps=max_steps, max_epochs=-1, precision=precision
    )
    # one batch per epoch: Lightning restarts a resumed epoch at a batch index that depends on how
    # the first run stopped; with one batch every step sees the same data either way
    trainer.fit(module, loader, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module


@pytest.mark.parametrize("name", [n for n in sorted(SETTINGS) if SETTINGS[n].callback_args])
def test_callback_fit_saved_and_resumed_equals_uninterrupted(name, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        straight = _fit(tmp_path, name, 4)
        ckpt = str(tmp_path / "half.ckpt")
        _fit(tmp_path, name, 2, save=ckpt)
        torch.manual_seed(1234)  # resume must not depend on the global RNG state being the same
        resumed = _fit(tmp_path, name, 4, ckpt=ckpt)
    finally:
        torch.use_deterministic_algorithms(False)
    assert set(straight.state_dict()) == set(resumed.state_dict())
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=key)


class _StateAtTrainStart(pl.Callback):
    """The module's floating-point state when training starts (after the method's callback
    added its parameters in ``setup``)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {
            k: v.detach().float().clone()
            for k, v in pl_module.state_dict().items()
            if torch.is_tensor(v) and v.is_floating_point()
        }


def _trained_delta(tmp_path, name: str, precision: str, steps: int = 3) -> torch.Tensor:
    """How far ``steps`` optimizer steps with the method's callback move the module's state."""
    start = _StateAtTrainStart()
    after = _fit(tmp_path, name, steps, precision=precision, extra=(start,)).state_dict()
    return torch.cat([(after[k].float() - v).flatten() for k, v in start.state.items()])


@pytest.mark.parametrize("name", [n for n in sorted(SETTINGS) if SETTINGS[n].callback_args])
def test_callback_fit_in_bf16_mixed_follows_the_fp32_fit(name, tmp_path):
    """``Trainer(precision="bf16-mixed")``: the same steps move the weights where fp32's do
    (bf16 rounding of the forward only: cosine > 0.95, length within 10 %)."""
    ref = _trained_delta(tmp_path, name, "32-true")
    mixed = _trained_delta(tmp_path, name, "bf16-mixed")
    assert ref.norm() > 0, "the fp32 fit moved nothing: the comparison would be empty"
    assert torch.nn.functional.cosine_similarity(mixed, ref, dim=0) > 0.95
    assert mixed.norm().item() == pytest.approx(ref.norm().item(), rel=0.1)


# --- host methods (MemVP): the same guarantees on whole vision-language host models -------------------
HOST_CASES = [(name, host) for name in HOST_METHODS for host in SETTINGS[name].hosts or ()]
HOST_IDS = [f"{n}-{h}" for n, h in HOST_CASES]


def _host(host: str) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    return HOSTS[host].make().eval(), HOSTS[host].forward


def _hooks_of(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


@pytest.mark.parametrize("name, host", HOST_CASES, ids=HOST_IDS)
def test_host_method_noop_equals_host_and_remove_restores_it_exactly(name, host):
    model, fwd = _host(host)
    method, row = get_method(name), SETTINGS[name]
    hooks_before = _hooks_of(model)
    with torch.no_grad():
        ref = fwd(model)
        if row.noop is not None:
            method.apply(model, **row.noop)
            torch.testing.assert_close(fwd(model), ref, atol=0, rtol=0)  # bit-exact: the host's own forward runs
        method.apply(model, **row.active)  # applying again replaces
        assert method.is_applied(model)
        if row.activate is not None:
            row.activate(model)
        assert not torch.allclose(fwd(model), ref, atol=1e-6, rtol=1e-4), "the active settings change nothing"
        method.remove(model)
        assert not method.is_applied(model)
        torch.testing.assert_close(fwd(model), ref, atol=0, rtol=0)
    assert _hooks_of(model) == hooks_before  # no hook left behind
    with pytest.raises(ValueError, match="not applied"):
        method.remove(model)


@pytest.mark.parametrize("name, host", HOST_CASES, ids=HOST_IDS)
def test_host_method_reapply_deepcopy_pickle_and_state_dict(name, host):
    model, fwd = _host(host)
    method, row = get_method(name), SETTINGS[name]
    keys_before = set(model.state_dict())
    method.apply(model, **row.active)
    once = copy.deepcopy(model)
    method.apply(model, **row.active)
    if row.activate is not None:
        row.activate(model)
    once.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = fwd(model)
        torch.testing.assert_close(fwd(once), out, atol=0, rtol=0)  # a second apply replaced, not stacked
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(fwd(torch.load(buffer, weights_only=False)), out, atol=0, rtol=0)
        torch.testing.assert_close(fwd(pickle.loads(pickle.dumps(model))), out, atol=0, rtol=0)
    added = set(model.state_dict()) - keys_before
    assert added and all(row.state_prefix is not None and row.state_prefix in k for k in added), sorted(added)
    assert keys_before <= set(model.state_dict())


@pytest.mark.parametrize("name, host", HOST_CASES, ids=HOST_IDS)
def test_host_method_bf16_autocast_forward_and_backward_agree_with_fp32(name, host):
    model, fwd = _host(host)
    method, row = get_method(name), SETTINGS[name]
    method.apply(model, **row.active)
    if row.activate is not None:
        row.activate(model)
    _check_bf16_against_fp32(model, fwd)
