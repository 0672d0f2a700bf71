"""``vleff-bench``: memory mode runs the library (table printed, file written, optimizer
state checked analytically on a tiny CLIP); ``save=``/``out=`` checked before measuring;
``pretrained=true`` without network answers at once."""

from __future__ import annotations

import json
import time

import pytest
from repo import ROOT

from vleff.cli import bench

# a tiny open_clip CLIP (the same shape as tests/tiny_models.open_clip_model)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture()
def tiny_clip_config(tmp_path):
    path = tmp_path / "tiny_clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def _tiny_clip():
    import open_clip

    return open_clip.CLIP(**TINY_CLIP)


def test_memory_mode_prints_the_table_and_writes_the_file(tiny_clip_config, tmp_path, capsys):
    out = tmp_path / "results" / "memory.json"
    rows = bench.run(
        [
            "memory",
            f"model={tiny_clip_config}",
            "batch_size=2",
            "rank=4",
            "methods=[adamw,galore,mezo]",
            "isolate=false",
            f"out={out}",
        ]
    )
    printed = capsys.readouterr().out
    for text in (
        "AdamW (backprop)",
        "GaLoreAdamW r=4 (backprop)",
        "MeZO (2 forwards)",
        "optimizer state MiB",
        f"saved: {out}",
    ):
        assert text in printed, text
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["adamw", "galore", "mezo"]

    model = _tiny_clip()
    params = list(model.parameters())
    n, tensors = sum(p.numel() for p in params), len(params)
    adamw, galore, mezo = rows
    assert adamw["parameters"] == n and adamw["parameter_tensors"] == tensors
    # AdamW: exp_avg + exp_avg_sq in fp32 per parameter (8 bytes each) + one fp32 step per tensor
    assert adamw["optimizer_state_bytes"] == 8 * n + 4 * tensors
    assert adamw["grad_bytes"] == 4 * n  # one fp32 gradient per parameter
    # GaLore: [m, n] weights with m >= n keep [m, r] moments and an [r, n] projector
    from vleff.memory import galore_param_groups

    projected = galore_param_groups(model, rank=4)[0]["params"]
    rank_space = sum(4 * (2 * max(p.shape) * min(4, *p.shape) + min(4, *p.shape) * min(p.shape)) for p in projected)
    plain = n - sum(p.numel() for p in projected)
    assert galore["optimizer_state_bytes"] == rank_space + 8 * plain + 4 * tensors
    assert mezo["optimizer_state_bytes"] == 0 and mezo["grad_bytes"] == 0 and mezo["saved_for_backward_bytes"] == 0
    assert galore["optimizer_state_bytes_vs_adamw"] == pytest.approx(
        galore["optimizer_state_bytes"] / (8 * n + 4 * tensors)
    )


def test_memory_mode_in_fresh_processes_writes_csv(tiny_clip_config, tmp_path, capsys):
    out = tmp_path / "memory.csv"
    rows = bench.run(["memory", f"model={tiny_clip_config}", "batch_size=2", "methods=[adamw]", f"out={out}"])
    assert rows[0]["isolated"] is True
    n = sum(p.numel() for p in _tiny_clip().parameters())
    assert rows[0]["optimizer_state_bytes"] == 8 * n + 4 * rows[0]["parameter_tensors"]
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and "optimizer_state_bytes" in lines[0]
    assert "AdamW (backprop)" in capsys.readouterr().out


def test_clip_memory_script_is_a_thin_wrapper_over_the_library():
    import ast

    source = ROOT / "benchmarks" / "clip_memory.py"
    tree = ast.parse(source.read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "vleff.cli.training_memory" in imported
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert defined == {"main"}  # the measuring code lives in the library


def test_unwritable_save_fails_before_measuring(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    measured = []
    monkeypatch.setattr("vleff.profile.compare_models", lambda *a, **k: measured.append(1) or [])
    with pytest.raises(bench.BenchError, match=r"save=.*a_file/sub/bench.* cannot be written"):
        bench.run(
            [
                "model=vit_tiny_digits",
                "image_size=32",
                "batch_size=2",
                "repeats=1",
                "warmup=0",
                "progress=false",
                f"save={blocker}/sub/bench",
            ]
        )
    assert measured == []
    with pytest.raises(bench.BenchError, match="cannot be written"):
        bench.run(["memory", "methods=[adamw]", f"out={blocker}/memory.json"])


@pytest.mark.parametrize("how", ["env", "socket"])
def test_pretrained_without_network_says_so_at_once(how, monkeypatch):
    if how == "socket":  # no offline variable: the quick TCP probe finds no route
        import socket

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

        def refuse(*args, **kwargs):
            raise OSError("Network is unreachable")

        monkeypatch.setattr(socket, "create_connection", refuse)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(bench.BenchError, match="no network: pretrained weights cannot be downloaded") as err:
        bench.run(
            [
                "model=vit_small",
                "methods=[]",
                "batch_size=1",
                "repeats=1",
                "warmup=0",
                "progress=false",
                "pretrained=true",
                "memory=false",
            ]
        )
    assert time.perf_counter() - start < 20
    assert "pretrained=false" in str(err.value)
    assert ("HF_HUB_OFFLINE=1 is set" if how == "env" else "cannot reach huggingface.co:443") in str(err.value)
