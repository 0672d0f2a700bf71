"""Training memory of tuning beside a frozen backbone vs full fine-tuning, linear probing and LoRA.

One table per model: timm ViT-B/16 at 224 px and the open_clip ViT-B-32 image tower (with a
10-class linear head), random init (no download), fp32, AdamW, one training step of a
cross-entropy loss. Methods: full fine-tuning, linear probe (head only), LoRA r=8 (``peft``, on
the attention input projections), LST r=8, UniPT (factor 2), VQT T=1. ``--models clip_both``:
the whole open_clip ViT-B-32 CLIP, both towers, one step of the symmetric contrastive loss on
image–caption pairs (see :func:`prepare` for what trains; VQT tunes the image tower only).

Per method, each in a fresh process (so one's peak cannot hide in memory another reserved):

* saved for backward: :func:`vleff.profile.saved_activation_bytes` semantics (each storage once,
  parameters excluded), counted during the first step's forward;
* ``.grad`` bytes and optimizer-state bytes after the step (:mod:`vleff.profile.memory`);
* process peak: resident memory before the step + the step's peak growth
  (:func:`vleff.profile.peak_memory_bytes`; CPU: ``VmHWM``), the quantity the LST target is about;
* step peak: the step's peak growth alone (weights, batch and the libraries already resident);
* tensor peak: parameter bytes + input bytes + step peak — the tensors' own peak, without the
  interpreter and the loaded libraries: the CPU counterpart of ``torch.cuda.max_memory_allocated``
  over the first step (weights, batch, activations, ``.grad``, optimizer state, temporaries);
* trainable parameters, % of all; step time of the second step (ratio to full fine-tuning).

    python benchmarks/side_memory.py [--batch 32] [--models vit_b16,clip_b32|clip_both] [--methods full,linear,...]
                                     [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

MODELS = ("vit_b16", "clip_b32")
#: ``--models clip_both``: the whole open_clip ViT-B-32 CLIP, both towers, symmetric contrastive loss
CLIP_BOTH = "clip_both"
TAG = "SIDE_MEMORY_RESULT "
MIB = 2**20


def build(model: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model == CLIP_BOTH:
        from vleff.cli.training_memory import build_clip_for_memory

        clip, _, _ = build_clip_for_memory("ViT-B-32")
        return clip, None, 224
    if model == "vit_b16":
        import timm

        net = timm.create_model("vit_base_patch16_224", num_classes=10)
        return net, net.head, 224
    import open_clip

    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual

    class ImageClassifier(nn.Module):
        """The open_clip image tower with a linear 10-class head on its 512-d embedding."""

        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            self.head = nn.Linear(512, 10)

        def forward(self, x):
            return self.head(self.visual(x))

    net = ImageClassifier()
    return net, net.head, 224


def tuning_methods() -> tuple[str, ...]:
    """``full``, ``linear`` and every registered tuning method (kind ``"side"``: side networks and
    the peft family): a method that lands appears here with no edit."""
    from vleff.registry import available_methods, get_method

    # methods with towers (a host method such as MemVP acts on a language model, not on these)
    return ("full", "linear", *(n for n in available_methods("side") if get_method(n).towers))


#: settings of the table (the registry's ``bench_settings`` otherwise): LoRA-family rank 8
SIDE_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16},
    "lst": {"reduction": 8},
    "unipt": {"factor": 2},
    "vqt": {"num_queries": 1},
}


def prepare(method: str, net, head) -> None:
    """Apply the method through the registry; its ``apply`` leaves exactly what it trains with
    ``requires_grad`` (every tuning method freezes the backbone on apply, as its callback does).
    ``head=None``: the whole CLIP (both towers), where "linear probe" trains the two output
    projections (``visual.proj``, ``text_projection``) and the methods train their own modules
    only (a method on one tower leaves the other frozen); otherwise the task head trains in
    every method, as the callbacks' ``train_head`` does."""
    from vleff.registry import get_method

    if method == "full":
        return
    if method == "linear":
        keep = (
            {id(p) for p in head.parameters()} if head is not None else {id(net.visual.proj), id(net.text_projection)}
        )
        for p in net.parameters():
            p.requires_grad_(id(p) in keep)
        return
    entry = get_method(method)
    settings = {**entry.bench_settings, **SIDE_SETTINGS.get(method, {})}
    entry.apply(net, entry.config.build(**settings))
    if head is not None:
        for p in head.parameters():
            p.requires_grad_(True)


def represented_parameters(net) -> int:
    """The parameters ``net`` computes with: its ``nn.Parameter`` s plus the weights of linear layers
    that hold theirs in another form (QLoRA's 4-bit NF4 base stores codes in buffers), so a
    trainable share is of the whole model, not of what is left in full precision."""
    total = sum(p.numel() for p in net.parameters())
    for module in net.modules():
        held = module.__dict__.get("_parameters", {}).get("weight")
        leaf = next(module.children(), None) is None  # not a wrapper (peft's LoRA layer holds its base)
        linear_shaped = isinstance(getattr(module, "in_features", None), int) and hasattr(module, "out_features")
        if held is None and leaf and linear_shaped:
            total += module.in_features * module.out_features  # a quantised base: its weight is not a Parameter
    return total


