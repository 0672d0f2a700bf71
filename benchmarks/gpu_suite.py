"""One prepared GPU run: kernels, token-method throughput (eager and compiled) and training memory.

``bash scripts/gpu.sh`` runs this on one CUDA GPU and writes ``docs/data/gpu/<date>.json`` (every
row, the device, versions, the command and each job's seconds) and ``<date>.md`` (one table per
job). It is built for a short lease on a borrowed machine (an H100/H200 for about ten minutes):

* jobs run in priority order and the JSON and markdown are rewritten after each job, so a run
  stopped at its limit still leaves every finished job's figures;
* a job that fails records its error and the suite goes on; jobs that would start after
  ``--budget-s`` seconds are recorded as skipped, not run;
* ``--device cpu --tiny`` runs every job's plumbing on tiny shapes in about a minute (the test
  suite does, so the GPU run cannot rot between leases); its figures mean nothing.

Jobs (GPU settings; ``--tiny`` shrinks each):

``env``
    device, versions, and the ceilings the other figures are read against: a bf16
    8192x8192x8192 matrix product's TFLOP/s and a device-to-device copy's GB/s.
``kernels_vit_l384`` / ``kernels_vit_b224``
    ``vleff-bench kernels``: each Triton kernel (ToMe matching, merge forward/backward, GaLore
    projection and fused Adam step) against the PyTorch reference, bf16, batch 256, ViT-L/16 at
    384 px (577 tokens, C = 1024, GaLore 4096x4096 rank 256, and whole-model ToMe) and ViT-B/16 at
    224 px (197 tokens, C = 768, GaLore 3072x768 rank 128); difference to the reference and the
    backend ``auto`` picks.
``speed_*``
    ``vleff-bench`` speed mode, bf16 (two ToMe diagnoses first: patched at r = 0, and r = 16 without
    proportional attention, whose log-size bias takes attention off the fused flash kernel): ToMe, EViT and
    DynamicViT on timm ViT-B/16 (batch 256)
    and ViT-L/16 (batch 128); ToMe, CrossGET and MADTP on the image path of the whole open_clip
    ViT-B-16 CLIP (batch 256); eager and ``torch.compile`` (inductor). Each row adds the achieved
    TFLOP/s and its share of the measured matmul ceiling beside the FLOP-limit fraction
    (``speedup x flops_ratio``).
``memory_side_*`` / ``memory_clip``
    CUDA training memory of one step (``torch.cuda.max_memory_allocated``): full fine-tuning,
    linear probe, LoRA, LST, UniPT and VQT on timm ViT-B/16 and the open_clip ViT-B-32 image tower
    (``benchmarks/side_memory.py --device cuda``, batch 64); AdamW, GaLore, MeZO and reversible
    towers on the whole open_clip ViT-B-32 CLIP (``vleff-bench memory``, batch 64). Each method runs
    in a fresh process.

Usage::

    bash scripts/gpu.sh                                    # all jobs, figures in docs/data/gpu/
    python benchmarks/gpu_suite.py --out /tmp/gpu --budget-s 420 --jobs speed_vit_b16,memory_clip
    python benchmarks/gpu_suite.py --device cpu --tiny --out /tmp/dry   # plumbing check
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "data" / "gpu"


@dataclass(frozen=True)
class Job:
    """One measurement: ``run()`` returns its rows; ``columns`` are the markdown table's keys."""

    name: str
    title: str
    run: Callable[[], list[dict[str, Any]]]
    columns: tuple[str, ...]


