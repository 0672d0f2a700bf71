"""Every ``_target_`` in the Hydra configs takes exactly the keyword arguments its config gives it.

``test_train_cli.py`` only composes the configs, so a misspelt argument (``model.learning_rate``)
would pass there and fail only when ``vleff-train`` instantiates it. Here each config option is
composed into the full train config (so interpolations such as ``${data.image_size}`` resolve),
every mapping with a ``_target_`` is found at any depth, the target is imported (nothing is
instantiated) and its keys are checked against ``inspect.signature``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object
from omegaconf import OmegaConf

from vleff.cli.train import CONFIG_DIR

CONFIGS = Path(CONFIG_DIR)
GROUPS = ("model", "data", "trainer", "callbacks", "experiment")
# keys hydra.utils.instantiate consumes itself (never passed to the target)
HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}
# arguments vleff.cli.train.run passes next to a config: instantiate(cfg.trainer, callbacks=...)
SUPPLIED_BY_RUN = {"trainer": {"callbacks"}}


def _options() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in GROUPS for path in sorted((CONFIGS / group).glob("*.yaml"))]


def _compose(overrides: list[str], tmp_path: Path) -> dict[str, Any]:
    """The full train config as plain containers, interpolations resolved (``???`` left as is)."""
    GlobalHydra.instance().clear()
    # the two ${hydra:runtime.output_dir} values only resolve inside a Hydra run
    extra = [f"compare.save_dir={tmp_path}", f"trainer.default_root_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, *extra])
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def _override(group: str, option: str) -> str:
    return f"callbacks=[{option}]" if group == "callbacks" else f"{group}={option}"


def find_targets(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(dotted path, mapping)`` for every mapping with a ``_target_``, at any depth."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from find_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from find_targets(value, f"{path}[{i}]")


def target_problems(path: str, spec: dict[str, Any]) -> list[str]:
    """What is wrong with one ``_target_`` mapping: an unknown target, keys it does not accept,
    required arguments the config does not give (empty when it would instantiate)."""
    target = spec["_target_"]
    try:
        obj = get_object(target)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [f"{path}: _target_ {target!r} cannot be imported ({type(exc).__name__}: {exc})"]
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        return [f"{path}: no signature for {target!r} ({exc})"]
    params = sig.parameters
    kwargs = {k: v for k, v in spec.items() if k not in HYDRA_KEYS}
    args = list(spec.get("_args_", []))
    supplied = SUPPLIED_BY_RUN.get(path, set())
    problems = []
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    keyword_names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    settings = getattr(obj, "settings_config", None)  # a method callback: **settings are its config's fields
    if settings is not None:
        keyword_names |= {f.name for f in dataclasses.fields(settings)}
        controller = getattr(obj, "controller_config", None)  # MADTP: its FLOPs controller's settings too
        keyword_names |= {f.name for f in dataclasses.fields(controller)} if controller is not None else set()
        takes_var_kw = False
    unknown = sorted(set(kwargs) - keyword_names) if not takes_var_kw else []
    if unknown:
        problems.append(f"{path}: {target} does not accept {unknown} (it takes {sorted(keyword_names)})")
    if problems:
        return problems
    try:  # positional arguments, a key given twice, ...
        sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        return [f"{path}: {target}{sig} rejects the config's arguments: {exc}"]
    if not spec.get("_partial_", False):
        given = {**kwargs, **{name: None for name in supplied}}
        try:
            sig.bind(*args, **given)
        except TypeError as exc:
            problems.append(f"{path}: {target} would be called without a required argument: {exc}")
    return problems


@pytest.mark.parametrize("group, option", _options(), ids=[f"{g}/{o}" for g, o in _options()])
def test_config_targets_accept_their_keys(group, option, tmp_path):
    cfg = _compose([_override(group, option)], tmp_path)
    found = dict(find_targets(cfg))
    # the walk really saw the config under test (and the three run() always instantiates)
    assert {"model", "data", "trainer"} <= set(found), sorted(found)
    if group == "callbacks":
        own = (CONFIGS / group / f"{option}.yaml").read_text()
        if "_target_" in own:
            assert any(path.startswith("callbacks.") for path in found), sorted(found)
    problems = [p for path, spec in found.items() for p in target_problems(path, spec)]
    assert not problems, "\n".join(problems)


def test_experiments_compose_their_callbacks(tmp_path):
    # the nested targets an experiment brings in are among those checked above
    cfg = _compose(["experiment=vit_tome"], tmp_path)
    assert {"callbacks.efficiency", "callbacks.tome"} <= {p for p, _ in find_targets(cfg)}
    for method in ("lst", "unipt", "vqt", "lora"):  # the side-tuning experiments
        cfg = _compose([f"experiment=vit_{method}"], tmp_path)
        assert f"callbacks.{method}" in dict(find_targets(cfg)) and cfg["callbacks"][method]["init_from"] is None
    cfg = _compose(["experiment=clip_galore"], tmp_path)
    assert cfg["model"]["_target_"] == "vleff.models.CLIPFineTuner" and "callbacks.galore" in dict(find_targets(cfg))


@pytest.mark.parametrize(
    "override, bad",
    [
        ("+model.learning_rate=0.1", "learning_rate"),
        ("+data.batchsize=8", "batchsize"),
        ("+trainer.max_epoch=3", "max_epoch"),
        ("+callbacks.tome.ratio=3", "ratio"),
    ],
    ids=["model", "data", "trainer", "callback"],
)
def test_a_misspelt_key_is_reported(override, bad, tmp_path):
    overrides = ["callbacks=[tome]", override]
    cfg = _compose(overrides, tmp_path)
    problems = [p for path, spec in find_targets(cfg) for p in target_problems(path, spec)]
    assert len(problems) == 1 and f"'{bad}'" in problems[0], problems


def test_nested_and_unimportable_targets_are_reported():
    cfg = {
        "model": {
            "_target_": "vleff.models.ImageClassifier",
            "model": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3, "bias_": True},
        },
        "other": [{"_target_": "vleff.no_such_module.Thing"}],
    }
    found = dict(find_targets(cfg))
    assert set(found) == {"model", "model.model", "other[0]"}
    assert target_problems("model", found["model"]) == []
    (nested,) = target_problems("model.model", found["model.model"])
    assert "'bias_'" in nested
    (missing,) = target_problems("other[0]", found["other[0]"])
    assert "cannot be imported" in missing


def test_missing_required_argument_is_reported():
    spec = {"_target_": "vleff.data.ImageFolderDataModule", "image_size": 32}  # no root
    (problem,) = target_problems("data", spec)
    assert "required" in problem and "root" in problem
    assert target_problems("data", {**spec, "_partial_": True}) == []
    # what run() passes itself is not required from the config
    assert target_problems("trainer", {"_target_": "lightning.pytorch.Trainer"}) == []


def _field_defaults(config: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "callbacks").glob("*.yaml")))
def test_callback_configs_show_the_config_defaults(option):
    """A callback's YAML lists the method's settings with their values: those values are the
    config dataclass's defaults (its one owner), so the file never drifts from the code. A value
    set on purpose for the embedded default (the 6-block, 64-token digits ViT of ``vleff-train``)
    says why on its line, in a ``# choice: ...`` comment."""
    text = (CONFIGS / "callbacks" / f"{option}.yaml").read_text()
    spec = OmegaConf.to_container(OmegaConf.create(text))
    drift = []
    for name, node in (spec or {}).items():
        if not isinstance(node, dict) or "_target_" not in node:
            continue
        obj = get_object(node["_target_"])
        defaults, settings = {}, set()
        for config in (getattr(obj, "settings_config", None), getattr(obj, "controller_config", None)):
            if config is not None and dataclasses.is_dataclass(config):
                defaults |= _field_defaults(config)
                settings |= {f.name for f in dataclasses.fields(config)}
        for key, value in node.items():
            if key in defaults and _plain(defaults[key]) != value and not _chosen(text, key):
                drift.append(f"{option}.yaml {name}.{key}: {value!r}, the config's default is {defaults[key]!r}")
        missing = sorted(settings - set(node) - NOT_IN_YAML.keys())
        if missing:  # a user reading the file must see every setting the method has
            drift.append(f"{option}.yaml {name}: settings not listed: {missing}")
    assert not drift, "\n".join(drift)


