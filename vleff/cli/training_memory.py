"""Training memory of an open_clip CLIP with AdamW, GaLore and MeZO (random init, fp32).

>>> from vleff.cli.training_memory import run_training_memory, print_memory_rows
>>> rows = run_training_memory("ViT-B-32", batch_size=32, rank=128)
>>> print_memory_rows(rows)

``vleff-bench memory`` and ``benchmarks/clip_memory.py`` both call this module. Methods:

* ``adamw``  — one backprop step with ``torch.optim.AdamW`` over all parameters;
* ``galore`` — the same step with :class:`vleff.memory.GaLoreAdamW` (rank ``r``, the default
  selection: 2-D weights incl. ``in_proj_weight``; embeddings, norms, biases as plain AdamW);
* ``galore_embed`` — GaLore with the token embedding projected as well (default exclusions
  less ``embed``);
* ``mezo``   — one :class:`vleff.memory.MeZO` step (two forward passes under ``no_grad``);
* ``reversible`` — the AdamW step with both towers as reversible stacks
  (:func:`vleff.apply_reversible` with its defaults: MEFT couplings, λ = β = 1, adapters of
  bottleneck 8, float64 streams): activations constant in depth;
* ``reversible_galore`` — reversible towers with the GaLore step (activation and optimizer
  memory cut together).

Measured per method (all bytes, nothing timed):

* ``optimizer_state_bytes`` — :func:`vleff.profile.optimizer_state_bytes` after the step
  (AdamW: two fp32 moments per parameter, 8 bytes/parameter, plus a 4-byte step counter per
  tensor);
* ``grad_bytes`` — storage of every ``.grad`` after the step (MeZO must have none);
* ``saved_for_backward_bytes`` — :func:`vleff.profile.saved_activation_bytes` of one training
  step's forward (for MeZO: of the whole MeZO step, which runs without autograd);
* ``step_peak_bytes`` — :func:`vleff.profile.peak_memory_bytes` of the first step: peak
  above what was allocated before it (CUDA allocator peak on GPU, growth of peak RSS on CPU);
* ``training_bytes`` — peak memory while training above the process's memory right after
  importing the libraries: weights + batch + optimizer + everything the step allocates.

With ``isolate=True`` (the default) every method runs in a fresh Python process
(``python -m vleff.cli.training_memory --worker ...``), so the peak of one cannot hide in
memory another already reserved; the byte counts that do not depend on the allocator
(optimizer state, ``.grad``, saved for backward) are the same either way.

``model`` is an open_clip model name (``"ViT-B-32"``) or the path of a JSON file holding an
``open_clip.CLIP`` config (``embed_dim``, ``vision_cfg``, ``text_cfg``), e.g. a tiny model for
a quick check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METHODS",
    "build_clip_for_memory",
    "measure_one",
    "memory_table",
    "print_memory_rows",
    "run_training_memory",
]

METHODS = ("adamw", "galore", "galore_embed", "mezo", "reversible", "reversible_galore")
_RESULT_TAG = "VLEFF_TRAINING_MEMORY_RESULT "
MIB = 2**20


def _log(msg: str) -> None:
    print(f"[training_memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _memory_now(device: Any) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return _rss_bytes()


def _is_config_path(model: str) -> bool:
    return model.endswith(".json")


def build_clip_for_memory(model: str) -> tuple[Any, Callable[[Sequence[str]], Any] | None, int]:
    """``(clip, tokenizer or None, vocab size)`` for an open_clip name or a CLIP config JSON.

    A config file gets no tokenizer (its vocabulary may be tiny): the benchmark then feeds
    random token ids, which cost the same memory as real ones.
    """
    import open_clip

    if _is_config_path(model):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ValueError(f"model={model!r}: the open_clip config file does not exist")
        cfg = json.loads(path.read_text())
        clip = open_clip.CLIP(**cfg)
        return clip, None, int(cfg.get("text_cfg", {}).get("vocab_size", 49408))
    if model not in open_clip.list_models():
        raise ValueError(
            f"model={model!r} is not an open_clip model name (open_clip.list_models()) or a .json CLIP config file"
        )
    return open_clip.create_model(model), open_clip.get_tokenizer(model), 49408


def _tokens(clip: Any, tokenizer: Any, vocab: int, batch_size: int, seed: int) -> Any:
    import torch

    if tokenizer is not None:
        return tokenizer([f"a photo of object number {i}" for i in range(batch_size)])
    length = int(clip.context_length)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, vocab - 1, (batch_size, length), generator=gen)
    ids[:, -1] = vocab - 1  # an end-of-text token (the largest id) for open_clip's argmax pooling
    return ids


def measure_one(
    method: str, model: str = "ViT-B-32", batch_size: int = 32, rank: int = 128, device: str = "cpu", seed: int = 0
) -> dict[str, Any]:
    """All measurements for one method in this process (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {', '.join(METHODS)}")
    import torch

    from vleff.memory import GaLoreAdamW, MeZO, galore_param_groups
    from vleff.methods.galore.selection import DEFAULT_EXCLUDE
    from vleff.models.clip_finetuner import contrastive_loss
    from vleff.profile.memory import (
        optimizer_state_bytes,
        peak_memory_bytes,
        saved_activation_bytes,
        tensor_storage_bytes,
    )

    dev = torch.device(device)
    start = _memory_now(dev)  # libraries loaded, nothing of the model yet

    torch.manual_seed(seed)
    _log(f"{method}: building open_clip {model} (random init, fp32) on {dev}")
    clip, tokenizer, vocab = build_clip_for_memory(model)
    clip = clip.to(dev)
    if method.startswith("reversible"):
        from vleff.methods.reversible.core import apply_reversible

        apply_reversible(clip)  # both towers; MEFT's adapters are new parameters, counted below
    n_params = sum(p.numel() for p in clip.parameters())
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(dev)
    tokens = _tokens(clip, tokenizer, vocab, batch_size, seed).to(dev)

    def loss_fn() -> torch.Tensor:
        img = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
        return contrastive_loss(img, txt, clip.logit_scale)

    if method in ("adamw", "reversible"):
        opt: torch.optim.Optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-5, weight_decay=0.1)
    elif method in ("galore", "galore_embed", "reversible_galore"):
        exclude = DEFAULT_EXCLUDE
        if method == "galore_embed":  # the token embedding (25 M of ViT-B-32's 151 M) projected too
            exclude = tuple(pattern for pattern in DEFAULT_EXCLUDE if pattern != r"embed")
        opt = GaLoreAdamW(galore_param_groups(clip, rank=rank, exclude=exclude), lr=1e-5, weight_decay=0.1)
    else:
        opt = MeZO(clip.parameters(), lr=1e-6, eps=1e-3)

    def step() -> float:
        if method == "mezo":
            clip.eval()  # dropout off, as the MeZO callback does
            return float(opt.step(loss_fn))
        clip.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    before_step = _memory_now(dev)
    _log(f"{method}: {n_params / 1e6:.1f} M parameters; first step (batch {batch_size}) under the peak probe")
    losses: list[float] = []
    step_peak = peak_memory_bytes(lambda: losses.append(step()), device=dev)
    grads = [p.grad for p in clip.parameters() if p.grad is not None]
    row: dict[str, Any] = {
        "method": method,
        "model": model,
        "batch_size": batch_size,
        "device": str(dev),
        "parameters": n_params,
        "parameter_tensors": sum(1 for _ in clip.parameters()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in clip.parameters()),
        "loss": losses[0],
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "grad_bytes": tensor_storage_bytes(grads),
        "grad_tensors": len(grads),
        "step_peak_bytes": step_peak,
        "training_bytes": max(0, before_step - start) + step_peak,
        "process_peak_bytes": before_step + step_peak,
    }
    if "galore" in method:
        row["rank"] = rank
        row["projected_parameters"] = sum(p.numel() for gr in opt.param_groups if gr.get("rank") for p in gr["params"])
    _log(f"{method}: saved-for-backward bytes of one step's forward")
    if method == "mezo":
        row["saved_for_backward_bytes"] = saved_activation_bytes(lambda: opt.step(loss_fn))
        row["grad_bytes_after_two_steps"] = tensor_storage_bytes(
            [p.grad for p in clip.parameters() if p.grad is not None]
        )
    else:
        clip.train()
        row["saved_for_backward_bytes"] = saved_activation_bytes(loss_fn)
    _log(f"{method}: done")
    return row


