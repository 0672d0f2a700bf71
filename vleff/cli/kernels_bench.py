"""Reference vs Triton timings of vleff's kernels (``vleff-bench mode=kernels``).

Cases (each timed for every requested backend, interleaved, median of ``repeats``; see
:func:`vleff.profile.throughput.measure_throughput`):

* ``tome_match``: bipartite soft matching of ``[B, N, C]`` keys (plan for ``r`` merges);
* ``tome_merge``: size-weighted merge of ``[B, N, C]`` features with a fixed plan;
* ``tome_match+merge``: both, what one ToMe layer adds to a forward pass;
* ``tome_merge_fwd+bwd``: the merge forward and backward (training);
* ``galore_project`` / ``galore_project_back``: ``[m, n]`` gradient to rank ``r`` and back;
* ``galore_adam_step``: one GaLore-AdamW update (projection, Adam in rank r, back-projection,
  weight update); the Triton side is the fused two-kernel step;
* ``tome_vit_e2e``: images/s of a whole ToMe model (``vleff.apply_tome``, default timm
  ViT-L/16 at 384 px, r = 8, random init) with ``VLEFF_KERNELS`` set to each backend
  (default on CUDA only).

Each row also says how far the Triton result is from the reference (``max_abs_diff``; for
matching, the fraction of identical source choices), so a GPU run doubles as a check, and which
backend ``auto`` (no ``backend=``, ``VLEFF_KERNELS`` unset) picks for that case's tensors and why
(``auto_backend``, ``auto_reason``; the table's ``auto`` column): what a user's model runs.

Defaults depend on the device. CUDA: ViT-L/16 at 384 px (577 tokens incl. cls), batch 256,
C = 1024, bf16, r = 8; GaLore 4096 x 4096 at rank 256 (bf16 gradient, fp32 projector and
moments). CPU: small shapes and the reference only (a CPU has no Triton backend); with
``interpret=true`` under ``TRITON_INTERPRET=1`` the Triton interpreter runs too, on tiny
shapes: a smoke test, its timings mean nothing.

Usage::

    python -m vleff.cli.kernels_bench                       # defaults for this machine
    python -m vleff.cli.kernels_bench tome_batch=64 out=kernels.json
    TRITON_INTERPRET=1 python -m vleff.cli.kernels_bench interpret=true
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from vleff.kernels.dispatch import auto_backend
from vleff.profile.throughput import measure_throughput

__all__ = ["KernelBenchConfig", "run_kernel_bench"]

_KERNEL_CASES = (
    "tome_match",
    "tome_merge",
    "tome_match+merge",
    "tome_merge_fwd+bwd",
    "galore_project",
    "galore_project_back",
    "galore_adam_step",
)
_CASES = (*_KERNEL_CASES, "tome_vit_e2e")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class KernelBenchConfig:
    """Settings of :func:`run_kernel_bench`; ``None`` means "the default for the device"."""

    device: str = "auto"
    dtype: str | None = None  # ToMe tensors and GaLore gradients
    tome_batch: int | None = None
    tome_tokens: int | None = None
    tome_channels: int | None = None
    tome_r: int = 8
    num_protected: int = 1
    lowrank_m: int | None = None
    lowrank_n: int | None = None
    lowrank_rank: int | None = None
    vit_model: str = "vit_large_patch16_384"
    vit_kwargs: dict | None = None  # extra timm.create_model kwargs (img_size, depth, ...)
    vit_batch: int | None = None
    vit_r: int = 8
    cases: tuple[str, ...] | None = None  # default: all (CUDA), kernel cases (CPU)
    backends: tuple[str, ...] | None = None
    interpret: bool = False  # CPU: also run the Triton interpreter (tiny shapes)
    warmup: int = 3
    repeats: int = 10
    inner: int | None = None  # op calls per timed call (amortises launch/sync cost)
    out: str | None = None  # write the rows as JSON here
    progress: bool = False

    def resolved(self) -> KernelBenchConfig:
        """Fill the device-dependent defaults and validate."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available")
        gpu = device.startswith("cuda")
        tiny = not gpu and self.interpret
        pick = lambda value, gpu_v, cpu_v, tiny_v: (
            value
            if value is not None
            # noqa: E731
            else (gpu_v if gpu else tiny_v if tiny else cpu_v)
        )
        cfg = KernelBenchConfig(**asdict(self))
        cfg.device = device
        cfg.dtype = pick(self.dtype, "bfloat16", "float32", "float32")
        cfg.tome_batch = pick(self.tome_batch, 256, 16, 2)
        cfg.tome_tokens = pick(self.tome_tokens, 577, 197, 33)
        cfg.tome_channels = pick(self.tome_channels, 1024, 384, 32)
        cfg.lowrank_m = pick(self.lowrank_m, 4096, 1024, 64)
        cfg.lowrank_n = pick(self.lowrank_n, 4096, 1024, 48)
        cfg.lowrank_rank = pick(self.lowrank_rank, 256, 64, 8)
        cfg.inner = pick(self.inner, 10, 1, 1)
        cfg.backends = (
            tuple(self.backends)
            if self.backends is not None
            else (("torch", "triton") if gpu or self.interpret else ("torch",))
        )
        cfg.vit_batch = pick(self.vit_batch, 256, 8, 2)
        cfg.cases = tuple(self.cases) if self.cases is not None else (_CASES if gpu else _KERNEL_CASES)
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"dtype={cfg.dtype!r} is not allowed; use one of {', '.join(_DTYPES)}")
        unknown = [c for c in cfg.cases if c not in _CASES]
        if unknown:
            raise ValueError(f"cases={unknown} are not benchmark cases; allowed: {', '.join(_CASES)}")
        bad = [b for b in cfg.backends if b not in ("torch", "triton")]
        if bad:
            raise ValueError(f"backends={bad} are not allowed; use 'torch' and/or 'triton'")
        if "triton" in cfg.backends and not gpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend 'triton' on CPU needs the interpreter: run with TRITON_INTERPRET=1 "
                "(set before Triton is imported) and interpret=true"
            )
        if cfg.lowrank_rank > min(cfg.lowrank_m, cfg.lowrank_n):
            raise ValueError(f"lowrank_rank={cfg.lowrank_rank} exceeds min(lowrank_m, lowrank_n)")
        return cfg