# --- the jobs ---------------------------------------------------------------------------------
def _env_rows(device: str, tiny: bool) -> list[dict[str, Any]]:
    """Versions and the ceilings: a bf16 matrix product's FLOP/s and a copy's bandwidth."""
    import torch

    row: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "timm", "open_clip", "transformers", "peft"):
        try:
            row[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - a missing library is a fact to record
            row[name] = f"unavailable ({err.__class__.__name__})"
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        row.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
        )
    else:
        row.update(device=f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)")
    n = 512 if tiny else 8192
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    row["matmul_tflops"] = 2 * n**3 / _time(lambda: a @ b, dev, 3 if tiny else 10) / 1e12
    row["matmul_shape"] = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}"
    src = torch.empty(2 ** (22 if tiny else 30), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    row["copy_gb_s"] = 2 * src.numel() / _time(lambda: dst.copy_(src), dev, 3 if tiny else 10) / 1e9
    return [row]


def _time(fn: Callable[[], Any], dev: Any, repeats: int) -> float:
    """Mean seconds of ``fn`` after two warm-up calls (synchronised on CUDA)."""
    import torch

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _kernel_rows(device: str, tiny: bool, settings: dict[str, Any]) -> list[dict[str, Any]]:
    from vleff.cli.kernels_bench import run_kernel_bench

    if tiny:  # the CPU defaults: small shapes, reference backend (no Triton without the interpreter)
        settings = {"repeats": 2, "warmup": 1}
    return run_kernel_bench({"device": device, **settings})


def _speed_rows(
    device: str, tiny: bool, overrides: list[str], matmul_tflops: Callable[[], float | None]
) -> list[dict[str, Any]]:
    """``vleff-bench`` speed mode in this process, plus achieved TFLOP/s and its share of the ceiling."""
    from vleff.cli.bench import run

    base = [f"device={device}", "progress=false"]
    base += (
        ["precision=fp32", "batch_size=2", "repeats=2", "warmup=1"]
        if tiny
        else ["precision=bf16", "repeats=10", "warmup=3"]
    )
    rows = run(["speed", *base, *overrides])
    peak = matmul_tflops()
    for row in rows:
        row.pop("tokens_per_layer", None)
        row["tflops"] = row["gflops_per_sample"] * row["images_per_s"] / 1e3
        row["of_matmul_peak"] = row["tflops"] / peak if peak else None
    return rows


def _side_memory_rows(device: str, tiny: bool, model: str) -> list[dict[str, Any]]:
    """``benchmarks/side_memory.py`` (each method in a fresh process), rows parsed from its output."""
    if tiny:
        methods = "full,lst" if model == "vit_b16" else "lst"
    else:  # every tuning method the library registers (side_memory's default)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from side_memory import tuning_methods

        methods = ",".join(tuning_methods())
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "side_memory.py"),
        "--device",
        device,
        "--batch",
        "1" if tiny else "64",
        "--models",
        model,
        "--methods",
        methods,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode:
        raise RuntimeError(f"side_memory.py exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        row["peak_mib"] = row["process_peak_bytes"] / 2**20
        row["peak_vs_full"] = row["process_peak_bytes"] / full["process_peak_bytes"] if full else None
        row["saved_mib"] = row["saved_bytes"] / 2**20
        row["optimizer_mib"] = row["optimizer_bytes"] / 2**20
    failed = [m for m in methods.split(",") if m not in {r["method"] for r in rows}]
    if failed:
        rows.append({"method": ",".join(failed), "error": out.stderr.strip()[-1000:]})
    return rows


def _clip_memory_rows(device: str, tiny: bool, tiny_config: Path) -> list[dict[str, Any]]:
    from vleff.cli.training_memory import run_training_memory

    if tiny:  # in this process (no interpreter start-ups): the plumbing, not the isolation
        rows = run_training_memory(str(tiny_config), batch_size=2, rank=8, device=device, isolate=False)
    else:
        rows = run_training_memory("ViT-B-32", batch_size=64, rank=128, device=device)
    for row in rows:
        row["training_mib"] = row["training_bytes"] / 2**20
        row["step_peak_mib"] = row["step_peak_bytes"] / 2**20
        row["optimizer_mib"] = row["optimizer_state_bytes"] / 2**20
        row["saved_mib"] = row["saved_for_backward_bytes"] / 2**20
    return rows


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}

