"""MemVP vs prefix visual tokens (LLaVA-style) on a Llama-style LM: FLOPs, latency, training memory, accuracy.

Part 1 (``--part cost``): a random-init ``LlamaForCausalLM`` (width 512, 4 layers, gated MLP
1376 wide, vocabulary 2048) behind a timm ViT that gives 256 visual tokens (64 px, patch 4,
width 384, 4 blocks), 64 text tokens, batch 4, fp32, CPU. For both modes of
:class:`vleff.models.VisionLanguageModel`:

* FLOPs (:func:`vleff.profile.count_flops`) of one forward, of the LM alone (visual tokens
  given) and of generating 16 tokens with the KV cache;
* latency of one forward and of generating 16 tokens, interleaved
  (:func:`vleff.profile.throughput.measure_throughput`, rotating order, median);
* trainable parameters (frozen tower and LM), bytes saved for backward of one training
  forward (:func:`vleff.profile.memory.saved_activation_bytes`) and AdamW state after a step.

Part 2 (``--part accuracy``): digits "which digit is this?" (``vleff.data.digits_vlm``): a
tiny Llama (width 128, 2 layers) is first trained here on the task's text alone (it learns the
answer format, not the digit), then frozen; each mode trains only its visual prompt (prefix
projector / MemVP) for the same number of Lightning steps on the same data module and frozen
random-init ViT; accuracy = greedy answer on the 360 validation images.

``--train-host`` trains the LM and the ViT too, in both modes. ``--part prefix-probe`` measures
why the frozen prefix baseline stays at chance (see :func:`prefix_probe`).

    python benchmarks/memvp_latency.py --part cost
    python benchmarks/memvp_latency.py --part accuracy --steps 200 --text-steps 200 [--train-host]
    python benchmarks/memvp_latency.py --part prefix-probe --steps 200 --text-steps 200
    python benchmarks/memvp_latency.py --part blip --repeats 5

Part 3 (``--part blip``): FLOPs and interleaved latency, see :func:`blip`.
"""

from __future__ import annotations

import argparse
import json

import torch


def build(
    visual_prompt: str,
    width: int = 512,
    layers: int = 4,
    vocab: int = 2048,
    image: int = 64,
    patch: int = 4,
    vit_width: int = 384,
    vit_depth: int = 4,
    n_mem: int = 256,
    seed: int = 0,
):
    from timm.models.vision_transformer import VisionTransformer
    from transformers import LlamaConfig, LlamaForCausalLM

    from vleff.models.vlm import VisionLanguageModel

    torch.manual_seed(seed)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=int(width * 2.6875),
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=False,
        )
    )
    vit = VisionTransformer(
        img_size=image, patch_size=patch, embed_dim=vit_width, depth=vit_depth, num_heads=6, num_classes=0
    )
    memvp = {"n_mem": n_mem} if visual_prompt == "memvp" else None
    vlm = VisionLanguageModel(vit, lm, visual_prompt, projector_hidden=width, memvp=memvp)
    vlm.freeze_host()
    return vlm.eval()