def _config_from(cfg: Any) -> KernelBenchConfig:
    """Accept a KernelBenchConfig, a mapping (a Hydra DictConfig too) or None.

    A mapping may hold the settings at the top level or under a ``kernels`` key; keys that
    are not settings (``mode``, ``model``, ... of the surrounding ``vleff-bench`` config)
    are ignored.
    """
    if cfg is None:
        return KernelBenchConfig()
    if isinstance(cfg, KernelBenchConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # pragma: no cover - defensive
            raise TypeError(f"cfg must be a mapping or KernelBenchConfig, got {type(cfg).__name__}") from exc
    cfg = dict(cfg)
    if isinstance(cfg.get("kernels"), Mapping):
        cfg = {**cfg, **dict(cfg["kernels"])}
    names = {f.name for f in fields(KernelBenchConfig)}
    values = {k: v for k, v in cfg.items() if k in names}
    for key in ("cases", "backends"):
        if isinstance(values.get(key), str):
            values[key] = tuple(s for s in values[key].split(",") if s)
        elif values.get(key) is not None:
            values[key] = tuple(values[key])
    return KernelBenchConfig(**values)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _tome_cases(cfg: KernelBenchConfig, dtype: torch.dtype) -> dict[str, tuple[dict[str, Callable[[], Any]], Any]]:
    """{case: ({backend: fn}, check)} for the ToMe kernels; check(backend outputs) -> extra columns."""
    from vleff.kernels.tome import bipartite_soft_matching, max_merge, merge_weighted

    b, n, c, p = cfg.tome_batch, cfg.tome_tokens, cfg.tome_channels, cfg.num_protected
    r = min(cfg.tome_r, max_merge(n, p))
    gen = torch.Generator(device=cfg.device).manual_seed(0)
    metric = torch.randn(b, n, c, device=cfg.device, dtype=dtype, generator=gen)
    x = torch.randn(b, n, c, device=cfg.device, dtype=dtype, generator=gen)
    size = torch.ones(b, n, 1, device=cfg.device)
    plan = bipartite_soft_matching(metric, r, p, backend="torch")
    grad = torch.randn(b, n - r, c, device=cfg.device, dtype=dtype, generator=gen)
    x_req = x.clone().requires_grad_()
    shape = f"{b}x{n}x{c} r={r}"
    auto = auto_backend(metric)

    def match(backend):
        return lambda: bipartite_soft_matching(metric, r, p, backend=backend)

    def merge(backend):
        return lambda: merge_weighted(x, size, plan, backend=backend)[0]

    def both(backend):
        def fn():
            pl = bipartite_soft_matching(metric, r, p, backend=backend)
            return merge_weighted(x, size, pl, backend=backend)[0]

        return fn

    def train(backend):
        def fn():
            out = merge_weighted(x_req, size, plan, backend=backend)[0]
            return torch.autograd.grad(out, x_req, grad)[0]

        return fn

    def check_match(outs):
        ref = outs["torch"].src_idx.sort(-1).values
        agree = {k: float((v.src_idx.sort(-1).values == ref).float().mean()) for k, v in outs.items()}
        return {k: {"same_sources": agree[k]} for k in outs}

    def check_tensor(outs):
        return {k: {"max_abs_diff": _max_diff(v, outs["torch"])} for k, v in outs.items()}

    return {
        "tome_match": ({k: match(k) for k in cfg.backends}, check_match, shape, auto),
        "tome_merge": ({k: merge(k) for k in cfg.backends}, check_tensor, shape, auto),
        "tome_match+merge": ({k: both(k) for k in cfg.backends}, check_tensor, shape, auto),
        "tome_merge_fwd+bwd": ({k: train(k) for k in cfg.backends}, check_tensor, shape, auto),
    }


def _lowrank_cases(cfg: KernelBenchConfig, dtype: torch.dtype) -> dict[str, tuple]:
    from vleff.kernels.galore_step import galore_adam_step
    from vleff.kernels.lowrank import project, project_back

    m, n, rank = cfg.lowrank_m, cfg.lowrank_n, cfg.lowrank_rank
    side = "right" if m >= n else "left"
    gen = torch.Generator(device=cfg.device).manual_seed(1)
    grad = torch.randn(m, n, device=cfg.device, dtype=dtype, generator=gen)
    basis = torch.linalg.qr(torch.randn(max(m, n), rank, device=cfg.device, generator=gen))[0]
    proj = basis[:n].T.contiguous() if side == "right" else basis[:m].contiguous()  # fp32, like GaLore's SVD
    low = project(grad.float(), proj, side, backend="torch")
    low_shape = tuple(low.shape)
    shape = f"{m}x{n} rank {rank} {side}"
    auto = auto_backend(grad)
    weights = {k: torch.randn(m, n, device=cfg.device, generator=gen) for k in cfg.backends}
    moments = {
        k: (torch.zeros(low_shape, device=cfg.device), torch.zeros(low_shape, device=cfg.device)) for k in cfg.backends
    }
    steps = {k: 0 for k in cfg.backends}

    def proj_fn(backend):
        # the reference needs one dtype: a user casts the gradient to the projector's (fp32)
        if backend == "torch":
            return lambda: project(grad.float(), proj, side, backend="torch")
        return lambda: project(grad, proj, side, backend="triton")

    def back_fn(backend):
        return lambda: project_back(low, proj, side, backend=backend)

    def step_fn(backend):
        def fn():
            steps[backend] += 1
            w = weights[backend]
            galore_adam_step(
                w,
                grad,
                proj,
                *moments[backend],
                side=side,
                step=steps[backend],
                lr=1e-5,
                betas=(0.9, 0.999),
                eps=1e-8,
                weight_decay=0.01,
                scale=0.25,
                backend=backend,
            )
            return moments[backend][0]

        return fn

    def check_tensor(outs):
        return {k: {"max_abs_diff": _max_diff(v, outs["torch"])} for k, v in outs.items()}

    def check_step(outs):  # each backend has taken its own number of steps: compare one fresh step
        fresh = {}
        for k in outs:
            w = torch.zeros(m, n, device=cfg.device)
            mom = (torch.zeros(low_shape, device=cfg.device), torch.zeros(low_shape, device=cfg.device))
            galore_adam_step(
                w,
                grad,
                proj,
                *mom,
                side=side,
                step=1,
                lr=1e-3,
                betas=(0.9, 0.999),
                eps=1e-8,
                weight_decay=0.0,
                scale=0.25,
                backend=k,
            )
            fresh[k] = w
        return {k: {"max_abs_diff": _max_diff(v, fresh["torch"])} for k, v in fresh.items()}

    return {
        "galore_project": ({k: proj_fn(k) for k in cfg.backends}, check_tensor, shape, auto),
        "galore_project_back": (
            {k: back_fn(k) for k in cfg.backends},
            check_tensor,
            shape,
            auto_backend(low, kernel="galore_project_back"),
        ),
        "galore_adam_step": ({k: step_fn(k) for k in cfg.backends}, check_step, shape, auto),
    }


def _vit_case(cfg: KernelBenchConfig, dtype: torch.dtype) -> dict[str, tuple]:
    """Whole-model ToMe inference with the kernel backend switched through ``VLEFF_KERNELS``."""
    import timm

    from vleff.kernels.dispatch import ENV_VAR
    from vleff.methods.tome.core import apply_tome

    model = timm.create_model(cfg.vit_model, pretrained=False, **(cfg.vit_kwargs or {}))
    model = apply_tome(model.to(cfg.device, dtype).eval(), r=cfg.vit_r)
    size = (
        model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
        if not cfg.vit_kwargs or "img_size" not in cfg.vit_kwargs
        else (cfg.vit_kwargs["img_size"],) * 2
    )
    gen = torch.Generator(device=cfg.device).manual_seed(2)
    images = torch.randn(cfg.vit_batch, 3, *size, device=cfg.device, dtype=dtype, generator=gen)
    shape = f"{cfg.vit_model} {cfg.vit_batch}x3x{size[0]}x{size[1]} r={cfg.vit_r}"

    def forward(backend):
        def fn():
            before = os.environ.get(ENV_VAR)
            os.environ[ENV_VAR] = backend
            try:
                with torch.inference_mode():
                    return model(images)
            finally:
                if before is None:
                    os.environ.pop(ENV_VAR, None)
                else:
                    os.environ[ENV_VAR] = before

        return fn

    def check(outs):
        return {k: {"max_abs_diff": _max_diff(v, outs["torch"])} for k, v in outs.items()}

    # what the model runs with VLEFF_KERNELS unset: the auto rule on its (first) kernel inputs
    auto = auto_backend(images)
    return {"tome_vit_e2e": ({k: forward(k) for k in cfg.backends}, check, shape, auto)}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''})"


