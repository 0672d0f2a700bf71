"""The rules every method callback keeps (issue 24, items 2, 7 and 9; :mod:`vleff.lightning.targets`).

* Which model: a LightningModule holding a frozen teacher and a student is refused without
  ``module=`` (the error lists both); ``module="student"`` (or the module object) changes the
  student only: the teacher's outputs stay bit-identical and its ``requires_grad`` flags too.
* Already applied: a callback whose method is on the model with other settings refuses,
  naming both settings; with the same settings it keeps the applied (trained) state.
* ``remove_on_teardown``: teardown gives the plain model with the flags it had before the
  callback; a later run with the same callback re-applies the *trained* method.

Tiny float64 models; the callbacks' ``setup``/``teardown`` are called as Lightning calls them
(one real fit for the LST scenario of the issue).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from families import FAMILIES
from host_families import HOSTS
from method_rows import SETTINGS

from vleff.registry import all_methods, get_method


@dataclass(frozen=True)
class Case:
    """A method callback's rule case, derived from the method's row (``tests/method_rows.py``)
    and its registry entry: no table here names a method."""

    callback: type  # the registry entry's Lightning callback
    settings: dict[str, Any]  # the callback's settings
    make: Callable[[], torch.nn.Module]
    forward: Callable[[torch.nn.Module], torch.Tensor]
    other: dict[str, Any]  # settings of an earlier application that the callback must refuse


def _model_of(name: str) -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]:
    """The first model the method's row supports, and a forward through every tower it changes."""
    row = SETTINGS[name]
    if row.hosts:
        return HOSTS[row.hosts[0]].make, HOSTS[row.hosts[0]].forward
    towers = get_method(name).towers
    family = next(f for f in FAMILIES.values() if row.families is None or f.name in row.families)
    forwards = [fwd for tower, fwd in family.forwards.items() if tower in towers]
    return family.make, lambda model: torch.cat([fwd(model).flatten(1) for fwd in forwards], 1)


def _case(name: str) -> Case:
    row = SETTINGS[name]
    assert row.applied_other is not None, f"{name}: its row needs applied_other (a callback's method)"
    make, forward = _model_of(name)
    settings = row.rules_args if row.rules_args is not None else row.callback_args
    return Case(get_method(name).load_callback(), settings, make, forward, row.applied_other)


#: every method whose callback changes the model (GaLore and MeZO change the optimizer)
CASES: dict[str, Case] = {m.name: _case(m.name) for m in all_methods() if m.apply is not None}
#: the settings of the callback that are not method settings
CALLBACK_ONLY = {"end_epoch"}


def _differs(name: str) -> str:
    """The setting the earlier application and the callback differ in (the one the refusal names)."""
    method, case = get_method(name), CASES[name]
    mine = method.config.build(**_config_settings(name, case.settings))
    theirs = method.config.build(**case.other)
    keys = [f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name)]
    assert keys, f"{name}: its row's applied_other equals the callback's settings"
    return keys[0]