def cost(args: argparse.Namespace) -> dict:
    from vleff.profile.flops import count_flops
    from vleff.profile.memory import optimizer_state_bytes, saved_activation_bytes
    from vleff.profile.throughput import measure_throughput

    models = {m: build(m) for m in ("prefix", "memvp")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 64, 64, generator=g)
    ids = torch.randint(0, 2048, (args.batch, args.text), generator=g)
    out: dict = {"batch": args.batch, "text_tokens": args.text, "new_tokens": args.new_tokens}
    feats = models["prefix"].visual(x)
    out["visual_tokens"] = int(feats.shape[1])
    for name, vlm in models.items():
        row: dict = {}
        row["forward_flops"] = count_flops(lambda: vlm(x, ids))

        def lm_only(vlm=vlm, name=name):
            if name == "prefix":
                emb = torch.cat([vlm.projector(feats), vlm.lm.get_input_embeddings()(ids)], dim=1)
                return vlm.lm(inputs_embeds=emb)
            vlm.vleff_memvp.set_memory(feats)
            return vlm.lm(input_ids=ids)

        row["lm_forward_flops"] = count_flops(lm_only)
        row["generate_flops"] = count_flops(lambda: vlm.generate(x, ids, max_new_tokens=args.new_tokens))
        row["trainable_parameters"] = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
        row["total_parameters"] = sum(p.numel() for p in vlm.parameters())
        labels = ids.clone()
        vlm.train()
        row["saved_for_backward_bytes"] = saved_activation_bytes(lambda: vlm(x, ids, labels=labels)["loss"])
        opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-4)
        vlm(x, ids, labels=labels)["loss"].backward()
        opt.step()
        row["optimizer_state_bytes"] = optimizer_state_bytes(opt)
        vlm.zero_grad(set_to_none=True)
        vlm.eval()
        out[name] = row
    with torch.no_grad():
        fwd = measure_throughput(
            {n: (lambda m=m: m(x, ids)) for n, m in models.items()},
            args.batch,
            warmup=2,
            repeats=args.repeats,
            progress=False,
        )
        gen = measure_throughput(
            {n: (lambda m=m: m.generate(x, ids, max_new_tokens=args.new_tokens)) for n, m in models.items()},
            args.batch,
            warmup=1,
            repeats=args.repeats,
            progress=False,
        )
    for n in models:
        out[n]["forward_median_s"] = fwd[n].median_s
        out[n]["generate_median_s"] = gen[n].median_s
    p, m = out["prefix"], out["memvp"]
    out["ratios_memvp_over_prefix"] = {
        k: m[k] / p[k]
        for k in (
            "forward_flops",
            "lm_forward_flops",
            "generate_flops",
            "forward_median_s",
            "generate_median_s",
            "saved_for_backward_bytes",
        )
    }
    return out


