"""CLIP fine-tuning: data (files the test writes, digits captions), loss and metrics against
independent computations, both model families through Lightning, GaLore/MeZO on CLIP."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vleff.data.captions import clip_tokenizer, digit_caption, digit_prompts
from vleff.data.image_text import ImageTextDataModule, ImageTextFiles, read_pairs
from vleff.models.clip_finetuner import CLIPFineTuner, build_clip, contrastive_loss, retrieval_recalls

CTX = 12


def _tiny_open_clip():
    torch.manual_seed(0)
    return build_clip("digits-tiny", width=32, layers=1, embed_dim=16, patch_size=8, image_size=32, context_length=CTX)


def _tiny_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CTX,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return CLIPModel(cfg)


def _write_pairs(tmp_path, n=8, fmt="csv"):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"a photo of thing {i % 4}", "label": i % 4})
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "csv":
        path.write_text("image,caption,label\n" + "".join(f"{r['image']},{r['caption']},{r['label']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tokenizer_ships_offline_and_captions():
    ids = clip_tokenizer("ViT-B-32")(["a photo of the digit seven"])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and 49407 in ids[0].tolist()
    assert digit_caption(7) == "a photo of the digit seven"
    assert digit_prompts()[0] == "a photo of the digit zero"
    with pytest.raises(ValueError, match="label=12"):
        digit_caption(12)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_files_dataset_reads_pairs(tmp_path, fmt):
    path = _write_pairs(tmp_path, fmt=fmt)
    ds = ImageTextFiles(path, image_size=32)
    image, caption, cid, label = ds[5]
    assert image.shape == (3, 32, 32) and caption == "a photo of thing 1" and label == 1
    assert ds.caption_ids[1] == cid and len(set(ds.caption_ids)) == 4
    with pytest.raises(ValueError, match="no 'caption' column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("image,text\nimg/0.png,x\n")
        read_pairs(bad)


def test_loss_equals_clip_cross_entropy_for_unique_captions():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * img @ txt.T
    expect = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, torch.arange(5)), expect)
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expect)
    # repeated captions: the target spreads over the positives
    ids = torch.tensor([0, 0, 1, 2, 2])
    same = (ids[:, None] == ids[None]).float()
    t = same / same.sum(1, keepdim=True)
    manual = (-(t * logits.log_softmax(1)).sum(1).mean() - (t * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, ids), manual)


def test_retrieval_recalls_match_brute_force():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    got = retrieval_recalls(img, txt, ids, ks=(1, 5))
    sim = img @ txt.T
    for k in (1, 5):
        i2t = np.mean([bool((ids[sim[i].topk(k).indices] == ids[i]).any()) for i in range(12)])
        t2i = np.mean([bool((ids[sim[:, j].topk(k).indices] == ids[j]).any()) for j in range(12)])
        assert got[f"i2t_R@{k}"].item() == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"].item() == pytest.approx(t2i)


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_finetuner_trains_on_user_files(tmp_path, family):
    import lightning.pytorch as pl

    path = _write_pairs(tmp_path)
    model = _tiny_open_clip() if family == "open_clip" else _tiny_hf_clip()
    module = CLIPFineTuner(
        model, lr=1e-3, context_length=CTX, class_prompts=[f"a photo of thing {i}" for i in range(4)]
    )
    dm = ImageTextDataModule(
        source="files", train_file=str(path), val_file=str(path), image_size=32, batch_size=4, context_length=CTX
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))
    for key in ("val/i2t_R@1", "val/t2i_R@5", "val/zero_shot_acc", "val/loss"):
        assert key in trainer.callback_metrics
    assert 0.0 <= trainer.callback_metrics["val/i2t_R@1"] <= 1.0


def test_zero_shot_accuracy_against_manual_argmax():
    module = CLIPFineTuner(_tiny_open_clip(), context_length=CTX)
    prompts = ["a red thing", "a blue thing", "a green thing"]
    img = module.encode_image(torch.randn(6, 3, 32, 32)).detach()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    classes = module.encode_text(clip_tokenizer("ViT-B-32", CTX)(prompts)).detach()
    expect = ((img @ classes.T).argmax(1) == labels).float().mean()
    assert module.zero_shot_accuracy(img, labels, prompts).item() == pytest.approx(expect.item())


@pytest.mark.parametrize("saver", ["galore", "mezo"])
def test_memory_savers_convert_the_finetuner_optimizer(tmp_path, saver):
    import lightning.pytorch as pl

    from vleff.callbacks import GaLore, MeZO
    from vleff.memory import GaLoreAdamW
    from vleff.memory import MeZO as MeZOOptimizer

    path = _write_pairs(tmp_path)
    module = CLIPFineTuner(_tiny_open_clip(), lr=1e-3, context_length=CTX)
    dm = ImageTextDataModule(source="files", train_file=str(path), image_size=32, batch_size=4, context_length=CTX)
    callback = GaLore(rank=4, update_proj_gap=2) if saver == "galore" else MeZO(lr=1e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, dm)
    opt = trainer.optimizers[0]
    assert isinstance(opt, GaLoreAdamW if saver == "galore" else MeZOOptimizer)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the fine-tuner's groups kept
    assert trainer.global_step == 2
    if saver == "galore":
        in_proj = module.model.transformer.resblocks[0].attn.in_proj_weight
        assert opt.state[in_proj]["exp_avg"].shape[1] == 4
    else:
        assert all(p.grad is None for p in module.parameters())


def test_digits_image_text_split_captions_and_batches():
    from vleff.data.image_text import DigitsImageText

    train, val = DigitsImageText("train", image_size=16), DigitsImageText("val", image_size=16)
    assert (len(train), len(val)) == (1437, 360)
    image, caption, cid, label = train[3]
    assert image.shape == (3, 16, 16) and caption == digit_caption(label) and cid == label
    torch.testing.assert_close(DigitsImageText("train", image_size=16).images, train.images)  # deterministic
    dm = ImageTextDataModule(source="digits", image_size=16, batch_size=8, context_length=CTX, train_limit=20)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (8, 3, 16, 16) and batch["tokens"].shape == (8, CTX)
    assert len(dm.train_set) == 20 and dm.class_prompts == digit_prompts()
    for i in range(8):
        assert batch["captions"][i] == digit_caption(int(batch["labels"][i]))


def test_image_text_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="source='web'"):
        ImageTextDataModule(source="web")
    with pytest.raises(ValueError, match="train_file"):
        ImageTextDataModule(source="files")
    bad = tmp_path / "pairs.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        read_pairs(bad)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_pairs(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="'open_clip:<arch>'"):
        build_clip("resnet50")
    with pytest.raises(ValueError, match=r"does not take \['widht'\]"):
        build_clip("digits-tiny", widht=64)
    with pytest.raises(ValueError, match="ks="):
        retrieval_recalls(torch.randn(2, 3), torch.randn(2, 3), torch.arange(2), ks=(0,))


def test_token_merging_and_efficiency_monitor_on_the_clip_finetuner(tmp_path):
    """One callback line: ToMe on the CLIP image tower, and EfficiencyMonitor finds the
    finetuner's ``forward(images, tokens)`` arguments in the dict batch by name."""
    import copy

    import lightning.pytorch as pl

    import vleff
    from vleff.callbacks import EfficiencyMonitor, TokenMerging
    from vleff.profile import count_flops

    path = _write_pairs(tmp_path)
    torch.manual_seed(0)
    clip = build_clip("digits-tiny", width=32, layers=2, embed_dim=16, patch_size=8, image_size=32, context_length=CTX)
    module = CLIPFineTuner(clip, lr=1e-3, context_length=CTX)
    dm = ImageTextDataModule(source="files", train_file=str(path), image_size=32, batch_size=4, context_length=CTX)
    monitor = EfficiencyMonitor(measure_activation=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TokenMerging(r=2), monitor],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    assert not [w for w in caught if "EfficiencyMonitor could not" in str(w.message)]
    assert vleff.token_counts(module) == {"image": [17, 15]}  # 16 patches + cls, r=2 in the first block
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expected = count_flops(copy.deepcopy(module).eval(), batch["images"], batch["tokens"]) / len(batch["images"])
    assert monitor.flops_per_sample == pytest.approx(expected)
