"""Lightning callback: fine-tune with MeZO (forward passes only) and an unchanged ``training_step``.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.MeZO(eps=1e-3, lr=1e-6)])

At fit start the callback

* replaces the module's optimizer by :class:`vleff.memory.MeZO` over the same parameters
  (and groups, so an LR scheduler keeps driving the lr; ``lr=`` overrides it),
* switches the module to manual optimization and wraps its ``training_step``: the wrapped
  step puts the module in eval mode (dropout off), lets MeZO evaluate the user's loss twice
  at ``θ ± εz`` under ``torch.no_grad()`` and applies the update. No autograd graph and no
  ``.grad`` buffers ever exist.
* Under DDP every rank draws the same ``z`` (seed = base seed + step, identical everywhere)
  and the projected gradient is averaged with ``strategy.reduce``, so ranks stay identical;
  DDP's gradient hooks are disabled because nothing runs backward.
* Under FSDP2 (``ModelParallelStrategy`` with ``vleff.shard_blocks``) each rank perturbs and
  updates its own shards with their slices of the same ``z`` (``vleff.memory.mezo``'s direction
  contract), and the sharded modules are resharded after each of the two forwards, so the next
  forward gathers the shards as MeZO left them (``fully_shard`` keeps the root's gathered
  parameters after a forward, for a backward that never comes).

Manual optimization means Lightning no longer steps LR schedulers; the wrapped step does
(``interval="step"`` every ``frequency`` steps, ``"epoch"`` at epoch end, plateau schedulers
with their monitored metric when it has been logged).

Hooks and logging during a MeZO step (the user's ``training_step`` runs twice, at ``θ+εz`` and
``θ-εz``):

* ``on_before_optimizer_step`` (callbacks, then the module) fires **once per step**, at the
  restored weights ``θ`` after both losses (and the DDP average of the projected gradient)
  and before the update — where it fires after backward under automatic optimization. There
  are no ``.grad`` buffers to inspect; ``optimizer.last_projected_grad`` still holds the previous
  step's estimate at that point. The MeZO optimizer is stepped directly, not through Lightning's
  precision plugin, whose closure wrapper would run the hooks after each of the two losses,
  i.e. twice and at perturbed weights. Lightning's manual-optimization step counting and
  ``optimizer_step`` profiling are kept.
* ``self.log``/``self.log_dict`` calls made inside ``training_step`` are recorded during the
  two evaluations and replayed once after the step: a floating-point value logged in both is
  logged as the mean of its ``θ+εz`` and ``θ-εz`` values (for the loss that is MeZO's own
  estimate ``(L+ + L-)/2`` of the loss at ``θ``); other values (ints, torchmetrics objects) are
  logged with their ``θ-εz`` value. A torchmetrics object the step *updates* is still updated
  twice per step, since the step itself runs twice.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call

from vleff.backbones.sharding import fsdp_modules
from vleff.lightning.mixin import next_hook
from vleff.lightning.optimizer_swap import (
    refuse_conflicting_methods,
    swap_optimizers,
    user_optimizers,
)
from vleff.lightning.schedulers import step_lr_schedulers
from vleff.lightning.strategy import check_strategy
from vleff.methods.mezo import MeZOConfig
from vleff.methods.mezo.convert import mezo_from_optimizer
from vleff.methods.mezo.core import MeZO as MeZOOptimizer

__all__ = ["MeZO", "check_automatic_optimization", "check_trainer_settings", "install_mezo", "uninstall_mezo"]

_ATTR = "_vleff_mezo"


_LogCall = tuple[str, Any, tuple[Any, ...], dict[str, Any]]


def _mean_of_two(plus: Any, minus: Any) -> Any:
    """What to log for a value logged at both ``θ+εz`` and ``θ-εz``: the mean of floating values."""
    if isinstance(plus, float) and isinstance(minus, float):
        return (plus + minus) / 2
    if (
        torch.is_tensor(plus)
        and torch.is_tensor(minus)
        and plus.is_floating_point()
        and minus.is_floating_point()
        and plus.shape == minus.shape
    ):
        return (plus.detach() + minus.detach()) / 2
    return minus


def _replay_logs(pl_module: pl.LightningModule, plus: list[_LogCall], minus: list[_LogCall]) -> None:
    """Log once what ``training_step`` logged in its two evaluations (k-th call of a name pairs with k-th)."""
    earlier: dict[str, list[_LogCall]] = defaultdict(list)
    for entry in plus:
        earlier[entry[0]].append(entry)
    used: dict[str, int] = defaultdict(int)
    for name, value, args, kwargs in minus:
        k = used[name]
        if k < len(earlier[name]):
            value = _mean_of_two(earlier[name][k][1], value)
            used[name] += 1
        pl_module.log(name, value, *args, **kwargs)
    for name, entries in earlier.items():  # logged only at θ+εz
        for _, value, args, kwargs in entries[used[name] :]:
            pl_module.log(name, value, *args, **kwargs)


def _recording_logs(pl_module: pl.LightningModule, fn: Callable[[], Any], into: list[_LogCall]) -> Any:
    """Run ``fn`` with ``pl_module.log`` (and so ``log_dict``) recording its calls into ``into``."""

    def record(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        into.append((name, value, args, kwargs))

    missing = object()
    shadowed = vars(pl_module).get("log", missing)
    pl_module.log = record  # type: ignore[method-assign]
    try:
        return fn()
    finally:
        if shadowed is missing:
            del pl_module.log
        else:
            pl_module.log = shadowed  # type: ignore[method-assign]


def _mezo_step(trainer: pl.Trainer, pl_module: pl.LightningModule, loss_fn: Callable[[], Any]) -> Any:
    """One MeZO step of the module's optimizer, with Lightning's hooks and logging fired once.

    The raw optimizer is stepped (not ``LightningOptimizer.step``, whose precision plugin would
    fire ``on_before_optimizer_step`` after each of the two closure calls, at perturbed weights).
    The hook fires from MeZO's ``reduce`` slot, which runs after the weights are restored and
    before the update. ``_on_before_step``/``_on_after_step`` are the callables Lightning's
    manual-optimization loop injects into the ``LightningOptimizer`` (step counter, profiler).
    """
    lightning_opt = pl_module.optimizers()
    opt = getattr(lightning_opt, "optimizer", lightning_opt)
    if not isinstance(opt, MeZOOptimizer):
        raise TypeError(f"the MeZO training step found a {type(opt).__name__} optimizer; something replaced MeZO")
    evaluations: list[list[_LogCall]] = []
    sharded = fsdp_modules(pl_module)

    def closure() -> Any:
        evaluations.append([])
        try:
            return _recording_logs(pl_module, loss_fn, evaluations[-1])
        finally:
            for module in sharded:  # the next forward gathers the shards MeZO is about to change
                module.reshard()

    inner_reduce = opt.reduce

    def reduce_then_hooks(grad: torch.Tensor) -> torch.Tensor:
        if inner_reduce is not None:
            grad = inner_reduce(grad)
        call._call_callback_hooks(trainer, "on_before_optimizer_step", opt)
        call._call_lightning_module_hook(trainer, "on_before_optimizer_step", opt)
        return grad

    before = getattr(lightning_opt, "_on_before_step", None)
    after = getattr(lightning_opt, "_on_after_step", None)
    if before is not None:
        before()
    opt.reduce = reduce_then_hooks
    try:
        loss = opt.step(closure=closure)
    finally:
        opt.reduce = inner_reduce
    if after is not None:
        after()
    plus, minus = evaluations  # MeZO.step evaluates the closure exactly twice
    _replay_logs(pl_module, plus, minus)
    return loss


def install_mezo(trainer: pl.Trainer, pl_module: pl.LightningModule, config: MeZOConfig) -> MeZOOptimizer:
    """Swap in the MeZO optimizer and wrap ``pl_module.training_step`` (callback and mixin share this)."""
    eps, lr, weight_decay, params, seed = config.eps, config.lr, config.weight_decay, config.params, config.seed
    check_strategy(trainer, "mezo")
    uninstall_mezo(pl_module)  # a second fit: start from the user's own module
    check_automatic_optimization(pl_module)
    olds = user_optimizers(trainer)
    from vleff.registry import conflict

    for old in olds:  # an optimizer that is another method (GaLoreAdamW built by hand, or by GaLoreMixin)
        other = getattr(old, "vleff_method", None)
        reason = conflict("mezo", other) if other else None
        if reason:
            raise ValueError(
                f"MeZO would replace the {type(old).__name__} optimizer configure_optimizers returns: "
                f"{reason}; use one of them"
            )
    if len(olds) > 1:
        raise ValueError(
            f"MeZO works with one optimizer, but configure_optimizers returned {len(olds)} "
            f"({', '.join(type(o).__name__ for o in olds)}); return one (with param groups) instead"
        )
    precision = str(trainer.precision)
    if precision.startswith("16"):
        raise ValueError(
            f"MeZO does not support precision={precision!r} (the loss scaler needs gradients); use "
            "'32-true' or 'bf16-mixed' with fp32 weights"
        )
    check_trainer_settings(trainer, pl_module)
    strategy = trainer.strategy
    seed = int(strategy.broadcast(int(seed)))
    distributed = trainer.world_size > 1

    def reduce(t: torch.Tensor) -> torch.Tensor:
        return strategy.reduce(t, reduce_op="mean")

    def convert(opt: Any) -> MeZOOptimizer:
        return mezo_from_optimizer(
            opt,
            pl_module,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            params=params,
            seed=seed,
            reduce=reduce if distributed else None,
            allow_low_precision=config.allow_low_precision,
        )

    (optimizer,) = swap_optimizers(trainer, convert, base_lr=lr)
    if not olds:  # no scheduler can drive a placeholder optimizer
        strategy.lr_scheduler_configs = []
    ddp = strategy.model
    if ddp is not None and hasattr(ddp, "require_backward_grad_sync"):
        ddp.require_backward_grad_sync = False  # nothing runs backward: keep the reducer idle

    original = pl_module.training_step
    saved = {
        "automatic_optimization": pl_module.automatic_optimization,
        "original": original,
        "had_instance_attr": "training_step" in vars(pl_module),
    }
    pl_module.automatic_optimization = False

    @functools.wraps(original)
    def mezo_training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()  # dropout off for both losses
        try:
            loss = _mezo_step(trainer, pl_module, lambda: original(*args, **kwargs))
        finally:
            for m, mode in modes:
                m.training = mode
        step_lr_schedulers(trainer, "step")
        opt = trainer.strategy.optimizers[0]
        if isinstance(opt, MeZOOptimizer) and opt.last_projected_grad is not None:
            pl_module.log("mezo/projected_grad", opt.last_projected_grad.float(), on_step=True, on_epoch=False)
            pl_module.log("mezo/loss", loss.float(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    pl_module.training_step = mezo_training_step  # type: ignore[method-assign]
    setattr(pl_module, _ATTR, saved)
    return optimizer


def _carry_step_count_to_automatic(trainer: pl.Trainer) -> None:
    """Make the automatic-optimization step counter read what the MeZO (manual) steps counted.

    Lightning reads ``trainer.global_step`` from the manual-optimization counter while the
    module is in manual mode and from the automatic one otherwise; once the module is back in
    automatic mode, ``global_step`` would read 0 after a MeZO fit without this.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    done = epoch_loop.manual_optimization.optim_step_progress.total
    step = epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    step.ready = max(step.ready, done.ready)
    step.completed = max(step.completed, done.completed)


