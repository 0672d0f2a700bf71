"""Every method under fully sharded data parallel: two CPU processes, gloo, FSDP2 per block.

Lightning's ``FSDPStrategy`` (FSDP1) refuses ``accelerator="cpu"`` and torch's FSDP1 needs an
accelerator device, so the CPU test runs FSDP2: Lightning's ``ModelParallelStrategy`` with
``data_parallel_size=2`` and ``vleff.shard_blocks`` (``fully_shard`` per tower block, then the
root) in ``configure_model``. The two ranks are forked once for the whole module and run every
method's fit in turn (Lightning sees ``LOCAL_RANK`` and launches nothing); meanwhile each test
runs the same callback in this process on one device with the two ranks' batches accumulated,
the independent reference: its trained weights and eval outputs must equal the sharded run's.
Every step reseeds the RNG, so the ranks and the reference's micro-batches draw the same noise
(DynamicViT's and Transkimmer's Gumbel samples).
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from method_rows import SETTINGS
from torch.utils.data import DataLoader, Subset

import vleff
from vleff.registry import all_methods, get_method

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the ranks are forked")

STEPS = 2
N = 8  # samples: 2 steps x 2 ranks x batch 2
#: rank r trains on the samples i with i % 2 == r, in batches of 2; one process sees them as rank 0's
#: first batch, rank 1's first batch, ... (the ranks get their loaders directly, no DistributedSampler)
REFERENCE_ORDER = [0, 2, 1, 3, 4, 6, 5, 7]


def _methods() -> list[str]:
    """Every registered method with a callback and a conformance row on a tower model."""
    return sorted(m.name for m in all_methods() if m.callback and SETTINGS[m.name].hosts is None)


METHODS = _methods()


# ------------------------------------------------------------------------------ the modules
class _Sharded:
    """``configure_model``: FSDP2 per block under ``ModelParallelStrategy``, nothing otherwise."""

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            vleff.shard_blocks(self.model, mesh=self.device_mesh["data_parallel"])


class _SGD:
    """Trained with SGD, not AdamW: Adam divides a gradient by its own size, so an entry whose exact
    gradient is zero (the key bias: softmax ignores a constant added to all of a query's scores)
    takes lr-sized steps from rounding noise, which differs with any summation order (seen: open_clip's
    ``in_proj_bias`` 5e-4 apart with no method at all, timm's key bias 1.3e-5 apart under
    Child-Tuning_F); SGD keeps noise noise-sized."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ShardedClassifier(_Sharded, tl.TinyClassifier):
    """AdamW: zero-initialised side modules (LST's, UniPT's) move every trained entry in two steps."""


class ShardedClassifierSGD(_SGD, ShardedClassifier):
    pass


#: methods whose ViT run uses SGD: Child-Tuning_F's ×1/p scales the key bias's rounding noise
#: into AdamW-normalised steps that the summation order decides
SGD_ON_VIT = ("child_tuning_f",)


class ShardedCLIP(_SGD, _Sharded, tl.TinyCLIP):
    pass


class ShardedBLIP(_SGD, _Sharded, tl.TinyBLIP):
    """BLIP image-text matching (the methods on BLIP's text models: Xattn)."""


def _task(name: str) -> tuple[pl.LightningModule, DataLoader]:
    """The row's module (tiny ViT classifier, tiny CLIP for the pair methods, tiny BLIP for the
    methods on BLIP's text models), sharded per block."""
    torch.manual_seed(0)
    fit = SETTINGS[name].fit if name in SETTINGS else None
    own = fit()[0] if fit is not None else None
    torch.manual_seed(0)
    if name == PLAIN_CLIP or isinstance(own, tl.TinyCLIP):
        return ShardedCLIP(), tl.pair_loader(N, batch_size=2, seed=1)
    if isinstance(own, tl.TinyBLIP):
        return ShardedBLIP(), tl.blip_loader(N, batch_size=2, seed=1)
    classifier = ShardedClassifierSGD if name in SGD_ON_VIT else ShardedClassifier
    return classifier(depth=2), tl.loader(N, batch_size=2)


def _outputs(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """Eval outputs on the first batch (both towers' embeddings for a CLIP, ITM scores for a BLIP)."""
    if isinstance(module, tl.TinyCLIP):
        images, ids = batch
        return torch.cat([module.model.encode_image(images), module.model.encode_text(ids)], dim=1)
    if isinstance(module, tl.TinyBLIP):
        images, ids, mask, _ = batch
        return module.model(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True).itm_score
    return module(batch[0])


def _full(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (all-gathered from the ranks when it is sharded)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class _SeedPerStep(pl.Callback):
    """The same seed before every batch of one optimizer step, on every rank and for every micro-batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(1000 + trainer.global_step)


class _Record(pl.Callback):
    """Saves (rank 0) the parameters at the start and end, their flags and the eval outputs."""

    def __init__(self, path: Path, batch: Any) -> None:
        self.path, self.batch = path, batch

    def _params(self, pl_module):
        return {n: _full(p) for n, p in pl_module.named_parameters()}

    def on_train_start(self, trainer, pl_module):
        self.start = self._params(pl_module)

    def on_train_end(self, trainer, pl_module):
        end = self._params(pl_module)
        trains = {n: p.requires_grad for n, p in pl_module.named_parameters()}
        pl_module.eval()
        with torch.no_grad():
            out = _full(_outputs(pl_module, self.batch))
        pl_module.train()
        if trainer.global_rank == 0:
            torch.save({"start": self.start, "end": end, "trains": trains, "out": out}, self.path)


#: the tiny CLIP fine-tuned with no method: its 0-dim ``logit_scale`` stays whole under ``shard_blocks``
#: (``fully_shard`` refuses it) with averaged gradients, and ``encode_image`` / ``encode_text`` gather
PLAIN_CLIP = "plain-clip"


#: settings the sharded run adds to a row's: MADTP calibrates τ on its first batch only, which is
#: rank 0's first batch and the reference's (its second batch is rank 1's, not rank 0's second)
SHARDED_ARGS = {"madtp": {"calibration_batches": 1}}


def _callbacks(name: str, module: pl.LightningModule) -> list[pl.Callback]:
    """The row's callback; a method that takes inputs built from the model (LoRAHub's LoRA modules)
    gets them for ``module``'s own tower (the row's are for the conformance model) and the row's
    active settings (LoRAHub: weights given, no search: the search runs in ``setup``, before the
    model is sharded, and with a budget of 3 on these batches it may keep the all-zero start, whose
    zero factors cannot train)."""
    if name == PLAIN_CLIP:
        return [_SeedPerStep()]
    settings = SETTINGS[name]
    args = {**settings.callback_args, **SHARDED_ARGS.get(name, {})}
    if settings.inputs is not None:  # composed with the row's active settings (LoRAHub: given weights)
        args = {**settings.inputs(module.model, "image"), **(settings.active or {})}
    return [get_method(name).load_callback()(**args), _SeedPerStep()]


def _trainer(root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    opts = dict(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **opts)


def fsdp2() -> ModelParallelStrategy:
    """FSDP2 data parallel over the two ranks (a collective that waits 60 s fails instead of hanging)."""
    return ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo", timeout=timedelta(seconds=60)
    )


# ------------------------------------------------------------------------------ the ranks
def _sharded_fit(name: str, out: Path, rank: int) -> None:
    module, loader = _task(name)
    batch = next(iter(loader))
    own = DataLoader(Subset(loader.dataset, range(rank, N, 2)), batch_size=2)
    callbacks = [*_callbacks(name, module), _Record(out / f"{name}.pt", batch)]
    trainer = _trainer(out / name, callbacks, devices=2, strategy=fsdp2(), use_distributed_sampler=False)
    trainer.fit(module, own)


def _sharded_resume(name: str, out: Path, rank: int) -> None:
    """Two epochs at once, and one epoch saved as a sharded checkpoint (a folder, one file per
    rank) then resumed by a fresh module and callback for the second: the final weights must agree."""
    method = name.removeprefix(RESUME)

    def fit(epochs: int, path: Path, ckpt: Path | None = None) -> pl.Trainer:
        module, loader = _task(method)
        own = DataLoader(Subset(loader.dataset, range(rank, N, 2)), batch_size=2)
        callbacks = [*_callbacks(method, module), _Record(path, next(iter(loader)))]
        trainer = _trainer(
            out / name,
            callbacks,
            devices=2,
            strategy=fsdp2(),
            use_distributed_sampler=False,
            max_steps=-1,
            max_epochs=epochs,
        )
        trainer.fit(module, own, ckpt_path=ckpt)
        return trainer

    fit(2, out / f"{name}.whole.pt")
    folder = out / f"{name}.ckpt"
    fit(1, out / f"{name}.first.pt").save_checkpoint(folder)
    fit(2, out / f"{name}.pt", ckpt=folder)


RESUME = "resume:"
#: one token method, one side method, the two optimizers (MeZO's step count lives in its param
#: groups, GaLore's moments are DTensors or replicated) and MADTP (its controller state): saved
#: sharded, resumed exactly
RESUMED = ("tome", "lst", "mezo", "galore", "madtp", "fishmask")


def _rank(rank: int, port: int, names: list[str], out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    # an earlier test's seed_everything leaves PL_GLOBAL_SEED in the environment, and the distributed
    # strategy's setup reseeds from it (the single-process reference does not): the methods' new
    # parameters would be drawn from another stream than the reference's (LoRA's A 0.23 apart)
    os.environ.pop("PL_GLOBAL_SEED", None)
    torch.set_num_threads(1)  # GNU OpenMP is not fork-safe (tests/tiny_lightning.fork_with_one_thread)
    code = 0
    for name in names:
        os.environ["WORLD_SIZE"] = "2"  # Lightning's environment removes it at teardown
        try:
            (_sharded_resume if name.startswith(RESUME) else _sharded_fit)(name, out, rank)
        except BaseException as error:  # noqa: BLE001 - reported to the test through a file
            (out / f"{name}.rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        (out / f"{name}.rank{rank}.done").touch()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os._exit(code)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, request):
    """Forks the two ranks, which fit every method in turn; yields the folder they report to."""
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    out = tmp_path_factory.mktemp("fsdp")
    port = find_free_network_port()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    context = multiprocessing.get_context("fork")
    names = [n for n in [*METHODS, PLAIN_CLIP] if any(f"[{n}]" in item.nodeid for item in request.session.items)]
    names += [RESUME + n for n in RESUMED if any(f"resume[{n}]" in item.nodeid for item in request.session.items)]
    procs = [context.Process(target=_rank, args=(rank, port, names, out)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    torch.set_num_threads(threads)
    yield out
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()


def _wait(out: Path, name: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not all((out / f"{name}.rank{r}.done").exists() for r in (0, 1)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the FSDP ranks did not finish {name} in {timeout} s")
        time.sleep(0.1)


#: FishMask freezes a parameter none of whose entries it selected on one process, but keeps it
#: trainable on several (its gradient masked to zero and its entries put back after each step):
#: the optimizer, built before the selection, keeps its state, which a sharded resume needs
KEEPS_FLAGS = ("fishmask",)

#: methods that take one step per batch (no gradient to accumulate): their reference runs the two
#: ranks' batches of a step as one batch (the ranks average their means of equal-sized batches)
ONE_STEP_PER_BATCH = ("mezo",)


def _reference(name: str, path: Path) -> None:
    """The same callback on one process, the two ranks' batches accumulated into one step."""
    module, loader = _task(name)
    batch = next(iter(loader))
    whole = name in ONE_STEP_PER_BATCH
    ordered = DataLoader(Subset(loader.dataset, REFERENCE_ORDER), batch_size=4 if whole else 2)
    trainer = _trainer(
        path.parent,
        [*_callbacks(name, module), _Record(path, batch)],
        devices=1,
        accumulate_grad_batches=1 if whole else 2,
    )
    trainer.fit(module, ordered)


def _errors(out: Path, name: str) -> list[str]:
    return [path.read_text() for r in (0, 1) if (path := out / f"{name}.rank{r}.err").exists()]


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).unsharded])
def test_method_that_cannot_train_shards_is_refused_at_setup(name, sharded_runs):
    """Both ranks fail in ``setup`` with the registry's reason, before the model changes."""
    _wait(sharded_runs, name)
    errors = _errors(sharded_runs, name)
    entry = get_method(name)
    assert len(errors) == 2
    for error in errors:
        first = error.splitlines()[0]
        assert first.startswith(f"RuntimeError: {entry.display_name} cannot run under ModelParallelStrategy"), first
        assert entry.unsharded in first and "strategy='ddp'" in first
        assert "in setup" in error  # the callback's setup, not a later hook