class Two(pl.LightningModule):
    """A frozen teacher beside a student (knowledge distillation, EMA, reference models)."""

    def __init__(self, make: Callable[[], torch.nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.teacher = make().eval()
        self.student = make().eval()
        self.teacher.requires_grad_(False)


class One(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def _callback(case: Case, **extra: Any) -> pl.Callback:
    return case.callback(**case.settings, **extra)


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _method_settings(case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in CALLBACK_ONLY}


def _config_settings(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The method's config fields among ``settings`` (not the data its apply takes besides them:
    LoRAHub's ``modules`` and ``examples``)."""
    fields = {f.name for f in dataclasses.fields(get_method(name).config)}
    return {k: v for k, v in settings.items() if k in fields}


def _inputs(name: str, model: torch.nn.Module) -> dict[str, Any]:
    """The data the method's apply takes besides its settings, built for ``model`` (its row's ``inputs``)."""
    inputs = SETTINGS[name].inputs
    return inputs(model, "all") if inputs is not None else {}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return tl.trainer(tmp_path_factory.mktemp("rules"))


# --- item 2: which model ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_two_models_without_module_are_refused_listing_both(name, trainer):
    case = CASES[name]
    two = Two(case.make)
    with pytest.raises(ValueError, match=r"teacher.*student.*module="):
        _callback(case).setup(trainer, two, "validate")
    method = get_method(name)
    assert not method.is_applied(two.teacher) and not method.is_applied(two.student)


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_student_changes_the_student_only(name, trainer):
    case = CASES[name]
    two = Two(case.make)
    with torch.no_grad():
        before = case.forward(two.teacher)
    flags = _flags(two.teacher)
    # the attribute path for most, the module object for every other one (both are accepted)
    module = "student" if sorted(CASES).index(name) % 2 == 0 else two.student
    callback = _callback(case, module=module)
    callback.setup(trainer, two, "validate")
    try:
        method = get_method(name)
        assert method.is_applied(two.student) and not method.is_applied(two.teacher)
        with torch.no_grad():
            after = case.forward(two.teacher)
        torch.testing.assert_close(after, before, rtol=0, atol=0)  # bit-identical
        assert _flags(two.teacher) == flags
    finally:
        callback.teardown(trainer, two, "validate")


def test_module_argument_is_checked_at_construction():
    import vleff.callbacks

    for bad in ("", "a..b", 3, ["student"]):
        with pytest.raises(ValueError, match=r"module=.*not allowed.*attribute path"):
            vleff.callbacks.LadderSideTuning(module=bad)
    with pytest.raises(ValueError, match=r"module='pupil'.*no attribute 'pupil'"):
        vleff.callbacks.LoRA(r=2, module="pupil").setup(None, Two(tm.timm_vit), "validate")  # type: ignore[arg-type]


def test_module_object_outside_the_lightning_module_is_refused(trainer):
    stranger = tm.timm_vit().double()
    with pytest.raises(ValueError, match="not part of Two"):
        vleff_callback = _callback(CASES["lst"], module=stranger)
        vleff_callback.setup(trainer, Two(tm.timm_vit), "validate")


def test_apply_crossget_on_a_module_with_two_pairs_is_refused():
    from vleff.tokens.crossget import apply_crossget, crossget_applied

    two = Two(tm.open_clip_model)
    with pytest.raises(ValueError, match=r"2 image-text models \(teacher, student\)"):
        apply_crossget(two, r_image=2, r_text=4)
    assert not crossget_applied(two)
    apply_crossget(two.student, r_image=2, r_text=4)  # one of them: fine


# --- item 7: already applied -----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_applied_with_other_settings_is_refused_naming_both(name, trainer):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make()
    get_method(name).apply(model, **case.other, **_inputs(name, model))
    key = _differs(name)
    have = getattr(get_method(name).config.build(**case.other), key)
    want = getattr(get_method(name).config.build(**_config_settings(name, case.settings)), key)
    pattern = rf"already applied.*{re.escape(f'{key}={have!r}')}.*asks for {re.escape(f'{key}={want!r}')}"
    with pytest.raises(ValueError, match=pattern):
        _callback(case).setup(trainer, One(model), "validate")


@pytest.mark.parametrize("name", sorted(CASES))
def test_applied_with_the_same_settings_is_kept(name, trainer):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make()
    get_method(name).apply(model, **_method_settings(case, case.settings))
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    callback = _callback(case)
    callback.setup(trainer, One(model), "validate")
    try:
        after = model.state_dict()
        assert set(after) == set(state)  # nothing rebuilt or added
        for k, v in state.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(after[k], v, rtol=0, atol=0)
            else:  # MADTP's tau (extra state)
                assert after[k] == v
    finally:
        callback.teardown(trainer, One(model), "validate")


# --- item 9: remove_on_teardown --------------------------------------------------------------------
def _train_method_parameters(model: torch.nn.Module, before: set[str]) -> None:
    """Stand-in for training: seeded values for every parameter the method added."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in before:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_remove_on_teardown_restores_flags_and_a_later_run_gets_the_trained_method(name, trainer):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make().eval()
    for p in model.parameters():  # some weights frozen by the user already: they must stay so
        p.requires_grad_(p.dim() != 1)
    flags, names = _flags(model), set(dict(model.named_parameters()))
    module = One(model)
    callback = _callback(case, remove_on_teardown=True)
    callback.setup(trainer, module, "fit")
    _train_method_parameters(model, names)
    with torch.no_grad():
        trained = case.forward(model)
    callback.teardown(trainer, module, "fit")
    method = get_method(name)
    assert not method.is_applied(model)
    assert _flags(model) == flags  # as before the callback froze anything
    callback.setup(trainer, module, "validate")  # trainer.validate after fit
    assert method.is_applied(model)
    with torch.no_grad():
        torch.testing.assert_close(case.forward(model), trained, rtol=0, atol=0)
    callback.teardown(trainer, module, "validate")
    assert _flags(model) == flags


class _Outputs(pl.Callback):
    """Records the module's output on a fixed batch when fit ends (before any teardown) and when
    validation ends."""

    def __init__(self) -> None:
        self.fit: torch.Tensor | None = None
        self.validate: torch.Tensor | None = None

    def _out(self, pl_module: pl.LightningModule) -> torch.Tensor:
        with torch.no_grad():
            return pl_module(tm.images(seed=5).to(pl_module.dtype)).clone()

    def on_fit_end(self, trainer, pl_module):
        self.fit = self._out(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self.validate = self._out(pl_module)


def test_lst_remove_on_teardown_then_validate_runs_the_trained_lst(tmp_path):
    """The issue's scenario: fit with LST(remove_on_teardown=True), then ``trainer.validate``."""
    import vleff.callbacks

    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=0.05).double()
    flags = _flags(module)
    outputs = _Outputs()
    trainer = tl.trainer(
        tmp_path, [vleff.callbacks.LadderSideTuning(reduction=4, remove_on_teardown=True), outputs], max_steps=3
    )
    data = tl.loader(8, seed=0)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.dataset.tensors[0].double(), data.dataset.tensors[1]), batch_size=4
    )
    trainer.fit(module, data)
    assert not get_method("lst").is_applied(module) and _flags(module) == flags
    trainer.validate(module, data)
    assert outputs.fit is not None and outputs.validate is not None
    torch.testing.assert_close(outputs.validate, outputs.fit, rtol=0, atol=0)


# --- the mixins keep the same rule -----------------------------------------------------------------
def _use(name: str) -> Callable[..., None]:
    """The mixin's ``use_<name>``, looked up on the registry entry's mixin."""
    return getattr(get_method(name).load_mixin(), f"use_{name}")


#: every method's mixin picks its model like the callbacks (``module=``)
MIXINS = sorted(CASES)


def test_every_mixin_takes_module_like_the_callbacks():
    """One convention: ``use_<method>(module=None, **settings)`` (DynamicViT's once took its
    backbone as a required positional; a positional model still works, as ``module=``)."""
    for name in MIXINS:
        params = inspect.signature(_use(name)).parameters
        assert "module" in params and params["module"].default is None, f"use_{name} does not take module=None"


def _mixin_module(name: str, **extra: Any) -> pl.LightningModule:
    case = CASES[name]

    class Module(get_method(name).load_mixin(), Two):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            Two.__init__(self, case.make)
            self.reference = case.forward(self.teacher).detach().clone()
            getattr(self, f"use_{name}")(**_method_settings(case, case.settings), **extra)

    return Module()


@pytest.mark.parametrize("name", MIXINS)
def test_mixins_refuse_two_models_and_take_module(name):
    with pytest.raises(ValueError, match=r"teacher.*student.*module="):
        _mixin_module(name)
    module = _mixin_module(name, module="student")
    method = get_method(name)
    assert method.is_applied(module.student) and not method.is_applied(module.teacher)
    with torch.no_grad():
        torch.testing.assert_close(CASES[name].forward(module.teacher), module.reference, rtol=0, atol=0)
    assert not any(p.requires_grad for p in module.teacher.parameters())


# --- the options every method callback takes ------------------------------------------------------
def test_every_method_callback_takes_module_init_from_and_remove_on_teardown():
    """One set of options for the callbacks of methods that change the model (GaLore and MeZO
    change the optimizer, not the model)."""
    for name, case in CASES.items():
        params = set(inspect.signature(case.callback).parameters)
        assert {"module", "init_from", "remove_on_teardown"} <= params, (name, sorted(params))


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_from_loads_the_trained_weights_before_the_method_is_applied(name, trainer, tmp_path):
    case = CASES[name]
    torch.manual_seed(0)
    trained = One(case.make())
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)
    fresh = One(case.make())
    callback = _callback(case, init_from=str(path))
    callback.setup(trainer, fresh, "fit")
    mine = fresh.state_dict()
    replaced = SETTINGS[name].replaced_keys  # weights the method stores in another form (QLoRA's NF4)
    for key, value in trained.state_dict().items():
        match = key if key in mine else next((k for k in mine if k.replace(".base_layer", "") == key), None)
        if match is None and replaced is not None and re.search(replaced[0], key):
            continue  # checked below: the stored form is of the trained weight
        assert match is not None and torch.equal(mine[match], value), key
    if replaced is not None:  # the same method applied to the trained weights directly stores the same
        direct = One(case.make())
        direct.load_state_dict(trained.state_dict())
        _callback(case).setup(trainer, direct, "fit")
        theirs = direct.state_dict()
        stored = [k for k in mine if re.search(replaced[1], k)]
        assert stored, f"no key of the replaced form {replaced[1]!r}"
        for key in stored:
            assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_from_loads_once_so_a_second_fit_keeps_what_the_first_trained(name, trainer, tmp_path):
    """``remove_on_teardown`` then a second ``fit`` with the same callback: the initial weights
    are not loaded over the trained ones again."""
    case = CASES[name]
    torch.manual_seed(0)
    path = tmp_path / "initial.pt"
    torch.save(One(case.make()).state_dict(), path)
    module = One(case.make())
    callback = _callback(case, init_from=str(path), remove_on_teardown=True)
    callback.setup(trainer, module, "fit")
    with torch.no_grad():  # stand-in for training everything the first fit trains
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trained = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    callback.teardown(trainer, module, "fit")
    callback.setup(trainer, module, "fit")
    try:
        now = module.state_dict()
        for key, value in trained.items():
            match = key if key in now else next((k for k in now if k.replace(".base_layer", "") == key), None)
            assert match is not None and torch.equal(now[match], value), key
    finally:
        callback.teardown(trainer, module, "fit")


# --- checkpoint records: restore_methods rebuilds what the callback applied ---------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_method_callback_records_its_method_in_checkpoints(name, trainer):
    """``restore_methods`` applies what a checkpoint's records name: a callback that records nothing
    gives back a plain model from a trained checkpoint, silently (ToMe, EViT and reversible did)."""
    from vleff.lightning.restore import RECORD_KEY

    case = CASES[name]
    torch.manual_seed(0)
    module = One(case.make())
    callback = _callback(case)
    callback.setup(trainer, module, "fit")
    try:
        checkpoint: dict[str, Any] = {}
        callback.on_save_checkpoint(trainer, module, checkpoint)
        records = [r for r in checkpoint.get(RECORD_KEY, []) if r["method"] == name]
        if getattr(case.callback, "not_recorded", ""):  # says why restore_methods cannot rebuild it
            assert records == []
        else:
            assert len(records) == 1, f"{name}: its callback records {checkpoint.get(RECORD_KEY)}"
    finally:
        callback.teardown(trainer, module, "fit")
