"""Bytes saved for backward by a timm ViT with token methods, and by CLIP models (open_clip and
Hugging Face, both towers, the pair methods' losses included) with token methods, with and without
the library's gradient checkpointing (issue 30: token methods replay under checkpointing).

ViT-S/16 at 224 px (197 tokens) and CLIP ViT-B/32 (224 px, 77 text tokens), random init, batch 8
(CLIP: 4), fp32, CPU. Saved bytes are counted with
:func:`vleff.profile.saved_activation_bytes` (every tensor autograd saves, parameters excluded;
exact on any machine); under checkpointing vleff also keeps, per block, the token state the block
started from (its replay record): counted separately. Each row also checks that one backward gives
the gradients of the run without checkpointing.

    python benchmarks/checkpoint_tokens_memory.py [--out docs/data/checkpoint_tokens_memory.json]
"""

from __future__ import annotations

import argparse
import copy
import json

import timm
import torch

import vleff
from vleff.backbones import find_towers, get_patch
from vleff.profile import saved_activation_bytes, tensor_storage_bytes

METHODS = {"none": None, "tome r=8": ("tome", {"r": 8}), "evit 0.7": ("evit", {"keep_rate": 0.7})}


def build(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).train()
    spec = METHODS[method]
    if spec is not None:
        getattr(vleff, f"apply_{spec[0]}")(model, **spec[1])
    return model


def replay_record_bytes(model: torch.nn.Module) -> int:
    patches = [get_patch(t.root) for t in find_towers(model)]
    return sum(tensor_storage_bytes([list(r.values()) for r in p._recordings]) for p in patches if p is not None)


def row(method: str, images: torch.Tensor) -> dict[str, object]:
    model = build(method)
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    out: dict[str, object] = {"method": method}
    for name, m in (("plain", plain), ("checkpointing", model)):
        out[f"{name}_saved_bytes"] = saved_activation_bytes(lambda m=m: m(images))
    model(images)
    out["replay_record_bytes"] = replay_record_bytes(model)
    grads = []
    for m in (plain, model):
        m.zero_grad()
        m(images).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    out["max_grad_difference"] = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    out["checkpointing_fraction"] = (out["checkpointing_saved_bytes"] + out["replay_record_bytes"]) / out[
        "plain_saved_bytes"
    ]
    return out


# --- image-text pairs: both towers, the pair methods' losses -----------------------------------------
PAIR_MODELS = ("open_clip ViT-B-32", "HF CLIP ViT-B/32")
PAIR_METHODS = {
    "none": None,
    "tome r=8 (both towers)": ("tome", {"r": 8, "towers": "all"}),
    "crossget r=8/4": ("crossget", {"r_image": 8, "r_text": 4}),
    "madtp 0.5": ("madtp", {"flops_reduction": 0.5}),
}


def build_pair(model_name: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_name.startswith("open_clip"):
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=None)
    else:
        from transformers import CLIPConfig, CLIPModel

        model = CLIPModel(CLIPConfig())
    model.train()
    spec = PAIR_METHODS[method]
    if spec is not None:
        getattr(vleff, f"apply_{spec[0]}")(model, **spec[1])
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def pair_loss(model: torch.nn.Module, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Both towers' embeddings and the methods' aux losses (CrossGET's and MADTP's alignment)."""
    from vleff.tokens.aux import vleff_aux_loss

    if hasattr(model, "encode_image"):
        image, text = model.encode_image(images), model.encode_text(ids)
    else:
        image = model.get_image_features(pixel_values=images).pooler_output
        text = model.get_text_features(input_ids=ids).pooler_output
    return image.square().mean() + text.square().mean() + vleff_aux_loss(model)


def pair_inputs(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=g)
    eot = 49407 if hasattr(model, "encode_text") else int(model.config.text_config.eos_token_id)
    ids = torch.randint(3, 40000 if eot > 40000 else 400, (batch, 77), generator=g)
    ids[:, 20] = eot  # the pooled token
    return images, ids


def pair_row(model_name: str, method: str, batch: int) -> dict[str, object]:
    model = build_pair(model_name, method)
    images, ids = pair_inputs(model, batch)
    plain = copy.deepcopy(model)
    enable_checkpointing(model)
    out: dict[str, object] = {"model": model_name, "method": method}
    for name, m in (("plain", plain), ("checkpointing", model)):
        out[f"{name}_saved_bytes"] = saved_activation_bytes(lambda m=m: pair_loss(m, images, ids))
    pair_loss(model, images, ids)
    out["replay_record_bytes"] = replay_record_bytes(model)
    grads = []
    for m in (plain, model):
        m.zero_grad()
        pair_loss(m, images, ids).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    out["max_grad_difference"] = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    out["checkpointing_fraction"] = (out["checkpointing_saved_bytes"] + out["replay_record_bytes"]) / out[
        "plain_saved_bytes"
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pair-batch-size", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = [row(m, images) for m in METHODS]
    print("| method | saved, plain | saved, checkpointing | replay records | checkpointing / plain | max grad diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['plain_saved_bytes'] / 2**20:.1f} MiB | "
            f"{r['checkpointing_saved_bytes'] / 2**20:.1f} MiB "
            f"| {r['replay_record_bytes'] / 2**10:.1f} KiB | {r['checkpointing_fraction']:.3f} | "
            f"{r['max_grad_difference']:.1e} |"
        )
    pairs = [pair_row(model, m, args.pair_batch_size) for model in PAIR_MODELS for m in PAIR_METHODS]
    print()
    columns = "saved, plain | saved, checkpointing | replay records | checkpointing / plain | max grad diff"
    print(f"| model | method | {columns} |")
    print("|---|---|---|---|---|---|---|")
    for r in pairs:
        print(
            f"| {r['model']} | {r['method']} | {r['plain_saved_bytes'] / 2**20:.1f} MiB | "
            f"{r['checkpointing_saved_bytes'] / 2**20:.1f} MiB "
            f"| {r['replay_record_bytes'] / 2**10:.1f} KiB | {r['checkpointing_fraction']:.3f} | "
            f"{r['max_grad_difference']:.1e} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "model": "vit_small_patch16_224",
                    "batch_size": args.batch_size,
                    "device": "cpu",
                    "rows": rows,
                    "pair_batch_size": args.pair_batch_size,
                    "pair_rows": pairs,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
