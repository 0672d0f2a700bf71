"""The CLIP experiment configs through vleff-train's ``run``: AdamW, GaLore and MeZO, one fast_dev_run each."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

import vleff.cli.train as train_cli
from vleff.cli.train import CONFIG_DIR, run

FAST = [
    "trainer.fast_dev_run=true",
    "trainer.logger=false",
    "trainer.enable_checkpointing=false",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "data.batch_size=16",
]


def _compose(overrides, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[*FAST, f"trainer.default_root_dir={tmp_path}", f"compare.save_dir={tmp_path}", *overrides],
        )


class Probe(Callback):
    """Records what the run did: weights before/after, the optimizer it stepped, the training losses."""

    def __init__(self):
        self.losses, self.before, self.module, self.optimizer = [], None, None, None

    def on_fit_start(self, trainer, pl_module):  # runs after the savers' on_fit_start (it is appended last)
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_fit_end(self, trainer, pl_module):
        self.module, self.optimizer = pl_module, trainer.optimizers[0]

    def on_validation_end(self, trainer, pl_module):
        self.validations = getattr(self, "validations", 0) + 1

    def changed(self):
        return [n for n, p in self.module.named_parameters() if not torch.equal(p.detach(), self.before[n])]


@pytest.fixture
def probe(monkeypatch):
    probe = Probe()
    original = train_cli._instantiate_callbacks
    monkeypatch.setattr(train_cli, "_instantiate_callbacks", lambda cfg: [*original(cfg), probe])
    return probe


def _check_common(result, probe):
    assert probe.losses and all(math.isfinite(v) for v in probe.losses)
    assert math.isfinite(result["val"]["val/loss"])
    for key in ("val/i2t_R@1", "val/t2i_R@1", "val/i2t_R@5", "val/zero_shot_acc"):
        assert 0.0 <= result["val"][key] <= 1.0, key
    assert result["rows"] == []  # compare is off for CLIP


def test_clip_finetune_experiment_trains_with_adamw(tmp_path, probe):
    # one real step (fast_dev_run turns checkpointing off): the checkpoint must load weights_only
    cfg = _compose(["experiment=clip_finetune"], tmp_path)
    assert cfg.model._target_ == "vleff.models.CLIPFineTuner" and cfg.data.source == "digits"
    assert cfg.data.context_length == cfg.model.context_length == cfg.model.model_kwargs.context_length
    cfg = _compose(
        [
            "experiment=clip_finetune",
            "trainer.fast_dev_run=false",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.enable_checkpointing=true",
        ],
        tmp_path,
    )
    result = run(cfg)
    _check_common(result, probe)
    assert type(probe.optimizer) is torch.optim.AdamW
    assert "model.visual.transformer.resblocks.0.attn.in_proj_weight" in probe.changed()
    (ckpt,) = tmp_path.rglob("*.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # no omegaconf objects inside
    assert saved["hyper_parameters"]["model_kwargs"]["width"] == 64
    from vleff.models import CLIPFineTuner

    again = CLIPFineTuner(
        "digits-tiny",
        model_kwargs=saved["hyper_parameters"]["model_kwargs"],
        context_length=16,
        init_checkpoint=str(ckpt),
    )
    for (name, p), q in zip(again.named_parameters(), probe.module.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=0, msg=name)


def test_clip_galore_experiment_projects_the_weights(tmp_path, probe):
    from vleff.memory import GaLoreAdamW

    cfg = _compose(["experiment=clip_galore", "callbacks.galore.rank=8"], tmp_path)
    result = run(cfg)
    _check_common(result, probe)
    opt = probe.optimizer
    assert isinstance(opt, GaLoreAdamW)
    assert [g["lr"] for g in opt.param_groups][0] <= cfg.model.lr  # the fine-tuner's schedule still drives it
    in_proj = probe.module.model.transformer.resblocks[0].attn.in_proj_weight  # [3*64, 64]
    assert opt.state[in_proj]["exp_avg"].shape == (3 * 64, 8)
    changed = probe.changed()
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in changed  # projected and stepped
    assert "model.token_embedding.weight" in changed  # plain AdamW group


def test_clip_mezo_experiment_starts_from_a_checkpoint_without_grads(tmp_path, probe):
    from vleff.memory import MeZO as MeZOOptimizer

    cfg = _compose(["experiment=clip_mezo"], tmp_path)
    torch.manual_seed(123)
    trained = instantiate(cfg.model)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "adamw.ckpt")  # Lightning checkpoint layout
    cfg = _compose(["experiment=clip_mezo", f"model.init_checkpoint={tmp_path / 'adamw.ckpt'}"], tmp_path)
    result = run(cfg)
    _check_common(result, probe)
    for name, p in trained.named_parameters():
        torch.testing.assert_close(probe.before[name], p.detach(), rtol=0, atol=0)
    assert isinstance(probe.optimizer, MeZOOptimizer)
    assert all(p.grad is None for p in probe.module.parameters())
    # MeZO restores the module's automatic optimization at fit end; the probe's on_fit_end runs after
    assert probe.module.automatic_optimization is True and len(probe.changed()) > 10


def test_clip_experiment_on_user_files(tmp_path, probe):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture number {i}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _compose(
        [
            "experiment=clip_finetune",
            "data=image_text_files",
            f"data.train_file={tmp_path / 'pairs.jsonl'}",
            f"data.val_file={tmp_path / 'pairs.jsonl'}",
            "data.image_size=32",
            "data.num_workers=0",
        ],
        tmp_path,
    )
    result = run(cfg)
    assert probe.losses and all(math.isfinite(v) for v in probe.losses)
    assert 0.0 <= result["val"]["val/i2t_R@1"] <= 1.0 and "val/zero_shot_acc" not in result["val"]  # no labels


def test_clip_mezo_bad_checkpoint_is_named(tmp_path):
    cfg = _compose(["experiment=clip_mezo", f"model.init_checkpoint={tmp_path / 'missing.ckpt'}"], tmp_path)
    with pytest.raises(Exception, match="init_checkpoint=.*missing.ckpt.* does not exist"):
        run(cfg)


@pytest.mark.parametrize("method", ["crossget", "madtp"])
def test_clip_cross_modal_experiments_fine_tune_a_baseline_with_the_method(method, tmp_path, probe, capsys):
    """clip_crossget / clip_madtp: the README table's recipe. The method is applied to both
    towers of the 6-block digits CLIP, starts from the given baseline weights, and its own
    parameters (cross-token offsets / codebook) are trained with the rest."""
    cfg = _compose([f"experiment=clip_{method}"], tmp_path)
    assert (cfg.model.model_kwargs.layers, cfg.model.model_kwargs.patch_size, cfg.model.lr) == (6, 4, 1e-3)
    torch.manual_seed(5)
    baseline = instantiate(cfg.model)
    torch.save({"state_dict": baseline.state_dict()}, tmp_path / "baseline.ckpt")
    quick = (
        ["callbacks.madtp.max_evals=6", "callbacks.madtp.samples=4"] if method == "madtp" else []
    )  # fewer counted forwards
    cfg = _compose(
        [f"experiment=clip_{method}", f"model.init_checkpoint={tmp_path / 'baseline.ckpt'}", *quick], tmp_path
    )
    result = run(cfg)
    _check_common(result, probe)
    for name, p in baseline.named_parameters():  # started from the baseline, not a fresh init
        torch.testing.assert_close(probe.before[name], p.detach(), rtol=0, atol=0)
    own = [n for n in probe.changed() if f"vleff_{method}" in n]
    assert own, f"no {method} parameter was trained: {probe.changed()[:5]}"
    assert "model.visual.transformer.resblocks.5.attn.in_proj_weight" in probe.changed()
    # MADTP re-calibrates τ after the fit's last validation: the run validates the final model again
    assert probe.validations == (2 if method == "madtp" else 1)
    out = capsys.readouterr().out  # no comparison table for CLIP: the last validation is printed
    assert "last validation" in out and all(key in out for key in result["val"])


def test_checkpoint_hint_of_a_method_run_does_not_offer_mezo(tmp_path, capsys):
    """A checkpoint holding a method's parameters cannot be loaded (strictly) into a plain CLIP:
    the hint says to apply the method instead of printing the MeZO command."""
    from types import SimpleNamespace

    import vleff

    module = instantiate(_compose(["experiment=clip_crossget"], tmp_path).model)
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"")
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path=str(ckpt)))
    vleff.apply_crossget(module.model, r_image=1, r_text=0)
    assert train_cli._print_checkpoint_hint(trainer, module) is None
    out = capsys.readouterr().out
    assert "trained with crossget: apply the same method" in out and "MeZO" not in out
    vleff.remove_crossget(module.model)
    assert "experiment=clip_mezo" in train_cli._print_checkpoint_hint(trainer, module)