def run_kernel_bench(cfg: Any = None) -> list[dict[str, Any]]:
    """Time the reference and Triton kernels; print a table and return one row per case and backend.

    Args:
        cfg: a :class:`KernelBenchConfig`, a mapping of its fields (e.g. the ``vleff-bench``
            Hydra config, settings at top level or under ``kernels``) or ``None`` for defaults.
    """
    cfg = _config_from(cfg).resolved()
    dtype = _DTYPES[cfg.dtype]
    device_name = _device_name(cfg.device)
    cases: dict[str, tuple] = {}
    if any(c.startswith("tome") for c in cfg.cases):
        cases.update(_tome_cases(cfg, dtype))
    if any(c.startswith("galore") for c in cfg.cases):
        cases.update(_lowrank_cases(cfg, dtype))

    if "tome_vit_e2e" in cfg.cases:
        cases.update(_vit_case(cfg, dtype))

    rows: list[dict[str, Any]] = []
    for case in cfg.cases:
        fns, check, shape, (auto, auto_reason) = cases[case]
        outs = {k: fn() for k, fn in fns.items()}  # also compiles/autotunes the Triton kernels
        extra = check(outs)
        inner = 1 if case == "tome_vit_e2e" else cfg.inner

        def repeat(fn, times=inner):
            def call():
                for _ in range(times):
                    fn()

            return call

        timed = measure_throughput(
            {k: repeat(fn) for k, fn in fns.items()},
            items_per_call=inner,
            warmup=cfg.warmup,
            repeats=cfg.repeats,
            progress=cfg.progress,
        )
        for backend, res in timed.items():
            rows.append(
                {
                    "case": case,
                    "backend": backend,
                    "shape": shape,
                    "dtype": cfg.dtype,
                    "ms": 1e3 * res.median_s / inner,
                    "speedup": res.speedup,
                    **extra[backend],
                    **({"img_per_s": cfg.vit_batch / res.median_s} if case == "tome_vit_e2e" else {}),
                    "auto_backend": auto,
                    "auto_reason": auto_reason,
                    "device": device_name,
                    "interpreted": cfg.device == "cpu" and backend == "triton",
                }
            )
    _print(rows)
    if cfg.out:
        path = Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        for row in rows:
            print(row)
        return
    table = Table(title=f"vleff kernels ({rows[0]['device'] if rows else ''})")
    images = any("img_per_s" in row for row in rows)
    for col in (
        "case",
        "backend",
        "auto",
        "shape",
        "dtype",
        "ms",
        "speedup",
        "max_abs_diff / same_sources",
        *(("img/s",) if images else ()),
    ):
        table.add_column(col, justify="left" if col in ("case", "backend", "auto", "shape") else "right")
    for row in rows:
        check = row.get("max_abs_diff", row.get("same_sources"))
        table.add_row(
            row["case"],
            row["backend"] + (" (interp.)" if row["interpreted"] else ""),
            row.get("auto_backend", ""),
            row["shape"],
            row["dtype"],
            f"{row['ms']:.3f}",
            f"{row['speedup']:.2f}x",
            "" if check is None else f"{check:.3g}",
            *((f"{row['img_per_s']:.1f}" if "img_per_s" in row else "",) if images else ()),
        )
    Console(width=max(Console().width, 120)).print(table)


def _parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (Hydra-style); values parsed as JSON where possible."""
    values: dict[str, Any] = {}
    names = {f.name for f in fields(KernelBenchConfig)}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"argument {arg!r} is not key=value; keys: {', '.join(sorted(names))}")
        key, raw = arg.split("=", 1)
        if key not in names:
            raise SystemExit(f"unknown setting {key!r}; keys: {', '.join(sorted(names))}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def main(argv: list[str] | None = None) -> None:
    run_kernel_bench(_parse_overrides(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