SPEED_COLUMNS = (
    "name",
    "batch_size",
    "flops_ratio",
    "images_per_s",
    "speedup",
    "flop_limit_fraction",
    "tflops",
    "of_matmul_peak",
    "compile_s",
    "tokens",
)
KERNEL_COLUMNS = (
    "case",
    "backend",
    "auto_backend",
    "shape",
    "ms",
    "speedup",
    "max_abs_diff",
    "same_sources",
    "img_per_s",
)
SIDE_COLUMNS = (
    "model",
    "method",
    "batch",
    "peak_mib",
    "peak_vs_full",
    "saved_mib",
    "optimizer_mib",
    "trainable_pct",
    "step_seconds",
    "error",
)
CLIP_COLUMNS = (
    "name",
    "batch_size",
    "training_mib",
    "training_bytes_vs_adamw",
    "step_peak_mib",
    "optimizer_mib",
    "optimizer_state_bytes_vs_adamw",
    "saved_mib",
)


def jobs(device: str, tiny: bool, scratch: Path) -> list[Job]:
    """Every job, in the order they run: most wanted and quickest first. On an H200 (2026-12-04) the
    whole-CLIP memory job took 267 s (six fresh processes, float64 reversible streams) and inductor
    compiled the four ViT-B/16 variants in more than 180 s, so both come last."""
    env: dict[str, Any] = {}

    def run_env() -> list[dict[str, Any]]:
        rows = _env_rows(device, tiny)
        env.update(rows[0])
        return rows

    def peak() -> float | None:  # the ceiling, once the env job has run
        return env.get("matmul_tflops")

    compiler = "eager" if tiny else "inductor"  # tiny: the compile plumbing without code generation
    vit_b = ["model=vit_tiny_digits"] if tiny else ["model=vit_base", "batch_size=256"]
    vit_l = ["model=vit_tiny_digits"] if tiny else ["model=vit_large", "batch_size=128", "method_args.tome.r=8"]
    timm_methods = "methods=[tome,evit,dynamicvit]"
    clip = ["model=open_clip_vit_b32"] if tiny else ["model=open_clip_vit_b16", "batch_size=256"]
    clip_methods = "methods=[tome,crossget,madtp]"
    tiny_clip = scratch / "tiny_clip.json"

    def speed(*overrides: str) -> Callable[[], list[dict[str, Any]]]:
        return lambda: _speed_rows(device, tiny, list(overrides), peak)

    vit_b16_kernels = {
        "tome_tokens": 197,
        "tome_channels": 768,
        "lowrank_m": 3072,
        "lowrank_n": 768,
        "lowrank_rank": 128,
        "vit_model": "vit_base_patch16_224",
        "vit_r": 16,
    }

    def clip_memory() -> list[dict[str, Any]]:
        tiny_clip.write_text(json.dumps(TINY_CLIP))
        return _clip_memory_rows(device, tiny, tiny_clip)

    return [
        Job(
            "env",
            "Device, versions and measured ceilings",
            run_env,
            (
                "device",
                "capability",
                "memory_gib",
                "torch",
                "triton",
                "timm",
                "open_clip",
                "matmul_shape",
                "matmul_tflops",
                "copy_gb_s",
            ),
        ),
        Job(
            "kernels_vit_l384",
            "Kernels: Triton vs PyTorch reference, ViT-L/16 384 px shapes, batch 256",
            lambda: _kernel_rows(device, tiny, {}),
            KERNEL_COLUMNS,
        ),
        Job(
            "speed_vit_b16",
            "Token methods, timm ViT-B/16 224 px, batch 256, eager",
            speed(*vit_b, timm_methods),
            SPEED_COLUMNS,
        ),
        Job(
            "speed_vit_b16_tome_diagnosis",
            "ToMe's cost on ViT-B/16, batch 256, eager: patched at r = 0 (the generic block's overhead)",
            speed(*vit_b, "methods={tome: {r: 0}}"),
            SPEED_COLUMNS,
        ),
        Job(
            "speed_vit_b16_tome_noprop",
            "ToMe r = 16 without proportional attention (fused attention kept)",
            speed(*vit_b, "methods={tome: {prop_attn: false}}"),
            SPEED_COLUMNS,
        ),
        Job(
            "speed_clip_b16",
            "Token methods, image path of the whole open_clip ViT-B-16, batch 256, eager",
            speed(*clip, clip_methods),
            SPEED_COLUMNS,
        ),
        Job(
            "speed_vit_l16",
            "Token methods, timm ViT-L/16 224 px, batch 128, eager (ToMe r=8)",
            speed(*vit_l, timm_methods),
            SPEED_COLUMNS,
        ),
        Job(
            "kernels_vit_b224",
            "Kernels: Triton vs PyTorch reference, ViT-B/16 224 px shapes, batch 256",
            lambda: _kernel_rows(device, tiny, vit_b16_kernels),
            KERNEL_COLUMNS,
        ),
        Job(
            "memory_side_vit_b16",
            "Training memory of one step, timm ViT-B/16, batch 64 (CUDA allocator peak)",
            lambda: _side_memory_rows(device, tiny, "vit_b16"),
            SIDE_COLUMNS,
        ),
        Job(
            "memory_side_clip_b32",
            "Training memory of one step, open_clip ViT-B-32 image tower, batch 64",
            lambda: _side_memory_rows(device, tiny, "clip_b32"),
            SIDE_COLUMNS,
        ),
        Job(
            "memory_clip",
            "Training memory of one step, whole open_clip ViT-B-32 CLIP, batch 64",
            clip_memory,
            CLIP_COLUMNS,
        ),
        Job(
            "speed_vit_b16_compiled",
            f"Token methods, timm ViT-B/16, batch 256, torch.compile({compiler})",
            speed(*vit_b, timm_methods, f"compile={compiler}"),
            SPEED_COLUMNS,
        ),
        Job(
            "speed_clip_b16_compiled",
            f"Token methods, open_clip ViT-B-16 image path, torch.compile({compiler})",
            speed(*clip, clip_methods, f"compile={compiler}"),
            SPEED_COLUMNS,
        ),
        Job(
            "speed_vit_l16_compiled",
            f"Token methods, timm ViT-L/16, batch 128, torch.compile({compiler})",
            speed(*vit_l, timm_methods, f"compile={compiler}"),
            SPEED_COLUMNS,
        ),
    ]


