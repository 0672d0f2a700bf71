"""Training-memory of CLIP with AdamW, GaLore and MeZO (open_clip ViT-B-32, random init, fp32).

    python benchmarks/clip_memory.py results/clip_memory.json            # ViT-B-32, batch 32, rank 128
    python benchmarks/clip_memory.py out.json --model RN50 --batch-size 8 --rank 64

Every method runs in its own fresh Python process (so peak memory of one cannot hide in
memory another already reserved), on the same seeded model and batch:

* ``adamw``  — one backprop step with ``torch.optim.AdamW`` over all parameters;
* ``galore`` — the same step with :class:`vleff.memory.GaLoreAdamW` (rank ``r``, the default
  selection: 2-D weights incl. ``in_proj_weight``; embeddings, norms, biases as plain AdamW);
* ``galore_embed`` — GaLore with the token embedding projected as well (default exclusions
  less ``embed``);
* ``mezo``   — one :class:`vleff.memory.MeZO` step (two forward passes under ``no_grad``).

Measured per process (all bytes, nothing timed):

* ``optimizer_state_bytes`` — :func:`vleff.profile.optimizer_state_bytes` after the step;
* ``grad_bytes`` — storage of every ``.grad`` after the step (MeZO must have none);
* ``saved_for_backward_bytes`` — :func:`vleff.profile.saved_activation_bytes` of one training
  step's forward (for MeZO: of the whole MeZO step, which runs without autograd);
* ``step_peak_bytes`` — :func:`vleff.profile.peak_memory_bytes` of the first step: peak
  above what was allocated before it (CUDA allocator peak on GPU, growth of peak RSS on CPU);
* ``training_bytes`` — peak memory while training above the process's memory right after
  importing the libraries: weights + batch + optimizer + everything the step allocates.

The CSV/JSON rows are what ``run_clip_memory`` returns; ratios are against the AdamW row.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("adamw", "galore", "galore_embed", "mezo")
_RESULT_TAG = "CLIP_MEMORY_RESULT "


def _log(msg: str) -> None:
    print(f"[clip_memory {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _memory_now(device: Any) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return _rss_bytes()


def measure_one(method: str, model_name: str, batch_size: int, rank: int, device: str = "cpu",
                seed: int = 0) -> dict[str, Any]:
    """All measurements for one method in this process (call it in a fresh process)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {', '.join(METHODS)}")
    import torch

    import open_clip

    from vleff.memory import GaLoreAdamW, MeZO, galore_param_groups
    from vleff.memory.selection import DEFAULT_EXCLUDE
    from vleff.models.clip_finetuner import contrastive_loss
    from vleff.profile import optimizer_state_bytes, peak_memory_bytes, saved_activation_bytes, tensor_storage_bytes

    dev = torch.device(device)
    start = _memory_now(dev)  # libraries loaded, nothing of the model yet

    torch.manual_seed(seed)
    _log(f"{method}: building open_clip {model_name} (random init, fp32) on {dev}")
    model = open_clip.create_model(model_name).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(dev)
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer([f"a photo of object number {i}" for i in range(batch_size)]).to(dev)

    def loss_fn() -> torch.Tensor:
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        return contrastive_loss(img, txt, model.logit_scale)

    if method == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    elif method in ("galore", "galore_embed"):
        exclude = DEFAULT_EXCLUDE
        if method == "galore_embed":  # the token embedding (25 M of ViT-B-32's 151 M) projected too
            exclude = tuple(pattern for pattern in DEFAULT_EXCLUDE if pattern != r"embed")
        opt = GaLoreAdamW(galore_param_groups(model, rank=rank, exclude=exclude), lr=1e-5, weight_decay=0.1)
    else:
        opt = MeZO(model.parameters(), lr=1e-6, eps=1e-3)

    def step() -> float:
        if method == "mezo":
            model.eval()  # dropout off, as the MeZO callback does
            return float(opt.step(loss_fn))
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss)

    before_step = _memory_now(dev)
    _log(f"{method}: {n_params / 1e6:.1f} M parameters; first step (batch {batch_size}) under the peak probe")
    losses: list[float] = []
    step_peak = peak_memory_bytes(lambda: losses.append(step()), device=dev)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    row: dict[str, Any] = {
        "method": method, "model": model_name, "batch_size": batch_size, "device": str(dev),
        "parameters": n_params,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "loss": losses[0],
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "grad_bytes": tensor_storage_bytes(grads),
        "grad_tensors": len(grads),
        "step_peak_bytes": step_peak,
        "training_bytes": before_step - start + step_peak,
        "process_peak_bytes": before_step + step_peak,
    }
    if method.startswith("galore"):
        row["rank"] = rank
        row["projected_parameters"] = sum(p.numel() for gr in opt.param_groups if gr.get("rank") for p in gr["params"])
    _log(f"{method}: saved-for-backward bytes of one step's forward")
    if method == "mezo":
        row["saved_for_backward_bytes"] = saved_activation_bytes(lambda: opt.step(loss_fn))
        row["grad_bytes_after_two_steps"] = tensor_storage_bytes([p.grad for p in model.parameters()
                                                                  if p.grad is not None])
    else:
        model.train()
        row["saved_for_backward_bytes"] = saved_activation_bytes(loss_fn)
    _log(f"{method}: done")
    return row