def _run_subprocess(method: str, model: str, batch_size: int, rank: int, device: str, seed: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "vleff.cli.training_memory",
        "--worker",
        method,
        "--model",
        model,
        "--batch-size",
        str(batch_size),
        "--rank",
        str(rank),
        "--device",
        device,
        "--seed",
        str(seed),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = None
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(_RESULT_TAG):
            result = json.loads(line[len(_RESULT_TAG) :])
        else:
            tail = (tail + [line])[-30:]
            if line.startswith("[training_memory"):
                print("  " + line, end="", file=sys.stderr, flush=True)
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"the {method} measurement process failed (exit {proc.returncode}):\n" + "".join(tail))
    return result


def _names(rank: int) -> dict[str, str]:
    return {
        "adamw": "AdamW (backprop)",
        "galore": f"GaLoreAdamW r={rank} (backprop)",
        "galore_embed": f"GaLoreAdamW r={rank}, token embedding projected too",
        "mezo": "MeZO (2 forwards)",
        "reversible": "reversible (MEFT) + AdamW",
        "reversible_galore": f"reversible (MEFT) + GaLoreAdamW r={rank}",
    }


def check_settings(model: Any, batch_size: Any, rank: Any, device: Any, methods: Any, seed: Any = 0) -> tuple[str, ...]:
    """Validate the settings before any measurement runs; returns ``methods`` as a tuple."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r} is not allowed; use an open_clip model name or a .json CLIP config file")
    if _is_config_path(model) and not Path(model).expanduser().is_file():
        raise ValueError(f"model={model!r}: the open_clip config file does not exist")
    for name, value in (("batch_size", batch_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed; use a positive int")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed; use an int >= 0")
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not allowed; use cpu, cuda or cuda:N")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = tuple(methods or ())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods={list(methods)!r} is not allowed; choose one or more of {', '.join(METHODS)}")
    return methods


def run_training_memory(
    model: str = "ViT-B-32",
    batch_size: int = 32,
    rank: int = 128,
    device: str = "cpu",
    methods: Sequence[str] | str = METHODS,
    isolate: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per method (in the order given), each in a fresh process when ``isolate``;
    ratios ``*_vs_adamw`` are against the AdamW row when there is one."""
    methods = check_settings(model, batch_size, rank, device, methods, seed)
    rows = []
    for method in methods:
        if isolate:
            _log(f"measuring {method} in a fresh process")
            rows.append(_run_subprocess(method, model, batch_size, rank, str(device), seed))
        else:
            rows.append(measure_one(method, model, batch_size, rank, str(device), seed))
    base = next((r for r in rows if r["method"] == "adamw"), None)
    for row in rows:
        row["name"] = _names(rank)[row["method"]]
        row["isolated"] = bool(isolate)
        if base is not None:
            for key in ("optimizer_state_bytes", "step_peak_bytes", "training_bytes"):
                row[f"{key}_vs_adamw"] = row[key] / base[key] if base[key] else None
    return rows