@pytest.mark.parametrize("name", [*[n for n in METHODS if not get_method(n).unsharded], PLAIN_CLIP])
def test_method_under_fsdp2_equals_one_process(name, sharded_runs, tmp_path):
    _reference(name, tmp_path / "reference.pt")
    _wait(sharded_runs, name)
    errors = _errors(sharded_runs, name)
    assert not errors, errors[0]
    ref = torch.load(tmp_path / "reference.pt")
    got = torch.load(sharded_runs / f"{name}.pt")
    if name in KEEPS_FLAGS:  # what one process freezes stays trainable sharded, and is put back unchanged
        for n in [n for n, t in got["trains"].items() if t and not ref["trains"][n]]:
            assert torch.equal(got["end"][n], got["start"][n]), n
            got["trains"][n] = False
    assert got["trains"] == ref["trains"]
    trained = [n for n, t in got["trains"].items() if t]
    assert trained and all(not torch.equal(got["end"][n], got["start"][n]) for n in trained)
    for n, t in got["trains"].items():
        if not t:
            assert torch.equal(got["end"][n], got["start"][n]), n
    diffs = {n: (got["end"][n] - ref["end"][n]).abs().max().item() for n in got["end"]}
    assert max(diffs.values()) < 1e-5, {n: d for n, d in diffs.items() if d >= 1e-5}
    torch.testing.assert_close(got["out"], ref["out"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", RESUMED)
def test_sharded_checkpoint_resume(name, sharded_runs):
    _wait(sharded_runs, RESUME + name)
    errors = _errors(sharded_runs, RESUME + name)
    assert not errors, errors[0]
    folder = sharded_runs / f"{RESUME}{name}.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == 2  # one shard file per rank
    whole = torch.load(sharded_runs / f"{RESUME}{name}.whole.pt")
    resumed = torch.load(sharded_runs / f"{RESUME}{name}.pt")
    first = torch.load(sharded_runs / f"{RESUME}{name}.first.pt")
    for n, value in resumed["start"].items():  # the second fit started where the first ended
        assert torch.equal(value, first["end"][n]), n
    for n, value in resumed["end"].items():
        assert torch.equal(value, whole["end"][n]), n
    assert torch.equal(resumed["out"], whole["out"])


# ------------------------------------------------------------------------------ in one process
def test_fsdp1_and_deepspeed_are_refused_by_name_for_a_method_that_cannot_shard():
    """Lightning's FSDPStrategy (FSDP1) refuses the CPU, so the check is called on the strategy
    object: the same error, naming the strategy class; a replicated strategy passes."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from vleff.lightning.strategy import check_strategy, shards_parameters

    class MyFSDP(FSDPStrategy):  # a user's subclass still shards
        pass

    for strategy in (FSDPStrategy(), MyFSDP()):
        assert shards_parameters(strategy)
        with pytest.raises(RuntimeError, match=f"VQT cannot run under {type(strategy).__name__}.*keys and values"):
            check_strategy(SimpleNamespace(strategy=strategy), "vqt")
        check_strategy(SimpleNamespace(strategy=strategy), "tome")  # ToMe runs sharded
    assert not shards_parameters(DDPStrategy())
    check_strategy(SimpleNamespace(strategy=DDPStrategy()), "vqt")


@pytest.mark.parametrize("name", ["mezo", "galore", "fishmask", "child_tuning_d"])
def test_optimizers_run_on_dtensor_shards_and_refuse_flattened_ones(name):
    """The optimizers and the Fisher-masked methods train FSDP2's DTensor shards (the fits above)
    but not FSDP1's flat shards, whose place in the parameter they cannot know; DDP and a single
    device stay open."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from vleff.lightning.strategy import check_strategy

    label = get_method(name).display_name
    with pytest.raises(
        RuntimeError, match=f"{label} cannot run under FSDPStrategy, which flattens.*ModelParallelStrategy"
    ):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()), name)
    check_strategy(SimpleNamespace(strategy=fsdp2()), name)
    check_strategy(SimpleNamespace(strategy=DDPStrategy()), name)
    check_strategy(None, name)


def test_block_classes_name_each_towers_block_class_also_once_sharded():
    import tiny_models as tm
    from open_clip.transformer import ResidualAttentionBlock
    from timm.models.vision_transformer import Block

    from vleff.backbones.sharding import blocks_of, library_type

    assert vleff.block_classes(tm.timm_vit(depth=2)) == {Block}
    clip = tm.open_clip_model()
    assert vleff.block_classes(clip) == {ResidualAttentionBlock}
    assert len(blocks_of(clip)) == len(clip.visual.transformer.resblocks) + len(clip.transformer.resblocks)
    from torch.distributed.fsdp import FSDPModule

    sharded = type("FSDPBlock", (FSDPModule, Block), {})  # the class fully_shard swaps in
    block = Block(dim=8, num_heads=2)
    block.__class__ = sharded
    assert library_type(block) is Block
    with pytest.raises(TypeError, match="supports"):
        vleff.block_classes(torch.nn.Linear(2, 2))