def _run_subprocess(method: str, model_name: str, batch_size: int, rank: int, device: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--model", model_name,
           "--batch-size", str(batch_size), "--rank", str(rank), "--device", device]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(_RESULT_TAG):
            result = json.loads(line[len(_RESULT_TAG):])
        else:
            tail = (tail + [line])[-30:]
            if line.startswith("[clip_memory"):
                print("  " + line, end="", flush=True)
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"the {method} measurement process failed (exit {proc.returncode}):\n" + "".join(tail))
    return result


def run_clip_memory(model_name: str = "ViT-B-32", batch_size: int = 32, rank: int = 128,
                    device: str = "cpu", methods: tuple[str, ...] = METHODS) -> list[dict[str, Any]]:
    """One row per method (AdamW first), each measured in a separate process; see the module docstring."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed; use a positive int")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is not allowed; use a positive int")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods={tuple(methods)!r} is not allowed; choose from {', '.join(METHODS)}")
    rows = []
    for method in methods:
        _log(f"measuring {method} in a fresh process")
        rows.append(_run_subprocess(method, model_name, batch_size, rank, device))
    base = next((r for r in rows if r["method"] == "adamw"), None)
    for row in rows:
        row["name"] = {"adamw": "AdamW (backprop)", "galore": f"GaLoreAdamW r={rank} (backprop)",
                       "galore_embed": f"GaLoreAdamW r={rank}, token embedding projected too",
                       "mezo": "MeZO (2 forwards)"}[row["method"]]
        if base is not None:
            for key in ("optimizer_state_bytes", "step_peak_bytes", "training_bytes"):
                row[f"{key}_vs_adamw"] = row[key] / base[key] if base[key] else None
    return rows


def print_rows(rows: list[dict[str, Any]], title: str) -> None:
    from vleff.profile import print_table

    mib = 2 ** 20
    table = [{"name": r["name"],
              "opt_state": f"{r['optimizer_state_bytes'] / mib:,.1f}",
              "opt_ratio": f"{r.get('optimizer_state_bytes_vs_adamw') or 0:.3f}x",
              "saved": f"{r['saved_for_backward_bytes'] / mib:,.1f}",
              "grads": f"{r['grad_bytes'] / mib:,.1f}",
              "step_peak": f"{r['step_peak_bytes'] / mib:,.0f}",
              "training": f"{r['training_bytes'] / mib:,.0f}",
              "train_ratio": f"{r.get('training_bytes_vs_adamw') or 0:.3f}x"} for r in rows]
    print_table(table, title=title, extra_columns={
        "opt_state": "optimizer state MiB", "opt_ratio": "vs AdamW", "saved": "saved for backward MiB",
        "grads": ".grad MiB", "step_peak": "step peak MiB", "training": "training memory MiB",
        "train_ratio": "vs AdamW"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", help="JSON file to write the rows to")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (random init)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = measure_one(args.worker, args.model, args.batch_size, args.rank, args.device)
        print(_RESULT_TAG + json.dumps(row), flush=True)
        return 0
    if not args.output:
        parser.error("give the JSON output path, e.g. results/clip_memory.json")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    rows = run_clip_memory(args.model, args.batch_size, args.rank, args.device, methods)
    print_rows(rows, f"CLIP {args.model} training memory, batch {args.batch_size}, fp32, {args.device}")
    from vleff.profile import rows_to_json

    path = rows_to_json(rows, args.output, benchmark="clip_memory", model=args.model, batch_size=args.batch_size,
                        rank=args.rank, device=args.device, command=" ".join(["python", *sys.argv]))
    _log(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
