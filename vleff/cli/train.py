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

__all__ = ["CONFIG_DIR", "main", "run"]


def _instantiate_callbacks(cfg: DictConfig | None) -> list[Any]:
    from hydra.utils import instantiate

    callbacks = []
    for name, spec in (cfg or {}).items():
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ValueError(f"callbacks.{name} must be a mapping with a _target_, got {spec!r}")
        callbacks.append(instantiate(spec))
    return callbacks


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


def _check_method_arguments(name: str, kwargs: dict[str, Any]) -> None:
    """``compare.methods.<name>`` names a registered method and only arguments its ``apply`` takes."""
    import inspect

    from vleff.registry import get_method

    signature = inspect.signature(get_method(name).apply)
    params = list(signature.parameters)[1:]  # after the model
    try:
        signature.bind_partial(None, **kwargs)
    except TypeError:
        unknown = sorted(set(kwargs) - set(params))
        raise ValueError(f"compare.methods.{name} has arguments {unknown} that {name} does not take; "
                         f"allowed: {params}") from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and compare as ``cfg`` says; returns ``{"val": metrics, "rows": comparison rows}``."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from vleff.cli.evaluate import compare_methods
    from vleff.models.classifier import ImageClassifier
    from vleff.profile import plot_rows, print_table, rows_to_csv, rows_to_json

    _log_lightning_once()

    methods = OmegaConf.to_container(cfg.compare.methods, resolve=True) if cfg.compare.methods else {}
    for name, kwargs in methods.items():  # fail before training, not after
        _check_method_arguments(name, kwargs or {})
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if "num_classes" in model_cfg and model_cfg["num_classes"] is None:
        model_cfg["num_classes"] = datamodule.num_classes
    module = instantiate(model_cfg)
    callbacks = _instantiate_callbacks(cfg.get("callbacks"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result: dict[str, Any] = {"val": val, "rows": []}
    if not cfg.compare.enabled or not trainer.is_global_zero:
        return result
    if not isinstance(module, ImageClassifier):
        log.info("compare: skipped (it measures ImageClassifier models; got %s)", type(module).__name__)
        return result
    datamodule.setup("validate")
    batches = [(images, labels) for images, labels in datamodule.val_dataloader()]
    rows = compare_methods(module.model, batches, methods, batch_size=cfg.compare.batch_size,
                           repeats=cfg.compare.repeats)
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