def text_pretrained_lm(task: str, steps: int):
    """The tiny Llama of the accuracy parts, trained ``steps`` AdamW steps on the task's text alone
    (answers drawn at random: it learns the format, not the digit). Returns ``(lm, final loss)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vleff.data.digits_vlm import VOCAB, digit_text_batch

    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=False,
        )
    )
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        ids, labels = digit_text_batch(task, torch.randint(0, 10, (64,), generator=g))
        loss = torch.nn.functional.cross_entropy(
            lm(input_ids=ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm, float(loss.detach())


def digits_vlm(lm, mode: str):
    """The accuracy parts' VisionLanguageModel: a random-init timm ViT (32 px, patch 4: 64 visual
    tokens, width 128, 4 blocks; seed 0) + ``lm``, in ``mode``."""
    from timm.models.vision_transformer import VisionTransformer

    from vleff.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0)
    return VisionLanguageModel(vit, lm, mode, projector_hidden=128, memvp={"n_mem": 64} if mode == "memvp" else None)


def accuracy(args: argparse.Namespace) -> dict:
    import lightning.pytorch as pl

    from vleff.data.digits_vlm import DigitsVLMDataModule
    from vleff.models.vlm_task import VisionLanguageTask

    lm, text_loss = text_pretrained_lm(args.task, args.text_steps)
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    results: dict = {
        "task": args.task,
        "steps": args.steps,
        "text_pretrain_steps": args.text_steps,
        "text_pretrain_loss": text_loss,
        "lr": args.lr,
        "train_host": args.train_host,
    }
    for mode in ("prefix", "memvp"):
        lm.load_state_dict(state)
        lm.requires_grad_(True)
        vlm = digits_vlm(lm, mode)
        task = VisionLanguageTask(vlm, args.task, lr=args.lr, train_host=args.train_host)
        dm = DigitsVLMDataModule(args.task, batch_size=32)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            val_check_interval=None,
            check_val_every_n_epoch=10**6,
        )
        trainer.fit(task, dm)
        metrics = trainer.validate(task, dm, verbose=False)[0]
        results[mode] = {
            "val_acc": metrics["val/acc"],
            "trainable_parameters": sum(p.numel() for p in vlm.parameters() if p.requires_grad),
        }
    return results


def prefix_probe(args: argparse.Namespace) -> dict:
    """Why the frozen-LM prefix baseline of ``--part accuracy`` stays at chance (QA task).

    * ``prefix_attention_mass``: per layer and head, the attention the answer position (``?``)
      gives the 64 prefix positions (random prefix of the projector's output scale), for the LM at
      initialisation and after the text pre-training;
    * ``answer_hidden_state``: the answer position's hidden-state norm after each layer (the last
      after the final norm) and how far a second random prefix moves it;
    * ``grad_norm_step0``: norm of the loss gradient w.r.t. each mode's trainable parameters on
      the first batch (frozen text-pretrained LM, frozen ViT);
    * ``projector_lr_sweep``: the real prefix projector trained alone (plain AdamW loop on the
      frozen ViT's features, batch 32, ``--steps`` steps) at three learning rates: validation
      accuracy of the answer token;
    * ``oracle_prefix_lr_sweep``: the same LM given a *perfect* visual prefix to learn, a free
      ``[10, 64, 128]`` table indexed by the true digit (no ViT, no projector): accuracy on the
      last 5 batches. If even this stays at chance, no projector can fix it: the frozen LM does
      not read its context.
    """
    import copy

    import torch.nn.functional as F

    from vleff.data.digits import digits_arrays
    from vleff.data.digits_vlm import DIGIT_TOKEN, digit_text_batch, prompt

    out: dict = {"steps": args.steps, "text_pretrain_steps": args.text_steps}
    answer = len(prompt("qa")) - 1  # the position whose next-token logits are the answer
    n_vis = 64

    def attention_mass(lm) -> list[list[float]]:
        lm.set_attn_implementation("eager")
        ids, _ = digit_text_batch("qa", torch.arange(10))
        emb = lm.get_input_embeddings()(ids)
        prefix = torch.randn(10, n_vis, emb.shape[-1], generator=torch.Generator().manual_seed(0)) * 0.15
        with torch.no_grad():
            att = lm(inputs_embeds=torch.cat([prefix, emb], 1), output_attentions=True).attentions
        lm.set_attn_implementation("sdpa")
        return [
            [round(float(a[:, h, n_vis + answer, :n_vis].sum(-1).mean()), 4) for h in range(a.shape[1])] for a in att
        ]

    def residual_at_answer(lm) -> dict:
        """Mean norm of the answer position's hidden state after each layer (the last is after the
        final norm) and how far another random prefix moves it."""
        ids, _ = digit_text_batch("qa", torch.arange(10))
        emb = lm.get_input_embeddings()(ids)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            a, b = (
                lm(
                    inputs_embeds=torch.cat([torch.randn(10, n_vis, emb.shape[-1], generator=g) * 0.15, emb], 1),
                    output_hidden_states=True,
                ).hidden_states[1:]
                for _ in range(2)
            )
        return {
            "norm": [round(float(h[:, n_vis + answer].norm(dim=-1).mean()), 3) for h in a],
            "moved_by_another_prefix": [
                round(float((x - y)[:, n_vis + answer].norm(dim=-1).mean()), 4) for x, y in zip(a, b)
            ],
        }

    lm0, _ = text_pretrained_lm("qa", 0)
    out["prefix_attention_mass"] = {"init": attention_mass(lm0)}
    out["answer_hidden_state"] = {"init": residual_at_answer(lm0)}
    lm, text_loss = text_pretrained_lm("qa", args.text_steps)
    out["text_pretrain_loss"] = text_loss
    out["prefix_attention_mass"]["text_pretrained"] = attention_mass(lm)
    out["answer_hidden_state"]["text_pretrained"] = residual_at_answer(lm)
    lm.requires_grad_(False)

    images, digits = digits_arrays(32, "train", 0, 0.2)
    val_images, val_digits = digits_arrays(32, "val", 0, 0.2)
    out["grad_norm_step0"] = {}
    for mode in ("prefix", "memvp"):
        vlm = digits_vlm(copy.deepcopy(lm), mode)  # a copy: MemVP's hooks stay on the LM it patches
        vlm.freeze_host()
        ids, labels = digit_text_batch("qa", digits[:32])
        vlm(images[:32], ids, labels=labels)["loss"].backward()
        out["grad_norm_step0"][mode] = float(torch.stack([p.grad.norm() for p in vlm.trainable_parameters()]).norm())

    vlm = digits_vlm(lm, "prefix").eval()
    with torch.no_grad():
        feats, val_feats = vlm.visual(images), vlm.visual(val_images)
    emb = lm.get_input_embeddings()
    lrs = (3e-3, 3e-2, 3e-1)

    def logits_of(prefix: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = digit_text_batch("qa", d)
        logits = lm(inputs_embeds=torch.cat([prefix, emb(ids)], 1)).logits[:, prefix.shape[1] :]
        return logits, F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    out["projector_lr_sweep"], out["oracle_prefix_lr_sweep"] = {}, {}
    for lr in lrs:
        torch.manual_seed(0)
        projector = digits_vlm(lm, "prefix").projector
        opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.steps):
            idx = torch.randint(0, len(digits), (32,), generator=g)
            _, loss = logits_of(projector(feats[idx]), digits[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits, _ = logits_of(projector(val_feats), val_digits)
        acc = float((logits[:, answer].argmax(-1) == DIGIT_TOKEN[val_digits]).float().mean())
        out["projector_lr_sweep"][str(lr)] = {"val_acc": acc, "final_train_loss": float(loss.detach())}

        table = torch.nn.Parameter(torch.randn(10, n_vis, emb.embedding_dim, generator=g) * 0.15)
        opt = torch.optim.AdamW([table], lr=lr, weight_decay=0.0)
        hits = []
        for step in range(args.steps):
            d = torch.randint(0, 10, (32,), generator=g)
            logits, loss = logits_of(table[d], d)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= args.steps - 5:
                hits.append((logits[:, answer].argmax(-1) == DIGIT_TOKEN[d]).float().mean())
        out["oracle_prefix_lr_sweep"][str(lr)] = {
            "acc_last_5_batches": float(torch.stack(hits).mean()),
            "final_train_loss": float(loss.detach()),
        }
    return out


def blip(args: argparse.Namespace) -> dict:
    """BLIP-base-sized captioning decoder (12 layers, width 768; random init), one forward over 32
    text tokens, batch 1: the library's cross-attention to 577 image tokens (384 px, patch 16)
    against the same decoder with no cross-attention and MemVP's memory of the 576 patch tokens
    instead (the swap MemVP's paper proposes for encoder-decoder models; not trained).

    FLOPs (``count_flops``; MemVP's memory set outside the count), and latency interleaved in
    one process (``measure_throughput``: 2 warm-up rounds, ``--repeats`` rotating rounds, median),
    where each MemVP call also runs the projector (``set_memory``), as a new image would."""
    import copy

    from transformers import BlipConfig, BlipForConditionalGeneration

    from vleff.methods.memvp.core import apply_memvp, memvp_module
    from vleff.profile.flops import count_flops
    from vleff.profile.throughput import measure_throughput

    torch.manual_seed(0)
    config = BlipConfig(vision_config={"image_size": 384, "initializer_range": 0.02})
    model = BlipForConditionalGeneration(config).eval()
    cross_decoder = copy.deepcopy(model.text_decoder)  # stays unpatched: the cross-attention baseline
    image = torch.randn(1, 577, 768)
    ids = torch.randint(0, 1000, (1, 32))
    cross = count_flops(lambda: cross_decoder(input_ids=ids, encoder_hidden_states=image))
    plain = count_flops(lambda: cross_decoder(input_ids=ids))
    apply_memvp(model, n_mem=576)
    memory = memvp_module(model)
    memory.set_memory(image[:, 1:])
    memvp = count_flops(lambda: model.text_decoder(input_ids=ids))

    def memvp_forward():
        memory.set_memory(image[:, 1:])
        return model.text_decoder(input_ids=ids)

    with torch.no_grad():
        times = measure_throughput(
            {
                "cross_attention": lambda: cross_decoder(input_ids=ids, encoder_hidden_states=image),
                "memvp_instead": memvp_forward,
            },
            1,
            warmup=2,
            repeats=args.repeats,
            progress=False,
        )
    cross_s, memvp_s = times["cross_attention"].median_s, times["memvp_instead"].median_s
    return {
        "text_tokens": 32,
        "image_tokens": 577,
        "decoder_with_cross_attention_flops": cross,
        "decoder_without_cross_attention_flops": plain,
        "decoder_memvp_instead_flops": memvp,
        "ratio_memvp_over_cross_attention": memvp / cross,
        "repeats": args.repeats,
        "cross_attention_median_s": cross_s,
        "memvp_instead_median_s": memvp_s,
        "latency_ratio_memvp_over_cross_attention": memvp_s / cross_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cost", "accuracy", "prefix-probe", "blip"), default="cost")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--task", choices=("qa", "caption"), default="qa")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--text-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--train-host",
        action="store_true",
        help="accuracy: train the LM and the ViT too (both modes), not only the visual prompt",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"cost": cost, "accuracy": accuracy, "prefix-probe": prefix_probe, "blip": blip}[args.part](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
