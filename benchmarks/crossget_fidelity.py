"""What CrossGET's options and vleff's deliberate differences change, against the default (the
official code's behaviour), on open_clip ViT-B-16 at random init (no download)::

    python benchmarks/crossget_fidelity.py                 # 4 images, 4 captions, r_image=16, r_text=6
    python benchmarks/crossget_fidelity.py --batch 8 --seed 1

Per variant: the image (or text) embedding's mean ``1 − cos`` and relative L2 distance to the
default's, with the same numbers for the library's model (``r = 0``) as the scale of the whole
reduction; for ``metric="head_mean"`` also the sources shared with the default at the first
merge. Variants: ``metric="head_mean"``, ``ensemble="mean"``, the reference's visible image
cross token (every token may attend to it; vleff hides it), and in training the reference's
loss (``½[KL(m‖p) + KL(m‖q)]``, what its ``F.kl_div`` computes) next to vleff's true JS.
Random weights: the sizes are indicative, not the pretrained model's.

``--text-reference`` measures instead, on the float64 tiny open_clip of
``tests/reference/test_crossget_reference.py`` (its plain-PyTorch reference of the official text tower),
the text causal mask from merged positions against the reference's by-index mask, and vleff's
padding handling against the reference's (padding merged freely)::

    python benchmarks/crossget_fidelity.py --text-reference
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from text_tower_flops import (
    caption_ids,  # same folder: one caption layout for the text benchmarks
)

import vleff
import vleff.methods.crossget.core as cg
from vleff.tokens.aux import pop_aux_losses


def distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    cos = F.cosine_similarity(a, b, dim=-1)
    return float((1 - cos).mean()), float((a - b).norm() / b.norm())


def first_sources(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Sources of the image tower's first merge (a spy on the matching)."""
    seen = []
    real = cg.complete_graph_matching

    def spy(*args, **kwargs):
        plan = real(*args, **kwargs)
        seen.append(plan.src_idx)
        return plan

    cg.complete_graph_matching = spy
    try:
        with torch.no_grad():
            model.encode_image(images)
    finally:
        cg.complete_graph_matching = real
    return seen[0]


def reference_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference's loss: ``F.kl_div(log p, m) = KL(m‖p)``, averaged over the two towers."""
    p, q = a.log_softmax(-1), b.log_softmax(-1)
    m = (p.exp() + q.exp()) / 2
    return 0.5 * ((m * (m.log() - p)).sum(-1) + (m * (m.log() - q)).sum(-1)).mean()


def text_reference() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import tiny_models as tm
    from test_crossget_reference import _ids, _model, _trained_offsets, ref_text

    model = _model(layers=3)
    vleff.apply_crossget(model, r_image=0, r_text=3)
    offsets = _trained_offsets(model)["text"].detach()
    model.eval()
    with torch.no_grad():
        ids = _ids(batch=4)  # 16 real tokens each, no padding
        got = model.encode_text(ids)
        ic, il = distance(got, ref_text(model, ids, 3, offsets, causal="index")[0])
        print(
            f"tiny text tower, r_text=3, no padding: causal mask by merged positions vs by index: "
            f"1-cos {ic:.2e}, rel L2 {il:.2e}"
        )
        ids = tm.token_ids(batch=2, length=16)  # EOT at 4 / 7, padding after
        got = model.encode_text(ids)
        ic, il = distance(got, ref_text(model, ids, 3, offsets, causal="index")[0])
        print(
            f"tiny text tower, r_text=3, padded: vleff vs the reference (by-index mask, padding merged freely): "
            f"1-cos {ic:.2e}, rel L2 {il:.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r-image", type=int, default=16)
    parser.add_argument("--r-text", type=int, default=6)
    parser.add_argument(
        "--text-reference",
        action="store_true",
        help="the text tower's deliberate differences on the tests' tiny float64 reference",
    )
    args = parser.parse_args()
    if args.text_reference:
        text_reference()
        return
    import open_clip

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, 224, 224, generator=g)
    ids = torch.cat([caption_ids(1, words=5 + 3 * i, seed=i) for i in range(args.batch)])
    settings = {"r_image": args.r_image, "r_text": args.r_text}

    def build(**extra):
        model = copy.deepcopy(base)
        vleff.apply_crossget(model, **settings, **extra)
        offsets = cg.crossget_offsets(model)
        with torch.no_grad():  # trained offsets: the cross token is not a copy of cls / the EOT
            for p in offsets.values():
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(args.seed + 1))
        return model.eval()

    default = build()
    with torch.no_grad():
        ref_img, ref_txt = default.encode_image(images), default.encode_text(ids)
        lib_img, lib_txt = base.encode_image(images), base.encode_text(ids)
    rows = [("library (r = 0)", distance(lib_img, ref_img), distance(lib_txt, ref_txt), "")]
    src_default = first_sources(default, images)

    head_mean = build(metric="head_mean")
    src = first_sources(head_mean, images)
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(src, src_default)]
    with torch.no_grad():
        rows.append(
            (
                "metric='head_mean'",
                distance(head_mean.encode_image(images), ref_img),
                distance(head_mean.encode_text(ids), ref_txt),
                f"first-merge sources shared with the default: {shared} of {src.shape[1]}",
            )
        )
    mean = build(ensemble="mean")
    with torch.no_grad():
        rows.append(
            (
                "ensemble='mean'",
                distance(mean.encode_image(images), ref_img),
                distance(mean.encode_text(ids), ref_txt),
                "",
            )
        )

    visible = build()
    real_bias = cg.CrossGETHook.attention_bias

    def no_hide(self, state, dtype):
        bias = real_bias(self, state, dtype)
        if self.modality == "image" and bias is not None:
            bias = bias.clone()
            bias[..., state.scratch[cg.SCRATCH]["index"]] = 0.0  # log size of the cross token (size 1)
        return bias

    cg.CrossGETHook.attention_bias = no_hide
    try:
        with torch.no_grad():
            rows.append(
                (
                    "cross token visible (reference)",
                    distance(visible.encode_image(images), ref_img),
                    (0.0, 0.0),
                    "image tower only; text: the reference's causal mask hides it too",
                )
            )
    finally:
        cg.CrossGETHook.attention_bias = real_bias

    print(
        f"open_clip ViT-B-16, random init, {args.batch} images / captions, r_image={args.r_image}, "
        f"r_text={args.r_text}; distance of each variant's embeddings to the default's"
    )
    print(f"{'variant':34s} {'image 1-cos':>12s} {'image rel L2':>13s} {'text 1-cos':>11s} {'text rel L2':>12s}")
    for name, (ic, il), (tc, tl), note in rows:
        print(f"{name:34s} {ic:12.2e} {il:13.2e} {tc:11.2e} {tl:12.2e}  {note}")

    trained = build()
    trained.train()
    captured = {}
    real_align = cg.alignment_loss

    def spy(image, text):
        captured["pair"] = (image.detach(), text.detach())
        return real_align(image, text)

    cg.alignment_loss = spy
    try:
        trained.encode_image(images)
        trained.encode_text(ids)
    finally:
        cg.alignment_loss = real_align
    js = float(pop_aux_losses(trained)["crossget_js"].detach())
    kl = float(reference_kl(*captured["pair"]))
    print(
        f"alignment loss on the same projected cross tokens: vleff JS {js:.4e}, "
        f"reference ½[KL(m‖p)+KL(m‖q)] {kl:.4e} (ratio {kl / js:.3f})"
    )


if __name__ == "__main__":
    main()
