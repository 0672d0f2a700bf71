"""``vleff-train``: compare values and batch size checked before training, the
fine-tune command printed ready to paste (Hydra-quoted), a quiet console, and model summaries
with FLOPs."""

from __future__ import annotations

import shlex
import warnings

import pytest
import tiny_models as tm
import torch
from train_cli_helpers import FitReached, compose_train, stop_at_fit

from vleff.cli.train import finetune_command, run

FAST = [
    "trainer.logger=false",
    "trainer.enable_checkpointing=false",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "compare.repeats=1",
    "compare.batch_size=4",
]


@pytest.fixture
def no_fit(monkeypatch):
    """Trainer.fit records the call and raises FitReached: the checks must fire before any."""
    return stop_at_fit(monkeypatch)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compare.methods={tome: {r: -4}}", r"compare\.methods\.tome.*r=-4"),
        ("+compare.methods.evit.keep_rate=1.5", r"compare\.methods\.evit.*keep_rate=1\.5"),
    ],
)
def test_bad_method_values_fail_before_training(override, message, tmp_path, no_fit):
    with pytest.raises(ValueError, match=message):
        run(compose_train([*FAST, override], tmp_path))
    assert no_fit == []


def test_compare_batch_size_checked_against_the_validation_set(tmp_path, no_fit):
    from vleff.data.digits import digits_arrays

    n_val = len(digits_arrays(image_size=32, split="val")[1])  # 20 % of the 1,797 digits, stratified
    with pytest.raises(
        ValueError,
        match=rf"compare\.batch_size={n_val + 1} exceeds the {n_val} validation "
        rf"images; allowed: 1 to {n_val}",
    ):
        run(compose_train([*FAST, f"compare.batch_size={n_val + 1}"], tmp_path))
    with pytest.raises(ValueError, match=r"compare\.batch_size=0 is not allowed"):
        run(compose_train([*FAST, "compare.batch_size=0"], tmp_path))
    assert no_fit == []
    with pytest.raises(FitReached):  # the largest allowed batch passes the checks
        run(compose_train([*FAST, f"compare.batch_size={n_val}"], tmp_path))
    assert no_fit == [1]


@pytest.mark.parametrize("name", ["epoch=5-step=132.ckpt", 'odd "quoted" name=1.ckpt'])
def test_finetune_command_survives_the_shell_and_hydra(name, tmp_path):
    ckpt = tmp_path / "run dir" / name
    command = finetune_command(ckpt)
    argv = shlex.split(command)
    assert argv[:2] == ["vleff-train", "experiment=clip_mezo"]
    cfg = compose_train(argv[1:], tmp_path)  # exactly what Hydra receives from the pasted command
    assert cfg.model.init_checkpoint == str(ckpt.resolve())
    assert "mezo" in cfg.callbacks


def test_clip_run_prints_the_ready_to_paste_command(tmp_path, capsys):
    cfg = compose_train(
        [
            "experiment=clip_finetune",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.logger=false",
            "++trainer.enable_progress_bar=false",
            "++trainer.enable_model_summary=false",
            "data.batch_size=16",
        ],
        tmp_path,
    )
    result = run(cfg)
    (ckpt,) = tmp_path.rglob("*.ckpt")
    assert "=" in ckpt.name  # Lightning's epoch=0-step=1.ckpt
    printed = capsys.readouterr().out
    assert result["finetune_command"] == finetune_command(ckpt) and result["finetune_command"] in printed
    cfg = compose_train(shlex.split(result["finetune_command"])[1:], tmp_path)
    assert cfg.model.init_checkpoint == str(ckpt.resolve())


def test_default_run_console_has_no_tensorboardx_tips_or_leafspec(tmp_path, caplog):
    import logging

    cfg = compose_train(
        [
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "compare.enabled=false",
            "++trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    assert cfg.trainer.logger._target_ == "lightning.pytorch.loggers.CSVLogger"
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        run(cfg)
    messages = [str(w.message) for w in seen] + [r.getMessage() for r in caplog.records]
    for noise in ("tensorboardX", "💡 Tip", "LeafSpec"):
        assert not [m for m in messages if noise in m], noise
    assert list(tmp_path.rglob("metrics.csv"))  # the CSV logger wrote the run's metrics


def test_image_classifier_summary_counts_flops():
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from vleff.models import ImageClassifier

    module = ImageClassifier(tm.timm_vit(), num_classes=10)
    assert tuple(module.example_input_array.shape) == (1, 3, tm.IMG, tm.IMG)
    summary = ModelSummary(module, max_depth=1)
    # independent count: the linear layers and patch embedding by hand (2 FLOPs per multiply-add)
    d, tokens, depth, classes = 64, (tm.IMG // tm.PATCH) ** 2 + 1, 3, 10
    patch = 2 * (tm.IMG // tm.PATCH) ** 2 * (3 * tm.PATCH * tm.PATCH) * d
    per_block = 2 * tokens * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)
    head = 2 * d * classes
    # on CPU torch's FlopCounterMode counts fused attention as 0 (vleff.profile adds it)
    assert summary.total_flops == patch + depth * per_block + head
    from vleff.profile import count_flops

    attention = depth * 4 * tokens * tokens * d  # QKᵀ and AV: 2 · 2 · N² · d per block
    assert count_flops(module.model.eval(), module.example_input_array) == summary.total_flops + attention


def test_clip_finetuner_summary_counts_flops():
    from lightning.pytorch.utilities.model_summary import ModelSummary
    from torch.utils.flop_counter import FlopCounterMode

    from vleff.models import CLIPFineTuner

    for clip, length in ((tm.open_clip_model(), 16), (tm.hf_clip_model(), 16)):
        module = CLIPFineTuner(clip, context_length=length)
        images, tokens = module.example_input_array
        assert tuple(images.shape) == (1, 3, tm.IMG, tm.IMG) and tuple(tokens.shape) == (1, length)
        summary = ModelSummary(module, max_depth=1)
        # independent count of the same forward (eval, no_grad, as the summary runs it), tower by tower
        module.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as image_count:
            module.encode_image(images)
        with torch.no_grad(), FlopCounterMode(display=False) as text_count:
            module.encode_text(tokens)
        assert summary.total_flops == image_count.get_total_flops() + text_count.get_total_flops() > 0
