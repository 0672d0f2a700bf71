"""CLIP fine-tuning as a LightningModule, for open_clip and Hugging Face CLIP models.

* Loss: symmetric contrastive cross-entropy with a learnable temperature (``logit_scale``,
  clamped to ``ln 100`` as in CLIP). Captions that repeat inside a batch (``caption_ids``
  equal) are positives of each other: the target row is uniform over them, which is
  standard CLIP when every caption is unique and keeps the loss well posed on data such as
  digits, where ten captions describe all images.
* Validation: retrieval Recall@1/@5 image→text and text→image (``torchmetrics``
  ``RetrievalRecall`` over the whole validation set, a hit is any item with the same
  ``caption_id``) and, when class prompts are given, zero-shot accuracy.
* Optimizer: AdamW with no decay on biases, norms, embeddings and the temperature; linear
  warm-up then cosine decay over the run. Memory savers (:class:`vleff.callbacks.GaLore`,
  :class:`vleff.callbacks.MeZO`) convert it without code changes.

Models: pass an ``nn.Module`` or a name for :func:`build_clip` (``"open_clip:ViT-B-32"``,
``"hf:<path or hub id>"``, ``"digits-tiny"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from vleff.backbones.pairs import ModelPair, contrastive_loss, find_pair
from vleff.methods.galore.selection import wants_decay

__all__ = ["CLIPFineTuner", "build_clip", "clip_family", "clip_pair", "contrastive_loss", "retrieval_recalls"]


def build_clip(name: str, pretrained: str | None = None, **cfg: Any) -> nn.Module:
    """A CLIP model by name (no download unless ``pretrained``/a hub id asks for one).

    * ``"open_clip:<arch>"``: ``open_clip.create_model(arch, pretrained=pretrained)``.
    * ``"hf:<path>"``: ``transformers.CLIPModel.from_pretrained(path)``.
    * ``"digits-tiny"``: a small open_clip CLIP for 32x32 images trained from scratch
      (``cfg`` overrides ``embed_dim``, ``width``, ``layers``, ``patch_size``, ``image_size``,
      ``context_length``).
    """
    if name.startswith("open_clip:"):
        import open_clip

        return open_clip.create_model(name.split(":", 1)[1], pretrained=pretrained, **cfg)
    if name.startswith("hf:"):
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(name.split(":", 1)[1], **cfg)
    if name == "digits-tiny":
        import open_clip
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        allowed = {"embed_dim", "width", "layers", "patch_size", "image_size", "context_length"}
        if unknown := sorted(set(cfg) - allowed):
            raise ValueError(f"model 'digits-tiny' does not take {unknown}; it takes {sorted(allowed)}")
        width, layers = cfg.get("width", 128), cfg.get("layers", 3)
        vision = CLIPVisionCfg(
            layers=layers,
            width=width,
            head_width=32,
            patch_size=cfg.get("patch_size", 4),
            image_size=cfg.get("image_size", 32),
            mlp_ratio=2.0,
        )
        text = CLIPTextCfg(
            context_length=cfg.get("context_length", 16),
            vocab_size=49408,
            width=width,
            heads=width // 32,
            layers=layers,
            mlp_ratio=2.0,
        )
        return open_clip.CLIP(embed_dim=cfg.get("embed_dim", 64), vision_cfg=vision, text_cfg=text)
    raise ValueError(f"model name {name!r} is not known; use 'open_clip:<arch>', 'hf:<path>' or 'digits-tiny'")


_CLIP_PAIRS = {"open_clip": "open_clip", "hf_clip": "hf"}


def clip_pair(model: nn.Module) -> ModelPair:
    """The :class:`~vleff.backbones.pairs.ModelPair` of a CLIP model (open_clip or Hugging Face).

    Contrastive fine-tuning needs the library's projected embeddings and its learnable
    temperature; BLIP pairs have no temperature (their ITC head is trained with BLIP's own
    losses), so they are refused here with the same error as any other model."""
    try:
        pair = find_pair(model)
    except TypeError as err:
        raise TypeError(
            f"{type(model).__name__} is neither an open_clip CLIP nor a Hugging Face CLIPModel ({err})"
        ) from None
    if pair.family not in _CLIP_PAIRS:
        raise TypeError(
            f"{type(model).__name__} is neither an open_clip CLIP nor a Hugging Face CLIPModel "
            f"(it is a {pair.family} pair without a contrastive temperature)"
        )
    return pair


def clip_family(model: nn.Module) -> str:
    """``"open_clip"`` or ``"hf"`` (Hugging Face ``CLIPModel``), read from :func:`clip_pair`."""
    return _CLIP_PAIRS[clip_pair(model).family]


def _plain(value: Any) -> Any:
    """``OmegaConf`` containers as plain dicts/lists (other values unchanged)."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _example_inputs(
    model: nn.Module, family: str, context_length: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One image and one caption of the model's sizes (``None`` when a size is unknown).

    The caption is all ones: non-zero, so a Hugging Face attention mask (``tokens != 0``)
    keeps every position, and open_clip pools at position 0 (argmax of equal ids).
    """
    from vleff.models.factory import image_input_size

    size = image_input_size(model)
    if family == "hf":
        length = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    else:
        length = getattr(model, "context_length", None)
    length = context_length or length
    if size is None or not isinstance(length, int) or length < 1:
        return None
    return torch.zeros(1, size[0], size[1], size[1]), torch.ones(1, length, dtype=torch.long)


def retrieval_recalls(
    image_emb: torch.Tensor, text_emb: torch.Tensor, caption_ids: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, torch.Tensor]:
    """Recall@k both ways over a whole set, as retrieval papers report it: the share of queries
    with at least one relevant item (same ``caption_id``) among the k most similar.

    Computed with ``torchmetrics.retrieval.RetrievalHitRate`` (torchmetrics' ``RetrievalRecall``
    divides by the number of relevant items instead, which is not Recall@k when captions repeat).
    """
    from torchmetrics.retrieval import RetrievalHitRate

    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ks={tuple(ks)!r}: every k must be a positive int")
    sim = (image_emb @ text_emb.T).float()  # [N images, N texts]
    relevant = caption_ids[:, None] == caption_ids[None, :]
    n_img, n_txt = sim.shape
    idx_i = torch.arange(n_img, device=sim.device)[:, None].expand(n_img, n_txt).flatten()
    idx_t = torch.arange(n_txt, device=sim.device)[:, None].expand(n_txt, n_img).flatten()
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = RetrievalHitRate(top_k=k)(sim.flatten(), relevant.flatten(), indexes=idx_i)
        out[f"t2i_R@{k}"] = RetrievalHitRate(top_k=k)(sim.T.flatten(), relevant.T.flatten(), indexes=idx_t)
    return out


class CLIPFineTuner(pl.LightningModule):
    """Contrastive fine-tuning of a CLIP model (open_clip or Hugging Face).

    Args:
        model: the CLIP model, or a name for :func:`build_clip`.
        model_kwargs: extra arguments for :func:`build_clip` when ``model`` is a name.
        lr, weight_decay, betas, eps: AdamW (CLIP's betas/eps by default).
        warmup_steps: linear warm-up before cosine decay to 0 over the run.
        class_prompts: one prompt per class for zero-shot accuracy (``None``: the
            datamodule's ``class_prompts`` if it has them).
        tokenizer, context_length: open_clip tokenizer for the class prompts.
        max_logit_scale: clamp of the learnable temperature (CLIP: ``ln 100``).
        init_checkpoint: start from these weights — a Lightning checkpoint of a
            ``CLIPFineTuner`` (e.g. an AdamW run's, to continue with MeZO) or a plain state
            dict of the CLIP model. Only the weights are loaded: optimizer, schedule and step
            counter start fresh (use ``Trainer.fit(ckpt_path=...)`` to resume a run instead).
            On the ``vleff-train`` command line quote the path: Lightning's checkpoint names
            contain ``=`` (``epoch=5-step=132.ckpt``), which Hydra's grammar rejects unquoted::

                vleff-train experiment=clip_mezo 'model.init_checkpoint="/path/epoch=5-step=132.ckpt"'

            (``vleff-train`` prints this command, filled in, at the end of a run.)

    Sets ``example_input_array`` (one image and one caption of the model's sizes) so
    Lightning's model summary shows the FLOPs of ``forward(images, tokens)``.
    """

    def __init__(
        self,
        model: nn.Module | str = "digits-tiny",
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 0,
        class_prompts: Sequence[str] | None = None,
        tokenizer: str = "ViT-B-32",
        context_length: int | None = None,
        max_logit_scale: float = math.log(100.0),
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        # Hydra hands nested values over as DictConfig/ListConfig; plain containers keep the
        # checkpoint's hyperparameters loadable with torch.load(weights_only=True)
        model_kwargs, betas, class_prompts = _plain(model_kwargs), tuple(_plain(betas)), _plain(class_prompts)
        if not lr >= 0:
            raise ValueError(f"lr={lr!r} is not allowed; it must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} is not allowed; it must be >= 0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} is not allowed; use an int >= 0")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.model = build_clip(model, **(model_kwargs or {})) if isinstance(model, str) else model
        self._pair = clip_pair(self.model)
        self.family = _CLIP_PAIRS[self._pair.family]
        self.class_prompts = list(class_prompts) if class_prompts is not None else None
        self._val: list[tuple[torch.Tensor, ...]] = []
        example = _example_inputs(self.model, self.family, context_length)
        if example is not None:  # Lightning's model summary counts the FLOPs of forward(images, tokens)
            self.example_input_array = example
        if init_checkpoint is not None:
            self.load_clip_weights(init_checkpoint)

    def load_clip_weights(self, path: str) -> None:
        """Load the CLIP model's weights from a Lightning checkpoint or a plain state dict (strict)."""
        from pathlib import Path

        if not Path(path).is_file():
            raise FileNotFoundError(f"init_checkpoint={str(path)!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"init_checkpoint={str(path)!r} holds a {type(state).__name__}, not a state dict")
        if any(k.startswith("model.") for k in state):
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"init_checkpoint={str(path)!r} does not fit this model ({type(self.model).__name__}): {err}"
            ) from err

    # ------------------------------------------------------------------ encoders
    @property
    def pair(self) -> ModelPair:
        """The model's image-text pair (rebuilt if ``self.model`` was replaced)."""
        if self._pair.model is not self.model:
            self._pair = clip_pair(self.model)
        return self._pair

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.pair.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # padding is token 0 (Hugging Face takes the mask; open_clip's causal tower needs none)
        return self.pair.encode_text(tokens, attention_mask=(tokens != 0).long(), normalize=True)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.pair.logit_scale

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        img, txt = self(batch["images"], batch["tokens"])
        loss = contrastive_loss(img, txt, self.logit_scale, batch.get("caption_ids"))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(img))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        img, txt = self(batch["images"], batch["tokens"])
        self.log(
            "val/loss",
            contrastive_loss(img, txt, self.logit_scale, batch.get("caption_ids")),
            batch_size=len(img),
            sync_dist=True,
        )
        self._val.append((img, txt, batch["caption_ids"], batch["labels"]))

    def _prompts(self) -> list[str] | None:
        if self.class_prompts is not None:
            return self.class_prompts
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "class_prompts", None)

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        img, txt, ids, labels = (torch.cat(t) for t in zip(*self._val))
        self._val.clear()
        if self.trainer.world_size > 1:
            img, txt, ids, labels = (self.all_gather(t).flatten(0, 1) for t in (img, txt, ids, labels))
        metrics = {f"val/{k}": v for k, v in retrieval_recalls(img, txt, ids).items()}
        prompts = self._prompts()
        if prompts and (labels >= 0).any():
            metrics["val/zero_shot_acc"] = self.zero_shot_accuracy(img, labels, prompts)
        self.log_dict(metrics, prog_bar=True)

    @torch.no_grad()
    def zero_shot_accuracy(self, image_emb: torch.Tensor, labels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Accuracy of classifying images by their most similar class prompt."""
        from torchmetrics.functional.classification import multiclass_accuracy

        from vleff.data.captions import clip_tokenizer

        length = self.hparams.context_length or self._text_context_length()
        tokens = clip_tokenizer(self.hparams.tokenizer, length)(list(prompts)).to(image_emb.device)
        classes = self.encode_text(tokens)
        keep = labels >= 0
        pred = (image_emb[keep] @ classes.T).argmax(dim=1)
        return multiclass_accuracy(pred, labels[keep], num_classes=len(prompts), average="micro")

    def _text_context_length(self) -> int:
        if self.family == "hf":
            return int(self.model.config.text_config.max_position_embeddings)
        return int(getattr(self.model, "context_length", 77))

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if wants_decay(name, p) else no_decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = int(hp.warmup_steps)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
