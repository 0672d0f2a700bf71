"""vleff-train through Hydra: every config composes, a fast_dev_run trains and compares, bad input is clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from repo import ROOT

from vleff.cli.train import CONFIG_DIR, run

CONFIGS = Path(CONFIG_DIR)
GROUPS = ("model", "data", "trainer", "callbacks", "experiment")
FAST = [
    "trainer.fast_dev_run=true",
    "trainer.logger=false",
    "trainer.enable_checkpointing=false",
    "compare.repeats=1",
    "compare.batch_size=4",
]


def _compose(overrides, tmp_path=None):
    GlobalHydra.instance().clear()
    extra = [f"compare.save_dir={tmp_path}", f"trainer.default_root_dir={tmp_path}"] if tmp_path else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides) + extra, return_hydra_config=False)


def _options():
    for group in GROUPS:
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            yield group, path.stem


def test_top_level_configs_link_is_the_package_configs():
    assert (ROOT / "configs").resolve() == CONFIGS.resolve()


@pytest.mark.parametrize("group, option", list(_options()))
def test_every_config_composes(group, option, tmp_path):
    if group == "callbacks":
        override = f"callbacks=[{option}]"
    else:
        override = f"{group}={option}"
    cfg = _compose([override], tmp_path)
    # resolve everything except values the user must supply (???)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert container["model"]["_target_"] and container["data"]["_target_"]
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    for name, spec in (cfg.callbacks or {}).items():
        assert spec._target_.startswith("vleff.callbacks."), name


def test_fast_dev_run_trains_and_compares(tmp_path):
    cfg = _compose(FAST + ["data.batch_size=8"], tmp_path)
    result = run(cfg)
    names = [r["name"] for r in result["rows"]]
    assert names[0] == "baseline" and names[1].startswith("tome(r=8")
    assert result["rows"][1]["flops_ratio"] < 0.8
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result["rows"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["name"] == "baseline"
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.png").stat().st_size > 1000


def test_vit_tome_experiment_trains_with_merging(tmp_path):
    # constant r: a one-step fast_dev_run would still be inside the default linear warm-up (r=0)
    cfg = _compose(["experiment=vit_tome", "callbacks.tome.schedule=constant"] + FAST + ["data.batch_size=8"], tmp_path)
    result = run(cfg)
    names = [r["name"] for r in result["rows"]]
    assert names == ["baseline", "trained with tome"]
    assert result["rows"][1]["gflops_per_sample"] < result["rows"][0]["gflops_per_sample"]


def _cli(args, cwd, timeout=300):
    exe = Path(sys.executable).parent / "vleff-train"
    env = dict(os.environ, VLEFF_OUTPUT_DIR=str(cwd / "out"))
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_console_script_from_any_directory(tmp_path):
    proc = _cli(FAST + ["data.image_size=16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline" in proc.stdout and "tome" in proc.stdout
    assert (proc.stdout + proc.stderr).count("Seed set to 0") == 1  # Lightning's messages printed once under Hydra
    assert list((tmp_path / "out" / "train").glob("*/results.json"))


BAD_INPUT = [
    (["model.model=not_a_model"], "model 'not_a_model' is not known"),
    (["data.image_size=30"], "image_size=30 is not a positive multiple of the patch size 4"),
    (["data=image_folder", "data.root=/nonexistent/images"], "is not a directory"),
    (["+compare.methods.nope={}"], "method='nope' is not known"),
    (["+compare.methods.tome.ratio=3"], "compare.methods.tome: tome has no setting(s) ['ratio']"),
    (["data=nope"], "Could not find 'data/nope'"),
    (["model=nope"], "Could not find 'model/nope'"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_is_reported(args, message, tmp_path, monkeypatch, capfd):
    # Hydra's own entry point in this process (a console-script process per case costs ~12 s of
    # imports); the console script itself is checked once below.
    from vleff.cli.train import _hydra_main

    GlobalHydra.instance().clear()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLEFF_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "argv", ["vleff-train", *FAST, *args])
    with pytest.raises(SystemExit) as exit_info:
        _hydra_main()
    GlobalHydra.instance().clear()
    captured = capfd.readouterr()
    assert exit_info.value.code not in (0, None)
    assert message in captured.err + captured.out


def test_console_script_reports_bad_input_with_a_failing_exit_status(tmp_path):
    args, message = BAD_INPUT[0]
    proc = _cli(FAST + args, tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def test_blip_xattn_experiment_trains_only_the_cross_attention_and_the_itm_head(tmp_path):
    """``experiment=blip_xattn``: a BLIP matcher on the digits pairs, only Xattn's parameters move."""
    cfg = _compose(["experiment=blip_xattn", *FAST, "data.batch_size=4"], tmp_path)
    from hydra.utils import instantiate

    from vleff.methods.xattn import cross_attention_names

    module = instantiate(cfg.model)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    datamodule = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, callbacks=[instantiate(cfg.callbacks.xattn)])
    trainer.fit(module, datamodule)
    moved = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    expected = {f"model.{n}" for n in cross_attention_names(module.model)} | {
        "model.itm_head.weight",
        "model.itm_head.bias",
    }
    assert moved == expected