#: settings a YAML file cannot hold, and why
NOT_IN_YAML = {"logits_fn": "a Python callable (DynamicViT's output -> logits)"}


def _chosen(text: str, key: str) -> bool:
    """The YAML line setting ``key`` says why it differs from the default (``# choice: why``)."""
    return re.search(rf"^\s+{re.escape(key)}:[^#\n]*#\s*choice:\s*\S", text, re.MULTILINE) is not None


def _plain(value: Any) -> Any:
    """A default as YAML writes it (tuples are lists)."""
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "callbacks").glob("*.yaml")))
def test_callback_configs_instantiate_as_vleff_train_does(option, tmp_path):
    """Each callback file builds through the very function ``vleff-train`` calls, with the
    composed config as Hydra hands it over (``DictConfig``/``ListConfig``, not plain containers):
    the signature check above cannot see a setting whose type the callback then refuses."""
    from vleff.cli.train import _instantiate_callbacks

    GlobalHydra.instance().clear()
    extra = [f"compare.save_dir={tmp_path}", f"trainer.default_root_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"callbacks=[{option}]", *extra, *GIVEN.get(option, [])])
    GlobalHydra.instance().clear()
    built = _instantiate_callbacks(cfg.callbacks)
    names = [name for name, spec in cfg.callbacks.items()]
    assert len(built) == len(names) and all(type(cb).__module__.startswith(("vleff", "lightning")) for cb in built)


#: what a user must give on the command line for a callback whose file leaves a ``???``
GIVEN = {"lorahub": ["callbacks.lorahub.modules=[a.pt,b.pt]", "callbacks.lorahub.weights=[0.5,0.5]"]}
