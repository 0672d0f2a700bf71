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

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from host_families import HOSTS

from vleff.registry import get_method


def _vit_forward(model: torch.nn.Module) -> torch.Tensor:
    return model(tm.images(seed=3).double())


def _clip_forward(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([model.encode_image(tm.images(seed=3).double()), model.encode_text(tm.token_ids(seed=3))], 1)


def _blip_forward(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = tm.blip_token_ids()
    return model(pixel_values=tm.images().double(), input_ids=ids, attention_mask=mask).logits


@dataclass(frozen=True)
class Case:
    callback: str  # vleff.callbacks.<name>
    settings: dict[str, Any]  # the callback's method settings
    make: Callable[[], torch.nn.Module]
    forward: Callable[[torch.nn.Module], torch.Tensor]
    other: dict[str, Any] | None = None  # settings of an earlier application that the callback must refuse
    removable: bool = False  # has remove_on_teardown


CASES: dict[str, Case] = {
    "tome": Case("TokenMerging", {"r": 2}, tm.timm_vit, _vit_forward, {"r": 2, "prop_attn": False}, True),
    "turbo": Case(
        "Turbo", {"r": 2, "r_threshold": 0}, tm.timm_vit, _vit_forward, {"r": 2, "r_threshold": 0, "alpha": 1.0}, True
    ),
    "evit": Case(
        "EViT",
        {"keep_rate": 0.5, "locations": [0], "end_epoch": 0},  # the target at once: fit and validate run one function
        tm.timm_vit,
        _vit_forward,
        {"keep_rate": 0.5, "locations": [1]},
        True,
    ),
    "dynamicvit": Case(
        "DynamicViT",
        {"rho": 0.5, "locations": [1], "distill": False},
        tm.timm_vit,
        _vit_forward,
        {"rho": 0.7, "locations": [1], "distill": False},
        True,
    ),
    "crossget": Case(
        "CrossGET", {"r_image": 2, "r_text": 4}, tm.open_clip_model, _clip_forward, {"r_image": 4, "r_text": 4}, True
    ),
    "madtp": Case(
        "MADTP",
        {"flops_reduction": 0.3},
        tm.open_clip_model,
        _clip_forward,
        {"flops_reduction": 0.3, "num_codes": 8},
        True,
    ),
    "vqt": Case("VisualQueryTuning", {"num_queries": 1}, tm.timm_vit, _vit_forward, {"num_queries": 2}, True),
    "lst": Case("LadderSideTuning", {"reduction": 4}, tm.timm_vit, _vit_forward, {"reduction": 2}, True),
    "unipt": Case("UniPT", {"factor": 2}, tm.timm_vit, _vit_forward, {"factor": 1}, True),
    "lora": Case("LoRA", {"r": 2}, tm.timm_vit, _vit_forward, {"r": 4}, True),
    "reversible": Case("Reversible", {"coupling": "meft"}, tm.timm_vit, _vit_forward, {"coupling": "revvit"}, True),
    "memvp": Case("MemVP", {"n_mem": 20}, HOSTS["hf_blip_captioning"].make, _blip_forward, {"n_mem": 24}, True),
    "transkimmer": Case(
        "Transkimmer", {"init_bias": -5.0}, tm.timm_vit, _vit_forward, {"init_bias": -5.0, "tau": 0.5}, True
    ),
}
# the callback's own setting each refusal must name (the field the two applications differ in)
DIFFERS = {
    "tome": "prop_attn",
    "turbo": "alpha",
    "evit": "locations",
    "dynamicvit": "rho",
    "crossget": "r_image",
    "madtp": "num_codes",
    "vqt": "num_queries",
    "lst": "reduction",
    "unipt": "factor",
    "lora": "r",
    "reversible": "coupling",
    "memvp": "n_mem",
    "transkimmer": "tau",
}
#: the settings of the callback that are not method settings
CALLBACK_ONLY = {"end_epoch"}


def test_every_model_callback_has_a_case():
    from vleff.registry import all_methods

    model_methods = {m.name for m in all_methods() if m.apply is not None}
    assert model_methods == set(CASES), "a method callback without a row in CASES"


class Two(pl.LightningModule):
    """A frozen teacher beside a student (knowledge distillation, EMA, reference models)."""

    def __init__(self, make: Callable[[], torch.nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.teacher = make().double().eval()
        self.student = make().double().eval()
        self.teacher.requires_grad_(False)


class One(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def _callback(case: Case, **extra: Any) -> pl.Callback:
    import vleff.callbacks

    return getattr(vleff.callbacks, case.callback)(**case.settings, **extra)


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _method_settings(case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in CALLBACK_ONLY}


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
    model = case.make().double()
    assert case.other is not None
    get_method(name).apply(model, **case.other)
    key = DIFFERS[name]
    have = getattr(get_method(name).config.build(**case.other), key)
    want = getattr(get_method(name).config.build(**_method_settings(case, case.settings)), key)
    pattern = rf"already applied.*{re.escape(f'{key}={have!r}')}.*asks for {re.escape(f'{key}={want!r}')}"
    with pytest.raises(ValueError, match=pattern):
        _callback(case).setup(trainer, One(model), "validate")


@pytest.mark.parametrize("name", sorted(CASES))
def test_applied_with_the_same_settings_is_kept(name, trainer):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make().double()
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


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.removable))
def test_remove_on_teardown_restores_flags_and_a_later_run_gets_the_trained_method(name, trainer):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.make().double().eval()
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
MIXINS = {  # method -> (mixin, use_<method>, settings)
    "tome": ("TokenMergingMixin", "use_tome", {"r": 2}),
    "evit": ("EViTMixin", "use_evit", {"keep_rate": 0.5, "locations": [0]}),
    "crossget": ("CrossGETMixin", "use_crossget", {"r_image": 2, "r_text": 4}),
    "madtp": ("MADTPMixin", "use_madtp", {"flops_reduction": 0.3}),
    "vqt": ("VQTMixin", "use_vqt", {"num_queries": 1}),
    "lst": ("LSTMixin", "use_lst", {"reduction": 4}),
    "unipt": ("UniPTMixin", "use_unipt", {"factor": 2}),
    "lora": ("LoRAMixin", "use_lora", {"r": 2}),
    "reversible": ("ReversibleMixin", "use_reversible", {"coupling": "meft"}),
    "memvp": ("MemVPMixin", "use_memvp", {"n_mem": 20}),
    "transkimmer": ("TranskimmerMixin", "use_transkimmer", {"init_bias": -5.0}),
}


def _mixin_module(name: str, **extra: Any) -> pl.LightningModule:
    import vleff.callbacks

    mixin, use, settings = MIXINS[name]
    make = CASES[name].make

    class Module(getattr(vleff.callbacks, mixin), Two):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            Two.__init__(self, make)
            self.reference = CASES[name].forward(self.teacher).detach().clone()
            getattr(self, use)(**settings, **extra)

    return Module()


@pytest.mark.parametrize("name", sorted(MIXINS))
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
    import inspect

    for name, case in CASES.items():
        params = set(inspect.signature(getattr(__import__("vleff.callbacks").callbacks, case.callback)).parameters)
        assert {"module", "init_from", "remove_on_teardown"} <= params, (name, sorted(params))


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_from_loads_the_trained_weights_before_the_method_is_applied(name, trainer, tmp_path):
    case = CASES[name]
    torch.manual_seed(0)
    trained = One(case.make().double())
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)
    fresh = One(case.make().double())
    callback = _callback(case, init_from=str(path))
    callback.setup(trainer, fresh, "fit")
    mine = fresh.state_dict()
    for key, value in trained.state_dict().items():
        match = key if key in mine else next((k for k in mine if k.replace(".base_layer", "") == key), None)
        assert match is not None and torch.equal(mine[match], value), key