# --- running and writing ----------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(result: dict[str, Any], columns: dict[str, tuple[str, ...]]) -> str:
    """The result as markdown: a header with the device and command, then one table per job."""
    lines = [
        f"# vleff GPU run, {result['date']}",
        "",
        (
            f"Device: {result.get('device', '?')}. Command: `{result['command']}`. "
            f"Total {result.get('seconds', 0):.0f} s."
        ),
        "",
    ]
    for job in result["jobs"]:
        lines += [f"## {job['name']}: {job['title']}", ""]
        if job["status"] != "ok":
            lines += [f"**{job['status']}**: {_cell(job.get('error', ''))}", ""]
            continue
        keys = [k for k in columns[job["name"]] if any(k in r for r in job["rows"])]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in job["rows"]]
        lines += ["", f"({job.get('seconds', 0.0):.1f} s)", ""]
    return "\n".join(lines)


def run_suite(
    device: str = "cuda",
    tiny: bool = False,
    out: Path = DEFAULT_OUT,
    budget_s: float = 420.0,
    only: tuple[str, ...] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run the jobs (all, or ``only``), rewriting ``out/<date>.json`` and ``.md`` after each."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: --device cuda but CUDA is not available (use --device cpu --tiny for a dry run)")
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".scratch"
    scratch.mkdir(exist_ok=True)
    planned = jobs(device, tiny, scratch)
    names = [j.name for j in planned]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise SystemExit(f"gpu_suite: unknown job(s) {', '.join(unknown)}; jobs: {', '.join(names)}")
    date = _dt.date.today().isoformat() + ("-tiny" if tiny else "")
    result: dict[str, Any] = {"date": date, "command": command, "tiny": tiny, "budget_s": budget_s, "jobs": []}
    columns = {j.name: j.columns for j in planned}
    start = time.perf_counter()

    def write() -> None:
        result["seconds"] = time.perf_counter() - start
        (out / f"{date}.json").write_text(json.dumps(result, indent=1, default=str))
        (out / f"{date}.md").write_text(markdown(result, columns))

    for job in planned:
        if only and job.name not in only:
            continue
        elapsed = time.perf_counter() - start
        entry: dict[str, Any] = {"name": job.name, "title": job.title}
        if elapsed > budget_s:
            entry.update(status="skipped", error=f"budget of {budget_s:.0f} s spent ({elapsed:.0f} s)")
        else:
            print(f"[gpu_suite {time.strftime('%H:%M:%S')} +{elapsed:.0f}s] {job.name}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                entry.update(status="ok", rows=job.run())
            except Exception as err:  # noqa: BLE001 - record it and go on with the next job
                entry.update(
                    status="failed", error=f"{err.__class__.__name__}: {err}", traceback=traceback.format_exc()[-4000:]
                )
                print(entry["traceback"], file=sys.stderr, flush=True)
            entry["seconds"] = time.perf_counter() - t0
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if job.name == "env" and entry["status"] == "ok":
            result["device"] = entry["rows"][0]["device"]
        result["jobs"].append(entry)
        write()
    print(f"[gpu_suite] wrote {out / date}.json and .md", file=sys.stderr, flush=True)
    return result


def merge(paths: list[Path], out: Path) -> dict[str, Any]:
    """Join the results of several runs on one machine (a lease split into calls) into one file.

    A job measured in more than one of them keeps its last successful entry."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = {
        **parts[0],
        "command": " ; ".join(p["command"] for p in parts),
        "seconds": sum(p.get("seconds", 0.0) for p in parts),
        "jobs": [],
    }
    order = [j.name for j in jobs("cuda", False, out)]
    latest: dict[str, dict[str, Any]] = {}
    for part in parts:
        for job in part["jobs"]:
            if job["status"] == "ok" or job["name"] not in latest:
                latest[job["name"]] = job
    for name in order:
        latest.setdefault(
            name,
            {
                "name": name,
                "title": next(j.title for j in jobs("cuda", False, out) if j.name == name),
                "status": "not run",
                "error": "in none of the merged runs",
            },
        )
    merged["jobs"] = sorted(latest.values(), key=lambda j: order.index(j["name"]) if j["name"] in order else 99)
    env = next((j["rows"][0] for j in merged["jobs"] if j["name"] == "env" and j["status"] == "ok"), None)
    if env is not None:  # a run without the env job had no ceiling: read it against the merged one
        merged["device"] = env["device"]
        for job in merged["jobs"]:
            for row in job.get("rows", ()):
                if "tflops" in row and row.get("of_matmul_peak") is None:
                    row["of_matmul_peak"] = row["tflops"] / env["matmul_tflops"]
    columns = {j.name: j.columns for j in jobs("cuda", False, out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{merged['date']}.json").write_text(json.dumps(merged, indent=1, default=str))
    (out / f"{merged['date']}.md").write_text(markdown(merged, columns))
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the real run) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a plumbing check, figures meaningless")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for <date>.json and <date>.md")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no job after this many seconds")
    parser.add_argument("--jobs", default=None, help="comma-separated job names (default: all)")
    parser.add_argument("--merge", nargs="+", type=Path, help="join these result JSONs into --out (no measuring)")
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge(args.merge, args.out)
        print(f"[gpu_suite] merged {len(args.merge)} runs into {args.out / merged['date']}.json and .md")
        return
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs only with --tiny (the full shapes are sized for a GPU)")
    only = tuple(j for j in args.jobs.split(",") if j) if args.jobs else None
    command = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run_suite(args.device, args.tiny, args.out, args.budget_s, only, command.strip())
    failed = [j["name"] for j in result["jobs"] if j["status"] == "failed"]
    if failed:
        print(f"[gpu_suite] failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