def memory_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The rows as the printed table's cells (MiB, ratios against AdamW)."""

    def ratio(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}x"

    return [
        {
            "name": r["name"],
            "opt_state": f"{r['optimizer_state_bytes'] / MIB:,.2f}",
            "opt_ratio": ratio(r.get("optimizer_state_bytes_vs_adamw")),
            "saved": f"{r['saved_for_backward_bytes'] / MIB:,.2f}",
            "grads": f"{r['grad_bytes'] / MIB:,.2f}",
            "step_peak": f"{r['step_peak_bytes'] / MIB:,.0f}",
            "training": f"{r['training_bytes'] / MIB:,.0f}",
            "train_ratio": ratio(r.get("training_bytes_vs_adamw")),
        }
        for r in rows
    ]


def print_memory_rows(rows: Sequence[dict[str, Any]], title: str | None = None, console: Any = None) -> None:
    """Print the rows as a table (rich)."""
    from vleff.profile.report import print_table

    if title is None and rows:
        r = rows[0]
        title = f"CLIP {r['model']} training memory, batch {r['batch_size']}, fp32, {r['device']}"
    print_table(
        memory_table(rows),
        title=title,
        console=console,
        extra_columns={
            "opt_state": "optimizer state MiB",
            "opt_ratio": "vs AdamW",
            "saved": "saved for backward MiB",
            "grads": ".grad MiB",
            "step_peak": "step peak MiB",
            "training": "training memory MiB",
            "train_ratio": "vs AdamW",
        },
    )


def _worker_main(argv: Sequence[str] | None = None) -> int:
    """``python -m vleff.cli.training_memory --worker METHOD ...``: one row as a tagged JSON line."""
    parser = argparse.ArgumentParser(description="one training-memory measurement (used by isolate=True)")
    parser.add_argument("--worker", choices=METHODS, required=True)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    row = measure_one(args.worker, args.model, args.batch_size, args.rank, args.device, args.seed)
    print(_RESULT_TAG + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
