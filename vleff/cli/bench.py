"""``vleff-bench``: FLOPs, images/s and activation memory, baseline against methods, as a table.

Three modes, picked by the first word (default ``speed``)::

    vleff-bench model=vit_base methods=[tome] image_size=224 batch_size=16 repeats=5
    vleff-bench kernels tome_batch=64 out=kernels.json      # vleff.cli.kernels_bench
    vleff-bench memory batch_size=32 out=memory.json         # vleff.cli.training_memory

Settings are ``key=value`` overrides in Hydra's grammar (lists ``[a,b]``, dicts ``{a: {r: 8}}``,
``null``, dotted keys ``method_args.tome.r=8``), applied to ``vleff/configs/bench.yaml``,
which ships inside the package, so the command works from any directory. The overrides are
parsed with Hydra's own override parser but applied here rather than through
``compose``: method arguments are free-form (``method_args.tome.prop_attn=false`` needs no
``+``), while a misspelt top-level key is still an error that lists the allowed keys.

Speed mode builds the model once, applies each method to a deep copy (registry defaults,
then ``methods={name: {...}}``, then ``method_args.name.*``), and measures every variant on the
same random batch with :func:`vleff.profile.compare_models` (FLOPs counted; images/s timed
interleaved after warm-up, median of ``repeats``; activation MiB saved for backward).
Methods that act on both towers of an image-text model (CrossGET, MADTP: ``needs_pair`` in
the registry) need a CLIP/BLIP name; every row is then the whole model's image path
(``encode_image`` of :func:`vleff.models.build_pair_model`, through
:class:`vleff.backbones.pairs.PairEncoder`), the baseline included, and a
method with a ``calibrate`` step (MADTP's τ for its FLOPs target) is calibrated on the batch
that is measured. ``tower=text`` measures the text path instead (``encode_text`` of a CLIP/BLIP
name) on synthetic captions of ``words`` word tokens padded to the family's context
(:meth:`vleff.backbones.pairs.ModelPair.sample_text`; no tokenizer download); methods with a
``towers`` setting get ``towers=text`` unless it is given. Bad
input (unknown model, method, mode or setting; an image size that is not a multiple of the
patch size; a bad precision or device) prints one line to stderr and exits with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["BenchError", "CONFIG_PATH", "MODES", "load_config", "main", "resolve_methods", "run", "run_speed"]

CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "bench.yaml"
MODES = ("speed", "kernels", "memory")
PRECISIONS = ("fp32", "bf16", "fp16")
TOWERS_MEASURED = ("image", "text")  # speed mode's tower=: the path every row measures
_FREE_FORM = ("method_args",)  # sections whose nested keys are not checked


class BenchError(Exception):
    """Bad input: shown as one line on stderr (no traceback), exit status 2."""


def _fit_budgets(
    variants: dict[str, Any], targets: dict[str, Any], inputs: Any, flops: float, progress: bool
) -> dict[str, Any]:
    """``flops_target=``: each method's knob set by :func:`vleff.fit_budget` so the measured
    forward (the variant's, on ``inputs``) costs ``flops`` × the baseline's; the variants
    relabelled by their budget (``tome(flops=0.5)``: the fitted settings replace the given ones)."""
    from vleff.budget import fit_budget
    from vleff.flops import count_flops

    baseline = count_flops(variants["baseline"], inputs)
    for label, (method, target) in targets.items():
        variant = variants[label]
        if method.budget is None:
            raise BenchError(f"flops_target={flops}: method {method.name!r} has no FLOPs knob")
        with _status(progress, f"fitting {method.name} to {flops}x the FLOPs ..."):
            try:
                fit_budget(
                    target,
                    [inputs],
                    flops=flops,
                    method=method.name,
                    forward=lambda m, b, v=variant: v(b),
                    baseline=baseline,
                )
            except ValueError as err:
                raise BenchError(str(err)) from None
    return {
        label if label not in targets else f"{targets[label][0].name}(flops={flops})": v
        for label, v in variants.items()
    }


# --- command line ---------------------------------------------------------------------------
def _parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings -> ``(key, python value)`` with Hydra's override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed: list[tuple[str, Any]] = []
    for arg in args:
        if "=" not in arg:
            raise BenchError(f"argument {arg!r} is not key=value (modes go first: {', '.join(MODES)})")
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            raise BenchError(f"cannot parse {arg!r}: {err}") from None
        if override.is_delete():
            raise BenchError(f"{arg!r}: deleting settings (~key) is not supported; set key=null instead")
        value = list(override.sweep_iterator()) if override.is_sweep_override() else override.value()
        parsed.append((override.key_or_group, value))
    return parsed


def _split_mode(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    args = list(argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        word = args.pop(0)
        if word not in MODES:
            raise BenchError(f"unknown mode {word!r}; use one of: {', '.join(MODES)}")
        return word, args
    return None, args


def load_config(overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()) -> DictConfig:
    """``bench.yaml`` with ``overrides`` (``"key=value"`` strings or parsed pairs) applied."""
    cfg = OmegaConf.load(CONFIG_PATH)
    pairs = _parse_overrides(overrides) if overrides and isinstance(overrides[0], str) else list(overrides)
    for key, value in pairs:
        top = key.lstrip("+").split(".")[0]
        key = key.lstrip("+")
        if top not in cfg:
            raise BenchError(f"unknown setting {key!r}; settings: {', '.join(cfg.keys())}")
        if "." in key and top not in _FREE_FORM:
            raise BenchError(f"setting {top!r} has no sub-keys (got {key!r})")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _usage() -> str:
    from vleff.models.factory import MODELS
    from vleff.registry import available_methods

    defaults = CONFIG_PATH.read_text()
    return (
        "usage: vleff-bench [speed|kernels|memory] [key=value ...]\n\n"
        "speed (default): baseline vs token methods on one model -> table of GFLOPs/img, FLOPs ratio,\n"
        "  img/s, speedup, activation MiB; save=path/prefix writes CSV, JSON and PNG.\n"
        "kernels: reference vs Triton kernels (settings of vleff.cli.kernels_bench.KernelBenchConfig).\n"
        "memory: CLIP training memory, AdamW vs GaLore vs MeZO (vleff.cli.training_memory); settings\n"
        f"  {', '.join(MEMORY_SETTINGS)}; out=file.json|.csv writes the rows.\n\n"
        f"models: {', '.join(MODELS)} (or any timm model name)\n"
        f"methods: {', '.join(available_methods())}\n"
        f"precision: {', '.join(PRECISIONS)}\n\n"
        f"speed-mode settings and defaults ({CONFIG_PATH}):\n{defaults}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; exits 2 with a one-line message on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(_usage())
        return
    try:
        run(argv)
    except BenchError as err:
        print(f"vleff-bench: error: {err}", file=sys.stderr)
        print("(vleff-bench --help lists the settings)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("vleff-bench: interrupted", file=sys.stderr)
        sys.exit(130)


def run(argv: Sequence[str]) -> Any:
    """Run the mode ``argv`` asks for; returns its rows (speed/kernels) or the memory result."""
    mode, args = _split_mode(argv)
    pairs = _parse_overrides(args)
    given = [v for k, v in pairs if k == "mode"]
    if given:
        if mode is not None and given[-1] != mode:
            raise BenchError(f"mode given twice: {mode!r} and mode={given[-1]!r}")
        mode = given[-1]
        pairs = [(k, v) for k, v in pairs if k != "mode"]
    mode = mode or "speed"
    if mode not in MODES:
        raise BenchError(f"mode={mode!r} is not allowed; use one of: {', '.join(MODES)}")
    if mode == "kernels":
        return run_kernels(dict(pairs))
    if mode == "memory":
        return run_memory(dict(pairs))
    return run_speed(load_config(pairs))


# --- speed mode -----------------------------------------------------------------------------
def resolve_methods(methods: Any, method_args: Mapping[str, Any] | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """``(Method, kwargs)`` pairs from the ``methods`` / ``method_args`` settings.

    ``methods`` may be a name, a comma-separated string, a list of names (or one-key dicts),
    or ``{name: {argument: value}}``; kwargs = registry defaults, then those, then
    ``method_args[name]``.
    """
    from vleff.registry import available_methods, get_method

    if isinstance(methods, (DictConfig,)) or OmegaConf.is_config(methods):
        methods = OmegaConf.to_container(methods, resolve=True)
    method_args = (
        OmegaConf.to_container(method_args, resolve=True)
        if OmegaConf.is_config(method_args)
        else (dict(method_args or {}))
    )
    entries: list[tuple[str, dict[str, Any]]] = []
    if methods is None or methods == "" or methods == "none":
        pass
    elif isinstance(methods, str):
        entries = [(name.strip(), {}) for name in methods.split(",") if name.strip()]
    elif isinstance(methods, Mapping):
        entries = [(str(name), kwargs) for name, kwargs in methods.items()]
    elif isinstance(methods, (list, tuple)):
        for item in methods:
            if isinstance(item, str):
                entries.append((item, {}))
            elif isinstance(item, Mapping) and len(item) == 1:
                ((name, kwargs),) = item.items()
                entries.append((str(name), kwargs))
            else:
                raise BenchError(f"methods entry {item!r} is not a name or {{name: {{argument: value}}}}")
    else:
        raise BenchError(f"methods={methods!r} must be a name, a list of names or {{name: {{argument: value}}}}")

    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise BenchError(f"methods={names} names a method twice")
    stray = sorted(set(method_args) - set(names))
    if stray:
        raise BenchError(f"method_args for {stray} but methods={names}; add them to methods")
    resolved = []
    for name, kwargs in entries:
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise BenchError(f"arguments of method {name!r} must be a mapping, got {kwargs!r}")
        extra = method_args.get(name) or {}
        if not isinstance(extra, Mapping):
            raise BenchError(f"method_args.{name} must be a mapping, got {extra!r}")
        try:
            method = get_method(name)
        except ValueError:
            raise BenchError(f"method {name!r} is not known; available: {', '.join(available_methods())}") from None
        resolved.append((method, {**method.bench_settings, **dict(kwargs or {}), **dict(extra)}))
    return resolved


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchError(f"{key}={value!r} must be an integer >= {minimum}")
    return value


def _device(spec: Any) -> Any:
    import torch

    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise BenchError(f"device={spec!r} is not allowed; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"device={spec!r} is not allowed; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"device={spec!r} but CUDA is not available here; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def _compile_backend(spec: Any) -> str | None:
    """``compile=``: ``None`` (eager) or the name of a ``torch.compile`` backend."""
    if spec is None:
        return None
    import torch

    backends = torch.compiler.list_backends(exclude_tags=())
    if not isinstance(spec, str) or spec not in backends:
        raise BenchError(
            f"compile={spec!r} is not allowed; use null (eager) or a torch.compile backend: "
            f"{', '.join(sorted(torch.compiler.list_backends()))}"
        )
    return spec


def device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})"


def _input_size(model: Any, name: str, image_size: int | None) -> int:
    from vleff.models.factory import MODELS

    if image_size is not None:
        return int(image_size)
    if name in MODELS:
        return MODELS[name].image_size
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])


def _check_model_name(name: Any) -> None:
    from vleff.models.factory import MODELS

    if not isinstance(name, str) or not name:
        raise BenchError(f"model={name!r} must be a name; use one of {', '.join(MODELS)} or a timm model name")
    if name in MODELS:
        return
    import timm

    if not timm.is_model(name):
        raise BenchError(
            f"model {name!r} is not known; use one of: {', '.join(MODELS)} "
            "(or a timm model name, see timm.list_models())"
        )


def _status(enabled: bool, message: str) -> Any:
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(message)


def _token_summary(model: Any, inputs: Any, tower: str = "image") -> list[int] | None:
    """Tokens entering each block of ``tower`` in one eval forward (None: no token method)."""
    import torch

    from vleff.backbones import token_counts

    with torch.no_grad():
        model(inputs[:1])
    counts = token_counts(model)
    return counts.get(tower, next(iter(counts.values()))) if counts else None


def _save_paths(save: str) -> Path:
    path = Path(save).expanduser()
    if save.endswith(("/", "\\")) or path.is_dir():
        path = path / "bench"
    if path.suffix in (".csv", ".json", ".png"):
        path = path.with_suffix("")
    return path


def run_speed(cfg: DictConfig) -> list[dict[str, Any]]:
    """Speed mode: build, apply, measure, print (and save). Returns the rows."""
    import torch

    from vleff.backbones.pairs import PairEncoder, find_pair
    from vleff.models.factory import build_model, build_pair_model, patch_size_of
    from vleff.profile import (
        compare_models,
        plot_rows,
        print_table,
        rows_to_csv,
        rows_to_json,
    )

    _check_model_name(cfg.model)
    if cfg.precision not in PRECISIONS:
        raise BenchError(f"precision={cfg.precision!r} is not allowed; use one of: {', '.join(PRECISIONS)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    batch_size = _positive_int(cfg, "batch_size")
    repeats = _positive_int(cfg, "repeats")
    warmup = _positive_int(cfg, "warmup", minimum=0)
    device = _device(cfg.device)
    compile_backend = _compile_backend(cfg.compile)
    if cfg.image_size is not None:
        patch = patch_size_of(cfg.model)
        size = cfg.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % patch:
            near = patch * max(1, round(size / patch)) if isinstance(size, (int, float)) else patch * (224 // patch)
            raise BenchError(
                f"image_size={size!r} is not a positive multiple of the patch size {patch} of model "
                f"{cfg.model!r} (e.g. image_size={near})"
            )
    methods = resolve_methods(cfg.methods, cfg.method_args)
    if cfg.save is not None and not isinstance(cfg.save, str):
        raise BenchError(f"save={cfg.save!r} must be a path prefix")
    if cfg.save:  # fail now, not after the measurement
        for suffix in (".csv", ".json", ".png"):
            check_writable(_save_paths(cfg.save).with_suffix(suffix), "save")
    offline = None
    if cfg.pretrained:
        from vleff.models.factory import offline_reason, use_offline_hub

        offline = offline_reason()
        if offline is not None:  # look in the local cache only: no retries, an answer at once
            use_offline_hub()

    tower = cfg.tower
    if tower not in TOWERS_MEASURED:
        raise BenchError(f"tower={tower!r} is not allowed; use one of: {', '.join(TOWERS_MEASURED)}")
    words = _positive_int(cfg, "words")
    pair_methods = [m.name for m, _ in methods if m.needs_pair]
    whole_model = bool(pair_methods) or tower == "text"
    torch.manual_seed(int(cfg.seed))
    with _status(cfg.progress, f"building {cfg.model} ..."):
        try:
            if whole_model:  # every row measures one path of the whole model, baseline included
                model = PairEncoder(
                    build_pair_model(cfg.model, image_size=cfg.image_size, pretrained=bool(cfg.pretrained)), path=tower
                )
            else:
                model = build_model(cfg.model, image_size=cfg.image_size, pretrained=bool(cfg.pretrained))
        except ValueError as err:
            if tower == "text":
                raise BenchError(f"tower=text measures the text path of an image-text model: {err}") from None
            if pair_methods:
                raise BenchError(
                    f"{', '.join(pair_methods)} act(s) on both towers of an image-text model: {err}"
                ) from None
            raise BenchError(str(err)) from None
        except Exception as err:
            if offline is None:
                raise
            raise BenchError(
                f"no network: pretrained weights cannot be downloaded ({offline}), and the weights of "
                f"{cfg.model!r} are not in the local cache ({err.__class__.__name__}). Use "
                "pretrained=false (FLOPs and speed do not depend on the weights) or run once with "
                "network to cache them"
            ) from None
        model.eval()
        variants = {"baseline": model}
        targets: dict[str, Any] = {}  # label -> (method, the model it acts on)
        to_calibrate = []
        for method, kwargs in methods:
            variant = copy.deepcopy(model)
            target = variant.model if whole_model else variant  # methods act on the library's model
            settings = dict(kwargs)
            if tower == "text" and "towers" in {f.name for f in dataclasses.fields(method.config)}:
                settings.setdefault("towers", "text")  # the measured tower, unless the user chose
            try:
                method.apply(target, **settings)
            except (ValueError, TypeError) as err:
                raise BenchError(f"method {method.name!r} with {settings}: {err}") from None
            label = method.label(**kwargs)
            variants[label] = variant
            targets[label] = (method, target)
            if method.calibrate is not None:
                to_calibrate.append((method, target))
        for variant in variants.values():
            variant.to(device=device, dtype=dtype).eval()

    size = _input_size(model, cfg.model, cfg.image_size)
    if tower == "text":
        try:
            inputs = find_pair(model.model).sample_text(batch_size, words, seed=int(cfg.seed)).to(device)
        except ValueError as err:
            raise BenchError(str(err)) from None
    else:
        gen = torch.Generator().manual_seed(int(cfg.seed))
        inputs = torch.randn(batch_size, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    if cfg.flops_target is not None:  # every method at one budget, fitted on the batch measured
        variants = _fit_budgets(variants, targets, inputs, float(cfg.flops_target), bool(cfg.progress))
    else:
        for method, target in to_calibrate:  # a target setting (MADTP's FLOPs) is met on the batch measured
            with _status(cfg.progress, f"calibrating {method.name} on the benchmark batch ..."):
                method.calibrate(target, inputs, tower)
    rows = compare_models(
        variants,
        inputs,
        repeats=repeats,
        warmup=warmup,
        measure_memory=bool(cfg.memory),
        compile_backend=compile_backend,
        progress=bool(cfg.progress),
    )
    for row, variant in zip(rows, variants.values()):
        counts = _token_summary(variant, inputs, tower)
        row["tokens_per_layer"] = counts
        row["tokens"] = f"{counts[0]}→{counts[-1]}" if counts else None
    if rows[0]["tokens_per_layer"] is None and any(r["tokens_per_layer"] for r in rows):
        # the baseline keeps every token: the patch grid and the tower's prefix tokens (not a method
        # row's first count, which may hold a token the method adds, as CrossGET's cross token)
        from vleff.backbones import find_tower

        if tower == "text":
            entering = int(inputs.shape[1])
        else:
            entering = (size // patch_size_of(cfg.model)) ** 2 + find_tower(model, "image").num_prefix_tokens
        rows[0]["tokens"] = f"{entering}→{entering}"
    where = device_name(device)
    if tower == "text":
        title = (
            f"vleff-bench: {cfg.model} text path, {words}-word captions padded to {inputs.shape[1]} tokens, "
            f"batch {batch_size}, {cfg.precision}, {where} (img/s = captions/s)"
        )
    else:
        title = f"vleff-bench: {cfg.model} at {size}px, batch {batch_size}, {cfg.precision}, {where}"
        if pair_methods:
            title += " (image path of the whole image-text model)"
    if compile_backend is not None:
        title += f", torch.compile({compile_backend})"
    from rich.console import Console

    print_table(
        rows,
        title=title,
        extra_columns={"tokens": "tokens (block 0→last)"},
        console=Console(width=max(Console().width, 120)),
    )
    if device.type == "cpu":
        print("note: img/s on CPU are indicative; compare ratios measured in one run, absolute numbers on a GPU.")
    if cfg.save:
        prefix = _save_paths(cfg.save)
        meta = {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "device": where,
            "torch": torch.__version__,
            "image_size": size,
        }
        written = [
            rows_to_csv(
                [{k: v for k, v in r.items() if k != "tokens_per_layer"} for r in rows], prefix.with_suffix(".csv")
            ),
            rows_to_json(rows, prefix.with_suffix(".json"), **meta),
            plot_rows(rows, prefix.with_suffix(".png"), title=title.removeprefix("vleff-bench: ")),
        ]
        print("saved: " + ", ".join(str(p) for p in written))
    return rows


# --- kernels and memory modes ---------------------------------------------------------------
def run_kernels(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Kernel mode: :func:`vleff.cli.kernels_bench.run_kernel_bench` with these settings."""
    from dataclasses import fields

    from vleff.cli.kernels_bench import KernelBenchConfig, run_kernel_bench

    names = [f.name for f in fields(KernelBenchConfig)]
    values = {k.removeprefix("kernels."): v for k, v in settings.items()}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise BenchError(f"unknown kernels setting(s) {unknown}; settings: {', '.join(names)}")
    try:
        cfg = KernelBenchConfig(**values).resolved()
    except (ValueError, TypeError) as err:
        raise BenchError(str(err)) from None
    return run_kernel_bench(cfg)


MEMORY_SETTINGS = ("model", "batch_size", "rank", "device", "methods", "isolate", "seed", "out")


def check_writable(path: str | Path, key: str) -> Path:
    """Fail now, before minutes of measuring, when ``path`` cannot be written.

    Creates the missing folders and opens the file for appending (removing it again when it
    did not exist): the only test that also holds for root and for special file systems,
    where permission bits say nothing.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise BenchError(f"{key}={str(path)!r} cannot be written: it is a directory")
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a"):
            pass
    except OSError as err:
        raise BenchError(
            f"{key}={str(path)!r} cannot be written ({err.strerror or err}: "
            f"{err.filename or target}); choose a writable path"
        ) from None
    if not existed:
        target.unlink()
    return target


def run_memory(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Memory mode: :func:`vleff.cli.training_memory.run_training_memory`, printed as a table.

    Settings: ``model`` (open_clip name or CLIP config ``.json``), ``batch_size``, ``rank``,
    ``device``, ``methods`` (subset of adamw, galore, galore_embed, mezo), ``isolate`` (a fresh
    process per method, default true), ``seed`` and ``out`` (a ``.json`` or ``.csv`` file for
    the rows, checked for writability before anything is measured). Returns the rows.
    """
    from vleff.cli.training_memory import (
        check_settings,
        print_memory_rows,
        run_training_memory,
    )
    from vleff.profile.report import rows_to_csv, rows_to_json

    values = {k.removeprefix("memory."): v for k, v in settings.items()}
    unknown = sorted(set(values) - set(MEMORY_SETTINGS))
    if unknown:
        raise BenchError(f"unknown memory setting(s) {unknown}; settings: {', '.join(MEMORY_SETTINGS)}")
    out = values.pop("out", None)
    options = {
        "model": "ViT-B-32",
        "batch_size": 32,
        "rank": 128,
        "device": "cpu",
        "methods": None,
        "isolate": True,
        "seed": 0,
        **values,
    }
    if options["methods"] is None:
        from vleff.cli.training_memory import METHODS

        options["methods"] = list(METHODS)
    if not isinstance(options["isolate"], bool):
        raise BenchError(f"isolate={options['isolate']!r} is not allowed; use true or false")
    try:
        check_settings(
            options["model"],
            options["batch_size"],
            options["rank"],
            options["device"],
            options["methods"],
            options["seed"],
        )
    except ValueError as err:
        raise BenchError(str(err)) from None
    if str(options["device"]).startswith("cuda"):
        _device(options["device"])
    target = None
    if out is not None:
        if not isinstance(out, str) or not out:
            raise BenchError(f"out={out!r} must be a file path ending in .json or .csv")
        target = check_writable(out, "out")
        if target.suffix not in (".json", ".csv"):
            raise BenchError(f"out={out!r} must end in .json or .csv")
    rows = run_training_memory(**options)
    print_memory_rows(rows)
    if target is not None:
        if target.suffix == ".csv":
            rows_to_csv(rows, target)
        else:
            rows_to_json(
                rows,
                target,
                benchmark="training_memory",
                settings=options,
                command=" ".join(["vleff-bench", "memory", *[f"{k}={v}" for k, v in settings.items()]]),
            )
        print(f"saved: {target}")
    return rows


if __name__ == "__main__":
    main()