def measure_step(net, method: str, x, y, loss_fn: Any = None) -> dict[str, Any]:
    """One AdamW training step of ``net`` (already prepared for ``method``) on ``(x, y)``, twice:
    the first counted (saved for backward, ``.grad``, optimizer state, the step's peak growth), the
    second timed. ``loss_fn()`` replaces the cross-entropy of ``net(x)`` against ``y`` (CLIP).
    Also used by ``benchmarks/side_digits.py`` on the trained digits modules."""
    import torch
    import torch.nn.functional as F

    from vleff.profile.memory import (
        _is_parameter,
        optimizer_state_bytes,
        peak_memory_bytes,
        plain_tensors,
        tensor_storage_bytes,
    )
    from vleff.side import common

    side = bool(common.side_modules(net))  # a side network: the frozen backbone runs in eval mode
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    seen: dict[int, Any] = {}
    # weights kept as buffers (QLoRA's 4-bit codes and scales) are the model's, not saved activations
    weights = {p.untyped_storage().data_ptr() for b in net.buffers() for p in plain_tensors(b)}

    def pack(t):
        if not _is_parameter(t):
            for p in plain_tensors(t):
                if p.untyped_storage().data_ptr() not in weights:
                    seen.setdefault(p.untyped_storage().data_ptr(), p.untyped_storage())
        return t

    def step(count: bool) -> float:
        net.train()
        if side:
            common.backbone_eval(net)
        elif method == "linear":
            net.eval()
        opt.zero_grad(set_to_none=True)
        if count:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn() if loss_fn else F.cross_entropy(net(x), y)
        else:
            loss = loss_fn() if loss_fn else F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    peak = peak_memory_bytes(lambda: step(True), device=x.device)
    saved = int(sum(s.nbytes() for s in seen.values()))
    seen.clear()
    grads = tensor_storage_bytes([p.grad for p in net.parameters() if p.grad is not None])
    t0 = time.perf_counter()
    step(False)
    seconds = time.perf_counter() - t0
    total = represented_parameters(net)
    trainable = sum(p.numel() for p in params)
    return {
        "method": method,
        "batch": int(len(y)),
        "saved_bytes": saved,
        "grad_bytes": grads,
        "parameter_bytes": tensor_storage_bytes(list(net.parameters())),
        "optimizer_bytes": optimizer_state_bytes(opt),
        "step_peak_bytes": peak,
        "trainable": trainable,
        "parameters": total,
        "trainable_pct": 100.0 * trainable / total,
        "step_seconds": seconds,
    }


def measure(model: str, method: str, batch: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    from vleff.cli.training_memory import _memory_now
    from vleff.profile.memory import tensor_storage_bytes

    dev = torch.device(device)
    net, head, size = build(model)
    prepare(method, net, head)
    net.to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    loss_fn, extra_inputs = None, []
    if model == CLIP_BOTH:
        import torch.nn.functional as F

        from vleff.cli.training_memory import _tokens
        from vleff.models.clip_finetuner import contrastive_loss

        tokens = _tokens(net, open_clip_tokenizer(), 49408, batch, 0).to(dev)
        extra_inputs = [tokens]

        def clip_loss():
            img = F.normalize(net.encode_image(x), dim=-1)
            txt = F.normalize(net.encode_text(tokens), dim=-1)
            return contrastive_loss(img, txt, net.logit_scale)

        loss_fn = clip_loss
    before = _memory_now(dev)
    row = measure_step(net, method, x, y, loss_fn)
    inputs = tensor_storage_bytes([x, *extra_inputs])
    return {
        "model": model,
        "device": str(dev),
        **row,
        "process_peak_bytes": before + row["step_peak_bytes"],
        "tensor_peak_bytes": row["parameter_bytes"] + inputs + row["step_peak_bytes"],
    }


def open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def table(rows: list[dict[str, Any]]) -> str:
    full = {r["model"]: r for r in rows if r["method"] == "full"}
    lines = [
        "| model | method | saved for backward MiB (× full) | .grad MiB | optimizer MiB | process peak MiB "
        "(× full) | step peak MiB (× full) | tensor peak MiB (× full) | trainable % | step time × full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = full.get(r["model"])
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | n/a: {r['error']} | | | | | | | |")
            continue

        def ratio(key: str) -> str:
            return f" ({r[key] / f[key]:.3f}×)" if f and f[key] else ""

        time_ratio = f"{r['step_seconds'] / f['step_seconds']:.2f}" if f else ""
        tensor = f"{r['tensor_peak_bytes'] / MIB:.0f}{ratio('tensor_peak_bytes')}" if "tensor_peak_bytes" in r else ""
        lines.append(
            f"| {r['model']} | {r['method']} | {r['saved_bytes'] / MIB:.1f}{ratio('saved_bytes')} | "
            f"{r['grad_bytes'] / MIB:.1f} | {r['optimizer_bytes'] / MIB:.1f} | "
            f"{r['process_peak_bytes'] / MIB:.0f}{ratio('process_peak_bytes')} | "
            f"{r['step_peak_bytes'] / MIB:.0f}{ratio('step_peak_bytes')} | "
            f"{tensor} | {r['trainable_pct']:.2f} | "
            f"{time_ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=None, help="comma-separated (default: full, linear, every tuning method)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA: process peak = allocated tensors)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"))
    parser.add_argument("--rows", help="print the table of the JSON rows in this file (no measurement)")
    args = parser.parse_args(argv)
    if args.worker:
        model, method = args.worker
        print(TAG + json.dumps(measure(model, method, args.batch, args.device)), flush=True)
        return
    if args.rows:
        with open(args.rows) as f:
            print(table([json.loads(line) for line in f if line.startswith("{")]))
        return
    rows = []
    for model in args.models.split(","):
        for method in args.methods.split(",") if args.methods else tuning_methods():
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                model,
                method,
                "--batch",
                str(args.batch),
                "--device",
                args.device,
            ]
            print(f"[side_memory {time.strftime('%H:%M:%S')}] {model} {method}", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True)
            found = [line[len(TAG) :] for line in out.stdout.splitlines() if line.startswith(TAG)]
            if out.returncode or not found:
                rows.append({"model": model, "method": method, "error": out.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(found[0]))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
