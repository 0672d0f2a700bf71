"""``vleff-train``: Hydra entry point that trains, validates and compares baseline against methods.

The configs ship inside the package (``vleff/configs``, linked as the repository's top-level
``configs/``), so the command works from any directory. See ``configs/train.yaml`` for the
groups and ``README.md`` for examples.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("vleff.train")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")

__all__ = ["CONFIG_DIR", "finetune_command", "hydra_quote", "main", "run"]


def _instantiate_callbacks(cfg: DictConfig | None) -> list[Any]:
    from hydra.utils import instantiate

    callbacks = []
    for name, spec in (cfg or {}).items():
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ValueError(f"callbacks.{name} must be a mapping with a _target_, got {spec!r}")
        # plain lists and dicts, not OmegaConf containers: the callbacks validate their
        # settings (``exclude``, ``targets``, ...) as the Python types a user passes
        callbacks.append(instantiate(spec, _convert_="all"))
    return callbacks


_NOISE_WARNINGS = (
    # torch's pytree deprecation raised inside Lightning's own utilities, on every run
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class _DropTips(logging.Filter):
    """Drop Lightning's advertising tips ("💡 Tip: ... try installing litlogger/litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith("💡 Tip")


def _quiet_console() -> None:
    """Keep the console to what the run says: no Lightning tips and no LeafSpec FutureWarning.

    Only these specific messages are dropped (by message), and only in the CLI; the
    tensorboardX notice is avoided by the trainer config's CSVLogger.
    """
    import warnings

    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def _log_lightning_once() -> None:
    """Send Lightning's messages through the root logger only.

    Lightning gives its loggers a console handler of their own when it is imported before
    logging is configured; under Hydra (which configures the root logger) every message would
    then be printed twice.
    """
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _with_progress_bar(cfg: DictConfig, callbacks: list[Any]) -> list[Any]:
    """``callbacks`` plus the CLI's progress bar (``v_num: 0``, not ``0.000``; see
    :mod:`vleff.cli.progress`) when the trainer shows one and none is given."""
    from lightning.pytorch.callbacks import ProgressBar

    from vleff.cli.progress import progress_bar

    shows = cfg.trainer.get("enable_progress_bar", True) is not False
    if not shows or any(isinstance(c, ProgressBar) for c in callbacks):
        return callbacks
    return [*callbacks, progress_bar()]


def _warn_random_frozen_backbone(cfg: DictConfig, callbacks: list[Any]) -> list[str]:
    """Warn when a frozen-backbone callback (LST, UniPT, VQT, LoRA) will train beside a randomly
    initialised image classifier: no ``init_from`` and ``model.pretrained`` false.

    The side network (or adapters) then learns on random features: the digits ViT reaches
    14-22 % that way against 90 %+ from a trained baseline. Returns the callbacks warned about.
    """
    from vleff.registry import get_method

    model = cfg.get("model") or {}
    if model.get("_target_") != "vleff.models.ImageClassifier" or model.get("pretrained", False):
        return []
    warned = []
    for name, callback in zip((cfg.get("callbacks") or {}).keys(), callbacks):
        config = getattr(callback, "settings_config", None)
        if config is None or not hasattr(callback, "init_from") or callback.init_from is not None:
            continue
        if get_method(config.method).kind != "side":
            continue
        warned.append(name)
        log.warning(
            "callbacks.%s: %s trains beside a frozen, randomly initialised %s (no callbacks.%s.init_from, "
            "model.pretrained=false): it learns on random features (14-22 %% on the digits). Train the "
            "baseline first (vleff-train trainer.max_epochs=15) and pass its checkpoint: "
            "'callbacks.%s.init_from=\"/path/to/epoch=14-step=NNN.ckpt\"'",
            name,
            config.method,
            model.get("model", "model"),
            name,
            name,
        )
    return warned


def _check_method_arguments(name: str, kwargs: dict[str, Any]) -> None:
    """``compare.methods.<name>`` names a registered method and settings it accepts (names and
    values), checked without a model; :func:`_check_compare` also applies it to a copy."""
    import inspect

    from vleff.registry import get_method

    method = get_method(name)
    check = getattr(method, "check_settings", None)
    if check is not None:  # the registry validates names and values itself
        try:
            check(**kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"compare.methods.{name}: {err}") from None
        return
    signature = inspect.signature(method.apply)
    params = list(signature.parameters)[1:]  # after the model
    try:
        signature.bind_partial(None, **kwargs)
    except TypeError:
        unknown = sorted(set(kwargs) - set(params))
        raise ValueError(
            f"compare.methods.{name} has arguments {unknown} that {name} does not take; allowed: {params}"
        ) from None


def _check_compare(cfg: DictConfig, methods: dict[str, dict[str, Any]], module: Any, datamodule: Any) -> None:
    """Everything the comparison after training needs, checked before training starts.

    Each method is applied to a throwaway deep copy of the untrained model, so a value the
    method rejects (``compare.methods={tome: {r: -4}}``, or an ``r`` the model's token count
    cannot take) fails now, not after the whole run; ``compare.batch_size`` must not exceed
    the validation set.
    """
    import copy

    from vleff.registry import get_method

    for key in ("batch_size", "repeats"):
        value = cfg.compare[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"compare.{key}={value!r} is not allowed; use an int >= 1")
    model = getattr(module, "model", None)
    for name, kwargs in methods.items():
        method = get_method(name)
        if model is None or getattr(method, "apply", None) is None:
            continue
        try:
            method.apply(copy.deepcopy(model), **kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"compare.methods.{name}={kwargs}: {err}") from None
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    dataset = getattr(loader, "dataset", None)
    n_val = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if n_val is not None and cfg.compare.batch_size > n_val:
        raise ValueError(
            f"compare.batch_size={cfg.compare.batch_size} exceeds the {n_val} validation images; "
            f"allowed: 1 to {n_val} (it is the batch of one timed forward)"
        )


