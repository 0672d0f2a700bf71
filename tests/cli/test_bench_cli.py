"""``vleff-bench`` on tiny configs: rows, saved files, the three modes, and bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vleff.cli import bench
from vleff.profile import count_flops

TINY = ["model=vit_tiny_digits", "image_size=32", "batch_size=2", "repeats=1", "warmup=0", "progress=false"]


def test_speed_rows_and_saved_files(tmp_path, capsys):
    prefix = tmp_path / "out" / "tiny"
    rows = bench.run([*TINY, "methods=[tome,evit]", "method_args.tome.r=8", f"save={prefix}"])
    names = [r["name"] for r in rows]
    assert names == ["baseline", "tome(r=8)", "evit(keep_rate=0.7)"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["baseline"]["flops_ratio"] == 1.0
    assert by_name["tome(r=8)"]["flops_ratio"] < 1 and by_name["evit(keep_rate=0.7)"]["flops_ratio"] < 1
    for row in rows:
        assert row["images_per_s"] > 0 and row["activation_mib"] > 0
    # 8x8 patches + cls enter block 0; ToMe takes 8 per block until fewer than 2*8+1 remain
    assert by_name["tome(r=8)"]["tokens_per_layer"][:3] == [65, 57, 49]
    assert by_name["baseline"]["tokens"] == "65→65"

    # the baseline's FLOPs equal a direct count of the same model
    import torch

    from vleff.models import build_model

    torch.manual_seed(0)
    model = build_model("vit_tiny_digits", image_size=32).eval()
    assert rows[0]["gflops_per_sample"] == pytest.approx(count_flops(model, torch.zeros(2, 3, 32, 32)) / 2 / 1e9)

    out = capsys.readouterr().out
    assert "baseline" in out and "tome(r=8)" in out and "FLOPs ratio" in out
    for suffix in (".csv", ".json", ".png"):
        assert prefix.with_suffix(suffix).stat().st_size > 0
    with prefix.with_suffix(".csv").open() as f:
        assert [r["name"] for r in csv.DictReader(f)] == names
    saved = json.loads(prefix.with_suffix(".json").read_text())
    assert [r["name"] for r in saved["rows"]] == names
    assert saved["config"]["model"] == "vit_tiny_digits" and saved["image_size"] == 32
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_target_fits_every_method_to_one_budget():
    """``flops_target=0.7``: each method's knob fitted on the measured batch; the rows' FLOPs
    ratios (counted by the benchmark itself) land within 2 % and the labels name the budget."""
    rows = bench.run([*TINY, "methods=[tome,evit,dynamicvit]", "flops_target=0.7", "memory=false"])
    assert [r["name"] for r in rows] == ["baseline", "tome(flops=0.7)", "evit(flops=0.7)", "dynamicvit(flops=0.7)"]
    for row in rows[1:]:
        assert abs(row["flops_ratio"] - 0.7) <= 0.02 * 0.7, row


def test_method_arguments_precedence_and_forms():
    cfg = bench.load_config(["methods={tome: {r: 2}, evit: {keep_rate: 0.5}}", "method_args.tome.r=4"])
    resolved = {m.name: kw for m, kw in bench.resolve_methods(cfg.methods, cfg.method_args)}
    assert resolved == {"tome": {"r": 4}, "evit": {"keep_rate": 0.5}}  # method_args wins
    assert [m.name for m, _ in bench.resolve_methods("tome,evit")] == ["tome", "evit"]
    assert bench.resolve_methods([]) == [] and bench.resolve_methods(None) == []
    ((method, kwargs),) = bench.resolve_methods(["dynamicvit"])
    assert kwargs == method.bench_settings  # registry defaults when nothing is given
    cfg = bench.load_config(["methods=tome,dynamicvit", "image_size=null", "method_args.tome.prop_attn=false"])
    assert list(cfg.methods) == ["tome", "dynamicvit"] and cfg.image_size is None
    assert cfg.method_args.tome.prop_attn is False


def test_baseline_only_and_bf16(capsys):
    rows = bench.run([*TINY, "methods=[]", "precision=bf16", "memory=false"])
    assert [r["name"] for r in rows] == ["baseline"] and rows[0]["activation_mib"] is None
    assert "bf16" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=vit_nope"], ["'vit_nope'", "vit_base", "vit_tiny_digits"]),
        (["methods=[tomee]"], ["'tomee'", "tome", "evit", "dynamicvit"]),
        (["model=vit_base", "image_size=100"], ["image_size=100", "patch size 16"]),
        (["model=vit_tiny_digits", "image_size=30"], ["image_size=30", "patch size 4"]),
        (["precision=fp64"], ["'fp64'", "fp32, bf16, fp16"]),
        (["device=tpu"], ["'tpu'", "cpu"]),
        (["bogus=1"], ["'bogus'", "model", "methods"]),
        (["batch_size=0"], ["batch_size=0"]),
        (["methods=[tome"], ["methods=[tome"]),
        (["method_args.evit.keep_rate=0.5"], ["evit", "methods"]),
        ([*TINY, "method_args.tome.r=-3"], ["tome", "r=-3"]),
        (
            [*TINY, "methods=[crossget]"],
            [
                "crossget act(s) on both towers",
                "'vit_tiny_digits'",
                "open_clip_vit_b32",
                "hf_clip_vit_b32",
                "hf_blip_base",
            ],
        ),
        ([*TINY, "tower=text"], ["tower=text measures the text path", "'vit_tiny_digits'", "open_clip_vit_b32"]),
        (["tower=audio"], ["tower='audio'", "image, text"]),
        # hf_clip: building it logs nothing (open_clip logs a warning, which an earlier in-process
        # vleff-train run can leave routed to a closed stream: "--- Logging error ---" on stderr)
        (["model=hf_clip_vit_b32", "tower=text", "words=76", "methods=[]"], ["words=76", "1..75"]),
        (["frobnicate"], ["'frobnicate'", "speed, kernels, memory"]),
        (["kernels", "foo=1"], ["'foo'", "tome_batch"]),
        (["kernels", "dtype=fp8"], ["'fp8'", "bfloat16"]),
        (["memory", "script=/nonexistent/clip_memory.py"], ["'script'", "model", "out"]),
        (["memory", "methods=[adamw,sgd]"], ["methods=['adamw', 'sgd']", "galore_embed"]),
        (["memory", "batch_size=0"], ["batch_size=0"]),
        (["memory", "out=/proc/nope/memory.json"], ["out='/proc/nope/memory.json'", "cannot be written"]),
        ([*TINY, "save=/proc/nope/bench"], ["save=", "cannot be written"]),
        ([*TINY, "methods=[lst]", "flops_target=0.7"], ["flops_target=0.7", "'lst' has no FLOPs knob"]),
        ([*TINY, "methods=[tome]", "flops_target=0.01"], ["out of reach for ToMe", "closest reachable"]),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("vleff-bench: error: ") and "Traceback" not in err
    for part in message:
        assert part in err, (part, err)


def test_pair_methods_measure_the_image_path_of_the_whole_model(capsys):
    """CrossGET and MADTP act on both towers: every row is the whole CLIP's ``encode_image``;
    CrossGET's tokens follow r per block (plus its cross token), MADTP's τ is calibrated on
    the measured batch so its row lands on the FLOPs target."""
    import torch

    from vleff.models.factory import build_pair_model

    args = [
        "model=open_clip_vit_b32",
        "image_size=128",
        "batch_size=2",
        "repeats=1",
        "warmup=0",
        "progress=false",
        "memory=false",
        "methods={tome: {r: 2}, crossget: {r_image: 3, r_text: 0}, madtp: {flops_reduction: 0.4}}",
    ]
    rows = {r["name"]: r for r in bench.run(args)}
    torch.manual_seed(0)
    clip = build_pair_model("open_clip_vit_b32", image_size=128).eval()
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    direct = count_flops(lambda x: clip.encode_image(x), images) / 2 / 1e9  # the library's own image path
    assert rows["baseline"]["gflops_per_sample"] == pytest.approx(direct)
    assert rows["baseline"]["tokens"] == "17→17"  # 4x4 patches of 32 px + cls
    assert rows["tome(r=2)"]["tokens_per_layer"][:4] == [17, 15, 13, 11]
    crossget_first = bench.run([*args[:-1], "methods={crossget: {r_image: 3, r_text: 0}}"])
    assert crossget_first[0]["tokens"] == "17→17"  # not the 18 that enter CrossGET's block 0
    # 17 tokens + the cross token enter block 0; 3 merged per block while enough remain
    assert rows["crossget(r_image=3, r_text=0)"]["tokens_per_layer"][:4] == [18, 15, 12, 9]
    assert rows["madtp(flops_reduction=0.4)"]["flops_ratio"] == pytest.approx(0.6, abs=0.03)
    assert "image path of the whole image-text model" in " ".join(capsys.readouterr().out.split())


def test_text_tower_rows_measure_encode_text_of_sampled_captions():
    """``tower=text``: every row is the whole CLIP's ``encode_text`` of zero-padded captions;
    tower methods get ``towers=text``; MADTP's τ is calibrated on those captions."""
    import torch

    from vleff.backbones.pairs import find_pair
    from vleff.models.factory import build_pair_model

    args = [
        "model=open_clip_vit_b32",
        "tower=text",
        "words=15",
        "batch_size=2",
        "repeats=1",
        "warmup=0",
        "progress=false",
        "memory=false",
        "methods={tome: {r: 4}, madtp: {flops_reduction: 0.4}}",
    ]
    rows = {r["name"]: r for r in bench.run(args)}
    torch.manual_seed(0)
    clip = build_pair_model("open_clip_vit_b32").eval()
    ids = find_pair(clip).sample_text(2, 15, seed=0)
    assert ids[0, 0] == 49406 and ids[0, 16] == 49407 and (ids[:, 17:] == 0).all()  # open_clip's layout
    direct = count_flops(lambda t: clip.encode_text(t), ids) / 2 / 1e9
    assert rows["baseline"]["gflops_per_sample"] == pytest.approx(direct)
    assert rows["baseline"]["tokens"] == "77→77"
    assert rows["tome(r=4)"]["tokens_per_layer"][:3] == [77, 73, 69]  # r per block on the text tower
    # a 15-word caption loses its padding at the first pruning block, so a small reduction needs
    # a late first block: the controller must get there within its budget (it stopped at 0.534x)
    assert rows["madtp(flops_reduction=0.4)"]["flops_ratio"] == pytest.approx(0.6, abs=0.018)