def uninstall_mezo(pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> None:
    """Undo :func:`install_mezo`'s changes to the module (the trainer's optimizer stays MeZO).

    The module's own ``training_step`` and ``automatic_optimization`` come back, so a later
    ``Trainer.fit`` without MeZO trains it with backprop (left in manual mode, that fit would
    silently train nothing). With ``trainer`` (the callback and the mixin pass it at fit end)
    the MeZO steps are carried over to the automatic step counter, so ``trainer.global_step``
    still reads the number of MeZO steps after the fit.
    """
    saved = getattr(pl_module, _ATTR, None)
    if saved is None:
        return
    if saved["had_instance_attr"]:
        pl_module.training_step = saved["original"]  # type: ignore[method-assign]
    else:
        del pl_module.training_step
    pl_module.automatic_optimization = saved["automatic_optimization"]
    if trainer is not None and saved["automatic_optimization"]:
        _carry_step_count_to_automatic(trainer)
    delattr(pl_module, _ATTR)


#: LightningModule hooks that only run around ``backward`` or on ``.grad`` buffers: a MeZO step has neither
_BACKWARD_HOOKS = ("backward", "on_before_backward", "on_after_backward", "configure_gradient_clipping")


def check_trainer_settings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse the trainer settings a MeZO step cannot honour; warn about module hooks it never calls.

    A MeZO step updates every parameter by ``lr·g·z`` with one scalar projected gradient ``g``
    from two losses of the same batch, with no backward and no ``.grad`` buffers, as the
    reference does (its trainer asserts gradient accumulation off and never clips the ZO
    update). So:

    * ``accumulate_grad_batches > 1`` is refused (one step per batch; use a larger batch);
    * ``gradient_clip_val`` is refused: Lightning clips ``.grad`` buffers, which do not exist,
      and only in automatic optimization, which MeZO switches off at fit start, so the setting
      would be silently ignored;
    * a module that overrides ``backward``, ``on_before_backward``, ``on_after_backward`` or
      ``configure_gradient_clipping`` gets a warning naming them: they never run under MeZO.
    """
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"MeZO takes one step per batch; accumulate_grad_batches={trainer.accumulate_grad_batches} "
            "is not supported (allowed: 1; use a larger batch)"
        )
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip is not None and float(clip) != 0.0:
        raise ValueError(
            f"MeZO cannot honour gradient_clip_val={clip!r} "
            f"(gradient_clip_algorithm={getattr(trainer, 'gradient_clip_algorithm', None)!r}): its update "
            "is one scalar projected gradient, with no .grad buffers to clip, and Lightning clips only "
            "in automatic optimization, which MeZO switches off; allowed: gradient_clip_val=None or 0"
        )
    overridden = [
        name
        for name in _BACKWARD_HOOKS
        if getattr(type(pl_module), name, None) is not getattr(pl.LightningModule, name)
    ]
    if overridden:
        warnings.warn(
            f"{type(pl_module).__name__} overrides {', '.join(overridden)}, which MeZO never calls "
            "(its steps run no backward and leave no .grad buffers)",
            stacklevel=2,
        )


def check_automatic_optimization(pl_module: pl.LightningModule) -> None:
    """MeZO evaluates the loss ``training_step`` returns; a manual-optimization step has none to give."""
    if getattr(pl_module, _ATTR, None) is None and not pl_module.automatic_optimization:
        raise ValueError(
            f"MeZO needs a module with automatic optimization, but {type(pl_module).__name__} sets "
            "automatic_optimization=False (its training_step calls manual_backward/optimizer.step itself). MeZO "
            "runs training_step twice under torch.no_grad() and needs it to return the loss without calling "
            "backward: remove automatic_optimization=False and the manual backward/step calls, or train without MeZO"
        )


class MeZO(Callback):
    """Zeroth-order fine-tuning of an unchanged LightningModule.

    Args:
        **settings: the fields of :class:`vleff.methods.mezo.MeZOConfig` (``eps``, ``lr``,
            ``weight_decay``, ``params``, ``seed``, ``allow_low_precision``; meanings and defaults
            documented there, their one owner).

    Every argument is checked here, so a bad config fails when it is built. At ``setup`` the
    callback refuses a module with ``automatic_optimization=False`` (MeZO needs the loss
    ``training_step`` returns), a trainer that also has the GaLore callback, and trainer
    settings a MeZO step cannot honour (``accumulate_grad_batches > 1``, ``gradient_clip_val``). At fit end
    the module's own ``training_step`` and ``automatic_optimization`` are restored, so a
    later ``Trainer.fit`` without MeZO trains it with backprop.
    """

    #: the method config whose fields ``**settings`` takes (defaults and checks live there)
    settings_config = MeZOConfig

    def __init__(self, **settings: Any) -> None:
        self.config = MeZOConfig.build(**settings)
        self.eps, self.lr, self.weight_decay = self.config.eps, self.config.lr, self.config.weight_decay
        self.params, self.seed = self.config.params, self.config.seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse, before anything runs, what MeZO cannot train (manual optimization, GaLore,
        gradient accumulation or clipping: :func:`check_trainer_settings`)."""
        check_strategy(trainer, "mezo")
        if stage != "fit":
            return
        check_automatic_optimization(pl_module)
        refuse_conflicting_methods(trainer, pl_module, "mezo")
        check_trainer_settings(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        install_mezo(trainer, pl_module, self.config)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step_lr_schedulers(trainer, "epoch")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        uninstall_mezo(pl_module, trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        uninstall_mezo(pl_module, trainer)


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class MeZOMixin:
    """Turns the module's own ``training_step`` into MeZO steps at fit start.

        Call ``self.use_mezo(**settings)`` in ``__init__`` (the fields of
    :class:`vleff.methods.mezo.MeZOConfig`, validated there, as for :class:`vleff.callbacks.MeZO`). Same
        implementation as the callback (:func:`vleff.methods.mezo.lightning.install_mezo`), so the same
        hook and logging behaviour (see :mod:`vleff.methods.mezo.lightning`): ``training_step`` runs twice
        per step, ``on_before_optimizer_step`` fires once at the restored weights, and what the step
        logs is logged once (the mean of the two evaluations for floating values). At fit end the
        module's own ``training_step`` and ``automatic_optimization`` come back (a later fit of the
        module without the mixin's MeZO trains with backprop); the GaLore callback refuses it.
    """

    _vleff_mezo_config: Any = None

    def use_mezo(self, **settings: Any) -> None:
        from vleff.methods.mezo import MeZOConfig

        self._vleff_mezo_config = MeZOConfig.build(**settings)

    def on_fit_start(self) -> None:
        next_hook(self, MeZOMixin, "on_fit_start")
        if self._vleff_mezo_config is None:
            raise RuntimeError(
                f"{type(self).__name__} mixes in MeZOMixin but never called self.use_mezo(...) in "
                "__init__; call it (e.g. self.use_mezo(eps=1e-3, lr=1e-6)) or drop the mixin"
            )
        install_mezo(self.trainer, self, self._vleff_mezo_config)  # type: ignore[attr-defined, arg-type]

    def on_train_epoch_end(self) -> None:
        from vleff.lightning.schedulers import step_lr_schedulers

        next_hook(self, MeZOMixin, "on_train_epoch_end")
        step_lr_schedulers(self.trainer, "epoch")  # type: ignore[attr-defined]

    def on_fit_end(self) -> None:
        next_hook(self, MeZOMixin, "on_fit_end")
        uninstall_mezo(self, self.trainer)  # type: ignore[arg-type, attr-defined]