def hydra_quote(value: str) -> str:
    """``value`` as a quoted string in Hydra's override grammar (``=``, spaces, brackets ok)."""
    import re

    # Hydra treats a backslash as an escape only before a quote (or before the closing quote)
    escaped = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return '"' + escaped + '"'


def finetune_command(checkpoint: str | Path, experiment: str = "clip_mezo") -> str:
    """The ready-to-paste ``vleff-train`` command that starts from ``checkpoint``.

    Lightning names checkpoints ``epoch=5-step=132.ckpt``; an unquoted ``=`` in an override
    value is a syntax error in Hydra's grammar, so the value is quoted for Hydra (double
    quotes) and the whole override for the shell (single quotes).
    """
    import shlex

    override = f"model.init_checkpoint={hydra_quote(str(Path(checkpoint).resolve()))}"
    return f"vleff-train experiment={experiment} {shlex.quote(override)}"


def _print_checkpoint_hint(trainer: Any, module: Any) -> str | None:
    """Print where the checkpoint is and, for CLIP fine-tuning, the command to continue from it."""
    callback = getattr(trainer, "checkpoint_callback", None)
    path = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
    if not path or not Path(path).is_file():
        return None
    from vleff.models.clip_finetuner import CLIPFineTuner
    from vleff.registry import applied_methods

    if isinstance(module, CLIPFineTuner):
        applied = applied_methods(module.model)
        if applied:  # its weights include the method's parameters: a plain CLIP (MeZO's start) cannot load them
            print(f"checkpoint: {path} (trained with {', '.join(applied)}: apply the same method before loading it)")
            return None
        command = finetune_command(path)
        print(f"checkpoint: {path}\ncontinue from it with MeZO (quoted for Hydra and the shell):\n  {command}")
        return command
    print(f"checkpoint: {path}")
    return None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and compare as ``cfg`` says; returns ``{"val": metrics, "rows": comparison rows}``."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from vleff.cli.evaluate import compare_methods
    from vleff.models.classifier import ImageClassifier
    from vleff.profile import plot_rows, print_table, rows_to_csv, rows_to_json

    _log_lightning_once()
    _quiet_console()

    methods = OmegaConf.to_container(cfg.compare.methods, resolve=True) if cfg.compare.methods else {}
    methods = {name: dict(kwargs or {}) for name, kwargs in methods.items()}
    for name, kwargs in methods.items():  # fail before training, not after
        _check_method_arguments(name, kwargs)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if "num_classes" in model_cfg and model_cfg["num_classes"] is None:
        model_cfg["num_classes"] = datamodule.num_classes
    module = instantiate(model_cfg)
    if cfg.compare.enabled and isinstance(module, ImageClassifier):
        _check_compare(cfg, methods, module, datamodule)
    callbacks = _instantiate_callbacks(cfg.get("callbacks"))
    _warn_random_frozen_backbone(cfg, callbacks)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=_with_progress_bar(cfg, callbacks))
    trainer.fit(module, datamodule=datamodule)
    if any(getattr(obj, "changes_model_after_validation", False) for obj in (*callbacks, module)):
        # a callback (MADTP's τ re-calibration) changed the model after the last validation:
        # report the model the run leaves, not the one validated before that change
        trainer.validate(module, datamodule=datamodule, verbose=False)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result: dict[str, Any] = {"val": val, "rows": []}
    if trainer.is_global_zero:
        result["finetune_command"] = _print_checkpoint_hint(trainer, module)
        if not (cfg.compare.enabled and isinstance(module, ImageClassifier)) and val:
            # no comparison table follows (CLIP fine-tuning): the run's own figures are its result
            print_table(
                [{"metric": k, "value": v} for k, v in sorted(val.items())],
                title="vleff-train: last validation",
                extra_columns={"metric": "metric", "value": "value"},
            )
    if not cfg.compare.enabled or not trainer.is_global_zero:
        return result
    if not isinstance(module, ImageClassifier):
        log.info("compare: skipped (it measures ImageClassifier models; got %s)", type(module).__name__)
        return result
    datamodule.setup("validate")
    batches = [(images, labels) for images, labels in datamodule.val_dataloader()]
    rows = compare_methods(
        module.model, batches, methods, batch_size=cfg.compare.batch_size, repeats=cfg.compare.repeats
    )
    result["rows"] = rows
    print_table(rows, title="vleff-train: baseline vs method (validation accuracy; inference speed, fp32)")
    save_dir = Path(cfg.compare.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    rows_to_json(rows, save_dir / "results.json", config=OmegaConf.to_container(cfg, resolve=True))
    rows_to_csv(rows, save_dir / "results.csv")
    plot_rows(rows, save_dir / "results.png", title="baseline vs method")
    log.info("results written to %s", save_dir)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """Console-script entry point."""
    sys.exit(_hydra_main())


if __name__ == "__main__":
    main()
