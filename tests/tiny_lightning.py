"""A minimal LightningModule and data for callback tests (independent of vleff's apps layer)."""

from __future__ import annotations

import lightning.pytorch as pl
import tiny_models as tm
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    def __init__(self, depth: int = 3, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = tm.timm_vit(depth=depth)
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, tm.IMG, tm.IMG, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    opts = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    made = pl.Trainer(callbacks=list(callbacks), **opts)
    if opts.get("strategy") == "ddp_fork":
        fork_with_one_thread(made)
    return made


def fork_with_one_thread(trainer: pl.Trainer) -> pl.Trainer:
    """Run ``trainer.fit`` with one torch thread, so its ``ddp_fork`` ranks do not hang.

    GNU OpenMP is not fork-safe: once this process has run a multi-threaded op, a forked rank's
    first parallel op waits for pool threads the fork did not copy, forever (seen: the DDP tests
    hung after the benchmark CLI tests in one process with two threads; under ``pytest -n 2`` each
    worker has one thread and never hit it). With one thread no pool is used."""
    fit = trainer.fit

    def fit_one_thread(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fit(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    trainer.fit = fit_one_thread  # type: ignore[method-assign]
    return trainer


class TinyCLIP(pl.LightningModule):
    """A tiny open_clip CLIP trained with the symmetric contrastive loss (pair methods' callbacks)."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = tm.open_clip_model()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, ids = batch
        img = self.model.encode_image(images, normalize=True)
        txt = self.model.encode_text(ids, normalize=True)
        logits = self.model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(img))
        loss = (
            torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
        ) / 2
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def pair_loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Images and token ids (EOT = largest id, zero padding) for :class:`TinyCLIP`."""
    x = torch.randn(n, 3, tm.IMG, tm.IMG, generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([tm.token_ids(batch=2, seed=seed + i) for i in range((n + 1) // 2)])[:n]
    return DataLoader(TensorDataset(x, ids), batch_size=batch_size)


class TinyBLIP(pl.LightningModule):
    """A tiny Hugging Face BLIP retrieval model trained on image-text matching (its ITM head over the
    text encoder's token 0 after cross-attending to the image): methods on BLIP's text models."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = tm.hf_blip_retrieval()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, ids, mask, match = batch
        out = self.model(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True)
        loss = torch.nn.functional.cross_entropy(out.itm_score, match)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def blip_loader(n: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Images, BLIP token ids, their padding mask and a match label (0/1) for :class:`TinyBLIP`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, tm.IMG, tm.IMG, generator=g)
    pairs = [tm.blip_token_ids(batch=2, seed=seed + i) for i in range((n + 1) // 2)]
    ids, mask = (torch.cat([p[k] for p in pairs])[:n] for k in (0, 1))
    match = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, ids, mask, match), batch_size=batch_size)
