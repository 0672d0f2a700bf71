"""The prepared GPU run (``benchmarks/gpu_suite.py``) in its CPU dry-run mode: every kind of job runs
end to end on tiny shapes, results are written after each job, a failing job does not stop the run,
the time budget skips jobs, and split runs merge into one file."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from repo import ROOT

from vleff.cli import bench


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_suite", None)


# one job of each runner: the others differ from these only in their settings (the image-text
# pair path of speed mode, CrossGET and MADTP, is tested in test_bench_cli.py on a whole CLIP)
DRY_JOBS = ("env", "kernels_vit_l384", "speed_vit_b16_compiled", "memory_side_clip_b32", "memory_clip")


@pytest.mark.slow
def test_dry_run_writes_every_job(suite, tmp_path):
    result = suite.run_suite("cpu", tiny=True, out=tmp_path, budget_s=1e9, only=DRY_JOBS, command="test")
    assert [j["name"] for j in result["jobs"]] == [
        j.name for j in suite.jobs("cpu", True, tmp_path) if j.name in DRY_JOBS
    ]
    for job in result["jobs"]:
        assert job["status"] == "ok", (job["name"], job.get("traceback"))
        assert job["rows"], job["name"]
    jobs = {j["name"]: j for j in result["jobs"]}

    env = jobs["env"]["rows"][0]
    assert env["matmul_tflops"] > 0 and env["copy_gb_s"] > 0

    kernels = jobs["kernels_vit_l384"]["rows"]
    assert {r["case"] for r in kernels} >= {"tome_match", "tome_merge", "galore_adam_step"}

    speed = jobs["speed_vit_b16_compiled"]["rows"]
    assert [r["name"].split("(")[0] for r in speed] == ["baseline", "tome", "evit", "dynamicvit"]
    for row in speed:
        assert row["flop_limit_fraction"] == pytest.approx(row["speedup"] * row["flops_ratio"])
        assert row["tflops"] == pytest.approx(row["gflops_per_sample"] * row["images_per_s"] / 1e3)
        assert row["of_matmul_peak"] == pytest.approx(row["tflops"] / env["matmul_tflops"])
        assert row["compile_s"] > 0
    assert speed[0]["flop_limit_fraction"] == pytest.approx(1.0)
    assert all(r["flops_ratio"] < 1 for r in speed[1:])

    side = jobs["memory_side_clip_b32"]["rows"]
    assert [r["method"] for r in side] == ["lst"] and side[0]["peak_mib"] > 0

    clip = {r["method"]: r for r in jobs["memory_clip"]["rows"]}
    assert clip["mezo"]["grad_bytes"] == 0 and clip["mezo"]["optimizer_state_bytes"] == 0
    assert clip["galore"]["optimizer_state_bytes"] < clip["adamw"]["optimizer_state_bytes"]

    on_disk = json.loads((tmp_path / f"{result['date']}.json").read_text())
    assert [j["name"] for j in on_disk["jobs"]] == list(jobs)
    text = (tmp_path / f"{result['date']}.md").read_text()
    for name in DRY_JOBS:
        assert f"## {name}:" in text
    assert "| tome(r=16) |" in text


def _fake_jobs(suite, calls):
    def ok(name):
        def run():
            calls.append(name)
            return [{"name": name, "value": 1.5}]

        return run

    def broken():
        calls.append("broken")
        raise RuntimeError("planted failure")

    return lambda device, tiny, scratch: [
        suite.Job("first", "first job", ok("first"), ("name", "value")),
        suite.Job("broken", "a job that fails", broken, ("name",)),
        suite.Job("last", "last job", ok("last"), ("name", "value")),
    ]


def test_a_failing_job_is_recorded_and_the_run_goes_on(suite, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(suite, "jobs", _fake_jobs(suite, calls))
    result = suite.run_suite("cpu", tiny=True, out=tmp_path, command="test")
    assert calls == ["first", "broken", "last"]
    status = {j["name"]: j["status"] for j in result["jobs"]}
    assert status == {"first": "ok", "broken": "failed", "last": "ok"}
    broken = result["jobs"][1]
    assert "planted failure" in broken["error"] and "RuntimeError" in broken["traceback"]
    text = (tmp_path / f"{result['date']}.md").read_text()
    assert "**failed**: RuntimeError: planted failure" in text and "| last | 1.5 |" in text


def test_jobs_past_the_budget_are_skipped_not_run(suite, tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(suite, "jobs", _fake_jobs(suite, calls))
    result = suite.run_suite("cpu", tiny=True, out=tmp_path, budget_s=-1.0, command="test")
    assert calls == []
    assert {j["status"] for j in result["jobs"]} == {"skipped"}


def test_unknown_job_names_are_refused(suite, tmp_path):
    with pytest.raises(SystemExit, match="unknown job.*nope.*jobs: env"):
        suite.run_suite("cpu", tiny=True, out=tmp_path, only=("nope",))


def test_split_runs_merge_into_one_file(suite, tmp_path):
    env = {
        "name": "env",
        "title": "env",
        "status": "ok",
        "seconds": 1.0,
        "rows": [{"device": "GPU X", "matmul_tflops": 500.0}],
    }
    speed = {
        "name": "speed_vit_b16",
        "title": "speed",
        "status": "ok",
        "seconds": 2.0,
        "rows": [{"name": "baseline", "tflops": 100.0, "of_matmul_peak": None}],
    }
    failed_then_ok = {"name": "speed_clip_b16", "title": "clip", "status": "failed", "error": "x"}
    first = {"date": "2026-01-01", "command": "a", "seconds": 3.0, "jobs": [env, failed_then_ok]}
    second = {
        "date": "2026-01-01",
        "command": "b",
        "seconds": 4.0,
        "jobs": [speed, {**failed_then_ok, "status": "ok", "rows": [{"name": "baseline"}]}],
    }
    paths = []
    for i, part in enumerate((first, second)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part))
    merged = suite.merge(paths, tmp_path / "out")
    jobs = {j["name"]: j for j in merged["jobs"]}
    assert merged["command"] == "a ; b" and merged["seconds"] == 7.0 and merged["device"] == "GPU X"
    assert jobs["speed_vit_b16"]["rows"][0]["of_matmul_peak"] == pytest.approx(0.2)  # the other run's ceiling
    assert jobs["speed_clip_b16"]["status"] == "ok"
    assert jobs["memory_clip"]["status"] == "not run"
    assert [j["name"] for j in merged["jobs"]] == [j.name for j in suite.jobs("cuda", False, tmp_path)]
    assert (tmp_path / "out" / "2026-01-01.md").is_file()


def test_committed_gpu_figures_are_a_real_cuda_run():
    """The figures in docs/data/gpu come from a CUDA device and carry their command."""
    files = sorted((ROOT / "docs" / "data" / "gpu").glob("20*.json"))
    assert files, "no GPU run committed"
    for path in files:
        result = json.loads(path.read_text())
        assert "tiny" not in path.stem and not result.get("tiny")
        assert "gpu_suite.py" in result["command"]
        env = next(j for j in result["jobs"] if j["name"] == "env")
        assert "H100" in env["rows"][0]["device"] or "H200" in env["rows"][0]["device"]


def test_bench_compile_setting(capsys):
    with pytest.raises(bench.BenchError, match="compile='nope' is not allowed.*inductor"):
        bench.run(["model=vit_tiny_digits", "compile=nope", "progress=false"])


def test_documented_gpu_figures_follow_the_committed_run():
    """The headline results, the kernels page and docs/gpu.md quote the H200 run: each quoted figure
    is recomputed from its JSON."""
    result = json.loads((ROOT / "docs" / "data" / "gpu" / "2026-12-04.json").read_text())
    jobs = {j["name"]: j for j in result["jobs"] if j["status"] == "ok"}
    speed = {r["name"].split("(")[0]: r for r in jobs["speed_vit_b16"]["rows"]}
    kernels = {(r["case"], r["backend"]): r for r in jobs["kernels_vit_l384"]["rows"]}
    clip = {r["method"]: r for r in jobs["memory_clip"]["rows"]}
    side = {r["method"]: r for r in jobs["memory_side_vit_b16"]["rows"]}
    readme = (ROOT / "docs" / "results.md").read_text()  # the README's former GPU paragraph
    kernel_page = (ROOT / "docs" / "methods" / "kernels.md").read_text()
    merge, merge_torch = kernels[("tome_merge", "triton")], kernels[("tome_merge", "torch")]
    page = (ROOT / "docs" / "gpu.md").read_text()
    quoted = {
        f"{speed['tome']['speedup']:.2f}× at {speed['tome']['flops_ratio']:.2f}× FLOPs": readme,
        f"{100 * speed['evit']['flop_limit_fraction']:.0f}–"
        f"{100 * speed['dynamicvit']['flop_limit_fraction']:.0f} %": readme,
        f"| ToMe merge | {merge_torch['ms']:.3f} | {merge['ms']:.3f} | {merge['speedup']:.2f}× |": kernel_page,
        f"**{kernels[('galore_project_back', 'triton')]['speedup']:.2f}×**": kernel_page,
        f"state −{100 * (1 - clip['galore']['optimizer_state_bytes_vs_adamw']):.0f} %": readme,
        f"LST −{100 * (1 - side['lst']['peak_vs_full']):.0f} %": readme,
        f"MeZO at {100 * clip['mezo']['training_bytes_vs_adamw']:.0f} %": readme,
        f"| {speed['dynamicvit']['images_per_s']:,.0f} |".replace(",", " "): page,
        f"{100 * (1 - side['lst']['peak_vs_full']):.1f} % less": page,
    }
    for text, where in quoted.items():
        assert text in where, text