def test_help_lists_models_methods_and_defaults(capsys):
    bench.main(["--help"])
    out = capsys.readouterr().out
    assert "vit_base" in out and "tome" in out and "batch_size: 16" in out


def test_kernels_mode_delegates(tmp_path):
    out = tmp_path / "k.json"
    rows = bench.run(
        [
            "kernels",
            "cases=[tome_match,galore_project]",
            "tome_batch=2",
            "tome_tokens=17",
            "tome_channels=8",
            "lowrank_m=16",
            "lowrank_n=8",
            "lowrank_rank=2",
            "warmup=0",
            "repeats=1",
            "device=cpu",
            f"out={out}",
        ]
    )
    assert {(r["case"], r["backend"]) for r in rows} == {("tome_match", "torch"), ("galore_project", "torch")}
    assert json.loads(out.read_text())["rows"]


def _console_script() -> str:
    path = Path(sys.executable).with_name("vleff-bench")
    if not path.exists():
        pytest.skip("the vleff-bench console script is not installed next to this Python")
    return str(path)


def test_console_script_from_another_directory(tmp_path):
    """The installed command finds its packaged config from any working directory."""
    env = dict(os.environ, COLUMNS="160")
    proc = subprocess.run(
        [_console_script(), *TINY, "methods=[tome]", "save=res/tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline" in proc.stdout and "tome(r=16)" in proc.stdout
    assert all((tmp_path / "res" / f"tiny{s}").exists() for s in (".csv", ".json", ".png"))
    rows = json.loads((tmp_path / "res" / "tiny.json").read_text())["rows"]
    assert rows[1]["flops_ratio"] < 1

    bad = subprocess.run(
        [_console_script(), "model=vit_nope"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "vit_nope" in bad.stderr and "Traceback" not in bad.stderr
