"""LoRAHub on digits: two LoRA modules trained on rotated digits, composed for a few-shot task.

    python benchmarks/lorahub_digits.py [--out docs/data/lorahub_digits.json] [--plot docs/img/lorahub_digits.png]

1. a small timm ViT (16 px digits, patch 4, 64 wide, 4 blocks) trained from scratch on upright digits;
2. two LoRA modules (vleff's LoRA, r=4 on qkv, head frozen) trained on its weights, one on digits
   rotated by 90°, one by 180° (the modules are the adapter state ``lora_state_dict`` saves);
3. for each target task — digits rotated by 90° *or* 180° at random (a task mixing the two), and
   digits rotated by 270° (another rotation) — ``--shots`` examples of its training split are the
   few-shot set; accuracy on its whole validation split of: the base model, each module alone, the
   uniform average (w = 0.5, 0.5) and LoRAHub (NGOpt, budget 40, l1 0.05, seed 0).

One seed, plain PyTorch loops, CPU (1 thread). The plot shows each search's few-shot loss per
evaluation against the base model's.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    x = torch.nn.functional.interpolate(x[:, None], size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def rotate(x: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    return torch.rot90(x, quarter_turns, dims=(2, 3)).contiguous()


def mixed(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image rotated by 90° or 180° at random (a task mixing the two modules' tasks)."""
    pick = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.where(pick[:, None, None, None], rotate(x, 1), rotate(x, 2))


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if len(params) < 50 else 0.05)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict:
    import vleff
    from vleff.methods.lora import lora_state_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lora-epochs", type=int, default=15)
    p.add_argument("--shots", type=int, default=20)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    from timm.models.vision_transformer import VisionTransformer

    (xt, yt), (xv, yv) = digits(args.seed)
    base = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    train(base, xt, yt, args.epochs, 2e-3, args.seed)
    print(f"base upright val {accuracy(base, xv, yv):.2f} %", flush=True)
    modules = []
    for turns in (1, 2):
        lora = copy.deepcopy(base)
        vleff.apply_lora(lora, r=4, train_head=False)
        train(lora, rotate(xt, turns), yt, args.lora_epochs, 5e-3, args.seed + turns)
        print(f"LoRA {90 * turns}° on its own task: {accuracy(lora, rotate(xv, turns), yv):.2f} %", flush=True)
        modules.append(lora_state_dict(lora))
    targets = {
        "90° or 180° at random": (mixed(xt, 1), mixed(xv, 2)),
        "270°": (rotate(xt, 3), rotate(xv, 3)),
    }
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "tasks": {}}
    for task, (train_x, val_x) in targets.items():
        shots = torch.randperm(len(yt), generator=torch.Generator().manual_seed(args.seed + 7))[: args.shots]
        examples = [(train_x[shots], yt[shots])]
        rows = {}
        for label, weights in (
            ("base", (0.0, 0.0)),
            ("LoRA 90° alone", (1.0, 0.0)),
            ("LoRA 180° alone", (0.0, 1.0)),
            ("uniform average", (0.5, 0.5)),
        ):
            model = copy.deepcopy(base)
            vleff.apply_lorahub(model, modules=modules, weights=weights)
            loss = vleff.methods.lorahub.few_shot_loss(model, examples)
            rows[label] = {"weights": weights, "few_shot_loss": loss, "accuracy": accuracy(model, val_x, yv)}
        model = copy.deepcopy(base)
        result = vleff.apply_lorahub(
            model, modules=modules, examples=examples, budget=args.budget, seed=0, progress=True
        )
        rows["LoRAHub"] = {
            "weights": result.weights,
            "few_shot_loss": result.loss,
            "accuracy": accuracy(model, val_x, yv),
            "losses": result.losses,
        }
        results["tasks"][task] = rows
        print(f"\n{task} ({args.shots} shots; validation {len(yv)} images)")
        for label, row in rows.items():
            w = ", ".join(f"{v:+.3f}" for v in row["weights"])
            print(f"| {label} | ({w}) | {row['few_shot_loss']:.3f} | {row['accuracy']:.2f} % |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results["tasks"]), figsize=(10, 3.5))
        for ax, (task, rows) in zip(axes, results["tasks"].items()):
            ax.plot(
                range(1, len(rows["LoRAHub"]["losses"]) + 1),
                rows["LoRAHub"]["losses"],
                ".-",
                label="LoRAHub evaluation",
            )
            for label in ("base", "uniform average"):
                ax.axhline(
                    rows[label]["few_shot_loss"], ls="--", lw=1, label=label, color="gray" if label == "base" else "C2"
                )
            ax.set_title(f"target: {task}")
            ax.set_xlabel("evaluation")
            ax.set_ylabel("few-shot loss")
            ax.legend(fontsize=7)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return results


if __name__ == "__main__":
    main()
