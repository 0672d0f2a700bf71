"""One row per registered method: the settings every generic test runs it with.

The conformance suite (``tests/conformance``) and the Lightning rules
(``tests/lightning/test_callback_rules.py``) read their per-method cases from these rows and from
the registry entry; a new method adds its row here and edits no other test's table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import tiny_lightning as tl
import torch


@dataclass(frozen=True)
class Settings:
    """One method's row: settings that change nothing, settings that act, refusals.

    ``noop=None``: the method has no setting that leaves the function unchanged (reversible
    blocks run another network); the no-op equality is skipped, ``remove`` is still checked.
    """

    noop: dict[str, Any] | None
    active: dict[str, Any]
    refusals: list[tuple[dict[str, Any], str]]
    state_prefix: str | None = None  # state_dict keys the method adds start with ...<prefix>
    callback_args: dict[str, Any] = field(default_factory=dict)
    #: methods that start exactly at the library (zero-initialised side heads: VQT) act only once
    #: trained; ``activate(model)`` gives their new parameters non-zero values for the "active" checks
    activate: Callable[[torch.nn.Module], None] | None = None
    #: the families the method supports (``None``: every family with a tower it declares); the
    #: others must be refused with ``TypeError`` naming what is supported
    families: tuple[str, ...] | None = None
    #: host methods: the host models (``host_families.HOSTS``) they act on instead of towers
    hosts: tuple[str, ...] | None = None
    #: ``fit() -> (LightningModule, DataLoader)`` for the resume check (default: the tiny ViT classifier)
    fit: Callable[[], tuple[pl.LightningModule, Any]] | None = None
    #: ``torch.compile`` traces the method in one graph (``False``: data-dependent token counts, as
    #: MADTP's per-sample thresholds, break the graph; compiled must still equal eager)
    fullgraph: bool = True
    #: ``(pattern, replacement)`` regex rules mapping a key of the applied model's ``state_dict``
    #: back to the library's key, for methods that move existing state (``peft`` wraps a module:
    #: ``qkv.weight`` -> ``qkv.base_layer.weight``); the renamed entries must hold the library's values
    renamed_keys: tuple[tuple[str, str], ...] = ()
    #: ``(library keys, new keys)`` regexes for state a method stores in another form (QLoRA's 4-bit
    #: weights: ``qkv.weight`` becomes ``qkv.base_layer.nf4_*`` buffers): those library keys may be
    #: gone and those new keys need not start with ``state_prefix``
    replaced_keys: tuple[str, str] | None = None
    #: the method runs under the library's gradient checkpointing (its hooks replay a block exactly,
    #: or it adds plain modules): checked to give the gradients of the same model without it, with
    #: non-re-entrant and (where the library offers it) re-entrant checkpointing, instead of refused
    grad_checkpointing: bool = False
    #: ``torch.export`` (and ONNX) take the applied model at inference (``False``: data-dependent
    #: token counts; the method must refuse export naming it)
    exportable: bool = True
    #: with ``grad_checkpointing``: also under re-entrant checkpointing (``False``: the method hands
    #: gradients out of the blocks through the token state, and refuses re-entrant checkpointing)
    reentrant: bool = True
    #: settings of an earlier application that the callback (built from ``callback_args``) must
    #: refuse, naming the setting they differ in (``None``: the method has no callback)
    applied_other: dict[str, Any] | None = None
    #: the callback's settings for the Lightning rule checks where they differ from
    #: ``callback_args`` (a schedule that reaches its target at once, so fit and validate run one
    #: function)
    rules_args: dict[str, Any] | None = None
    #: the method changes no forward (selective methods choose what trains): the "active" check then
    #: asserts the applied forward *equals* the library exactly, and that the method acts on training
    #: instead (``acts(model, library_flags)``; default: the ``requires_grad`` flags differ)
    forward_unchanged: bool = False
    acts: Callable[[torch.nn.Module, dict[str, bool]], bool] | None = None
    #: ``inputs(model, tower) -> dict``: data the method's ``apply`` takes besides its settings, built
    #: for the model at hand (LoRAHub's LoRA modules, which must fit the model's targets); merged into
    #: every generic ``apply`` call of the conformance suite and the Lightning rules
    inputs: Callable[[torch.nn.Module, str], dict[str, Any]] | None = None


def _randomize(model: torch.nn.Module, selected: Callable[[str, torch.nn.Parameter], bool]) -> None:
    """Seeded ``N(0, 0.1²)`` values for the parameters ``selected(name, p)`` picks: methods that
    start exactly at the library (a zero-initialised output projection) act only once trained."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if selected(name, p):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _perturb_vqt(model: torch.nn.Module) -> None:
    """VQT's head projection starts at zero (the model starts at the frozen model); random
    values make the query path reach the output."""
    _randomize(model, lambda name, p: "vleff_vqt.proj" in name)


def _perturb_side_up(model: torch.nn.Module) -> None:
    """LST's and UniPT's ``Up`` start at zero (the model starts at the frozen model); random
    values make the side network reach the output."""
    _randomize(model, lambda name, p: ("vleff_lst.up" in name or "vleff_unipt.up" in name) and p.dim() == 2)


def _perturb_adapters(model: torch.nn.Module) -> None:
    """The bottleneck adapters' up-projections start at zero (the model starts at the frozen
    model); random values make the adapters reach the output."""
    _randomize(model, lambda name, p: "_adapter." in name and ".up." in name)


def _masked_entries(model: torch.nn.Module) -> bool:
    """A selective method with entry masks (FishMask, Child-Tuning) acts: it masks some parameters."""
    from vleff.side.selection import record_of

    record = record_of(model)
    return record is not None and bool(record["masked"])


SIDE_FAMILIES = ("timm_vit", "timm_registers", "open_clip", "open_clip_unequal", "hf_clip")


def _perturb_lora(model: torch.nn.Module) -> None:
    """LoRA's ``B`` starts at zero (the model starts at the frozen model); random values make
    the adapters reach the output."""
    _randomize(model, lambda name, p: ".lora_B." in name)


def _perturb_peft(prefix: str) -> Callable[[torch.nn.Module], None]:
    """A ``peft`` tuner starts exactly at the frozen model (DoRA's ``B`` zero, IA3's vectors one,
    AdaLoRA's singular values zero): random adapter values make it reach the output."""
    return lambda model: _randomize(model, lambda name, p: prefix in name)


PEFT_FAMILIES = ("timm_vit", "deit_distilled", "timm_registers", "hf_clip")


def _perturb_memvp(model: torch.nn.Module) -> None:
    """MemVP's value offset starts at zero and its projector output is x0.01: random offsets and
    a larger projector make the memory read reach the output."""
    from vleff.side.memvp import memvp_module

    module = memvp_module(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.value_offset.copy_(torch.randn(module.value_offset.shape, generator=g))
        module.projector[2].weight.mul_(50.0)


def _lorahub_modules(model: torch.nn.Module, tower: str = "all") -> dict[str, Any]:
    """Two rank-2 LoRA modules of ``model``'s ``tower`` as vleff's LoRA saves them (keys
    ``<target>.lora_A.default.weight`` ...), seeded random factors standing in for trained ones and
    built from the target shapes alone (the model may carry another method). A model LoRA cannot
    target gets placeholder modules: LoRAHub must refuse the model itself, before reading them."""
    from vleff.methods.lora import lora_targets

    try:
        targets = lora_targets(model, tower)
    except TypeError:
        fake = {"x.lora_A.default.weight": torch.zeros(2, 4), "x.lora_B.default.weight": torch.zeros(4, 2)}
        return {"modules": [fake, fake]}

    def library(path: str) -> torch.nn.Module:  # the library's module under a peft layer (an earlier apply)
        module = model.get_submodule(path)
        while hasattr(module, "base_layer"):
            module = module.base_layer
        return module

    shapes = {name: tuple(library(name).weight.shape) for name in targets["target_modules"]}
    for name in targets["target_parameters"]:
        path, _, attr = name.rpartition(".")
        shapes[path] = tuple(getattr(library(path), attr).shape)
    modules = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        module = {}
        for path, (out, inp) in shapes.items():
            module[f"{path}.lora_A.default.weight"] = torch.randn(2, inp, generator=g) * 0.1
            module[f"{path}.lora_B.default.weight"] = torch.randn(out, 2, generator=g) * 0.1
        modules.append(module)
    return {"modules": modules}


def _lorahub_callback_args(**settings: Any) -> dict[str, Any]:
    """The callback's arguments on the tiny timm ViT (the rules' model and ``TinyClassifier``'s)."""
    import tiny_models as tm

    return {**_lorahub_modules(tm.timm_vit(), "image"), **settings}


def _memvp_fit() -> tuple[pl.LightningModule, Any]:
    """A tiny Llama VisionLanguageModel on four digits "which digit is this?" samples."""
    import host_families
    from torch.utils.data import DataLoader, TensorDataset

    from vleff.data.digits import digits_arrays
    from vleff.data.digits_vlm import VOCAB, digit_text_batch
    from vleff.models.vlm_task import VisionLanguageTask

    images, digits = digits_arrays(32, "train")
    ids, labels = digit_text_batch("qa", digits[:4])
    loader = DataLoader(TensorDataset(images[:4], ids, labels, digits[:4]), batch_size=4)
    return VisionLanguageTask(host_families.vlm("llama", "timm", vocab=len(VOCAB)), "qa"), loader


SETTINGS: dict[str, Settings] = {
    "tome": Settings(
        noop={"r": 0},
        active={"r": 2},
        refusals=[
            ({"r": -1}, "r=-1"),
            ({"r": float("nan")}, "r=nan"),
            ({"prop_attn": 1}, "prop_attn"),
            ({"towers": "audio"}, "towers"),
            ({"trace_source": "yes"}, "trace_source"),
        ],
        callback_args={"r": 2},
        applied_other={"r": 2, "prop_attn": False},
        grad_checkpointing=True,
    ),
    # ToMe plus the class token's attention; the tiny towers' 17 tokens are under the official
    # r_threshold of 40, so the active row merges from any length. On text towers padding (which the
    # EOT never attends to) ranks first, so r=6 also merges real tokens of the tiny captions
    "turbo": Settings(
        noop={"r": 0},
        active={"r": 6, "alpha": 5.0, "r_threshold": 0},
        refusals=[
            ({"r": -1}, "r=-1"),
            ({"alpha": -1}, "alpha"),
            ({"beta": 0}, "beta"),
            ({"r_threshold": -1}, "r_threshold"),
            ({"towers": "audio"}, "towers"),
        ],
        callback_args={"r": 2, "r_threshold": 0},
        applied_other={"r": 2, "r_threshold": 0, "alpha": 1.0},
        grad_checkpointing=True,
    ),
    # per-sample early exit: threshold -1 exits every sample after its first block (in eval; MuE exits
    # only at inference; 0 would not on the tiny open_clip text tower, whose first block turns its
    # input's direction). Which samples run a block depends on the data: compile breaks graphs, export refuses
    "mue": Settings(
        noop={"image_threshold": 1.0, "text_threshold": 1.0},
        active={"image_threshold": -1.0, "text_threshold": -1.0},
        refusals=[
            ({"image_threshold": -1.5}, "image_threshold=-1.5"),
            ({"image_threshold": 1.5}, "image_threshold=1.5"),
            ({"text_threshold": float("nan")}, "text_threshold=nan"),
            ({"decoder_threshold": 1.5}, "decoder_threshold=1.5"),
            ({"decoder_max_length": 0}, "decoder_max_length=0"),
            ({"towers": "audio"}, "towers"),
        ],
        callback_args={"image_threshold": 0.9},
        applied_other={"image_threshold": 0.5},
        grad_checkpointing=True,
        fullgraph=False,
        exportable=False,
    ),
    "evit": Settings(
        noop={"keep_rate": 1.0, "locations": [0]},
        active={"keep_rate": 0.5, "locations": [0]},
        refusals=[
            ({"keep_rate": 0}, "keep_rate"),
            ({"keep_rate": 1.5}, "keep_rate"),
            ({"locations": [2, 1]}, "locations"),
            ({"fuse": "no"}, "fuse"),
            ({"towers": "audio"}, "towers"),
        ],
        callback_args={"keep_rate": 0.5, "locations": [0], "end_epoch": 4},
        applied_other={"keep_rate": 0.5, "locations": [1]},
        rules_args={"keep_rate": 0.5, "locations": [0], "end_epoch": 0},
        grad_checkpointing=True,
    ),
    "dynamicvit": Settings(
        noop={"keep_ratios": [1.0], "locations": [1], "distill": False},
        active={"rho": 0.5, "locations": [1], "distill": False},
        refusals=[
            ({"rho": 0}, "rho"),
            ({"keep_ratios": [0.5, 0.7]}, "non-increasing"),
            ({"kl_weight": -1}, "kl_weight"),
            ({"eval_mode": "soft"}, "eval_mode"),
            ({"logits_fn": 3}, "logits_fn"),
            ({"distill": 1}, "distill"),
        ],
        state_prefix="vleff_dynamicvit.",
        callback_args={"rho": 0.5, "locations": [1]},
        applied_other={"rho": 0.7, "locations": [1], "distill": False},
        rules_args={"rho": 0.5, "locations": [1], "distill": False},
        grad_checkpointing=True,
        reentrant=False,
    ),
    # Transkimmer: the ±5 initial biases skim nothing at inference (no-op = defaults, bit-exact);
    # init_bias=-5 makes the untrained predictors skim
    "transkimmer": Settings(
        noop={},
        active={"init_bias": -5.0},
        refusals=[
            ({"skim_coefficient": -1}, "skim_coefficient"),
            ({"init_bias": float("nan")}, "init_bias"),
            ({"tau": 0}, "tau"),
            ({"locations": [2, 1]}, "locations"),
            ({"eval_mode": "soft"}, "eval_mode"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_transkimmer.",
        callback_args={"skim_coefficient": 0.5},
        applied_other={"init_bias": -5.0, "tau": 0.5},
        rules_args={"init_bias": -5.0},
        fullgraph=False,
        exportable=False,
        grad_checkpointing=True,
        reentrant=False,
    ),
    "galore": Settings(
        noop={},
        active={"rank": 4},
        refusals=[
            ({"rank": 0}, "rank"),
            ({"scale": float("inf")}, "scale"),
            ({"proj_type": "up"}, "proj_type"),
            ({"targets": "("}, "targets"),
        ],
        callback_args={"rank": 4, "update_proj_gap": 3},
    ),
    "mezo": Settings(
        noop={},
        active={"eps": 1e-3},
        refusals=[
            ({"eps": 0}, "eps"),
            ({"lr": float("inf")}, "lr"),
            ({"seed": -1}, "seed"),
            ({"params": "("}, "params"),
        ],
        callback_args={"eps": 1e-3, "lr": 1e-3},
    ),
    # VQT reads each block's K/V of the full frozen stream: token reduction (which changes them) is refused
    "vqt": Settings(
        noop={"num_queries": 1},
        active={"num_queries": 2},
        refusals=[
            ({"num_queries": 0}, "num_queries"),
            ({"num_queries": 1.5}, "num_queries"),
            ({"dropout": 1.0}, "dropout"),
            ({"towers": "text"}, "towers"),
        ],
        state_prefix="vleff_vqt.",
        callback_args={"num_queries": 1},
        applied_other={"num_queries": 2},
        activate=_perturb_vqt,
        families=("timm_vit", "timm_registers", "open_clip", "open_clip_unequal", "hf_clip"),
        grad_checkpointing=True,
        reentrant=False,
    ),
    # prompt methods: learned keys/values in front of every block's attention (vleff.side.prompts);
    # no setting leaves the function unchanged (at least one prompt), the seam reaches every tower
    "vpt": Settings(
        noop=None,
        active={"num_tokens": 3},
        refusals=[
            ({"num_tokens": 0}, "num_tokens"),
            ({"num_tokens": 1.5}, "num_tokens"),
            ({"dropout": 1.0}, "dropout"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_vpt.",
        callback_args={"num_tokens": 2},
        applied_other={"num_tokens": 3},
        grad_checkpointing=True,
    ),
    "prefix": Settings(
        noop=None,
        active={"num_tokens": 3},
        refusals=[
            ({"num_tokens": 0}, "num_tokens"),
            ({"dropout": 1.0}, "dropout"),
            ({"projection": -1}, "projection"),
            ({"projection": 2.5}, "projection"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_prefix.",
        callback_args={"num_tokens": 2, "dropout": 0.0},  # no dropout draws: resumed = uninterrupted
        applied_other={"num_tokens": 3},
        grad_checkpointing=True,
    ),
    "aprompt": Settings(
        noop=None,
        active={"kv_tokens": 2, "num_tokens": 2},
        refusals=[
            ({"kv_tokens": 0}, "kv_tokens"),
            ({"num_tokens": -1}, "num_tokens"),
            ({"dropout": 1.0}, "dropout"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_aprompt.",
        callback_args={"kv_tokens": 2, "num_tokens": 1},
        applied_other={"kv_tokens": 3},
        grad_checkpointing=True,
    ),
    # bottleneck adapters on the branch seam (vleff.side.bottleneck): they start exactly at the
    # frozen model (zero up-projection), so no setting acts before training; the seam reaches every tower
    "serial_adapter": Settings(
        noop=None,
        active={"bottleneck": 4},
        refusals=[
            ({"bottleneck": 0}, "bottleneck"),
            ({"bottleneck": 2.5}, "bottleneck"),
            ({"init_std": 0.0}, "init_std"),
            ({"train_norms": "yes"}, "train_norms"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_serial_adapter.",
        callback_args={"bottleneck": 2},
        applied_other={"bottleneck": 4},
        activate=_perturb_adapters,
        grad_checkpointing=True,
    ),
    "parallel_adapter": Settings(
        noop=None,
        active={"bottleneck": 4},
        refusals=[
            ({"bottleneck": 0}, "bottleneck"),
            ({"scale": float("nan")}, "scale"),
            ({"dropout": 1.0}, "dropout"),
            ({"reads": "output"}, "reads"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_parallel_adapter.",
        callback_args={"bottleneck": 2, "dropout": 0.0},  # no dropout draws: resumed = uninterrupted
        applied_other={"bottleneck": 4},
        activate=_perturb_adapters,
        grad_checkpointing=True,
    ),
    # selective methods add nothing and change no forward: they choose what trains
    "bitfit": Settings(
        noop=None,
        active={"train_head": True},
        refusals=[({"train_head": "yes"}, "train_head"), ({"towers": "audio"}, "towers")],
        callback_args={"train_head": True},
        applied_other={"train_head": False},
        grad_checkpointing=True,
        forward_unchanged=True,
    ),
    "fishmask": Settings(
        noop=None,
        active={"keep_ratio": 0.1},
        refusals=[
            ({"keep_ratio": 0}, "keep_ratio"),
            ({"keep_ratio": 1.5}, "keep_ratio"),
            ({"fisher_batches": 0}, "fisher_batches"),
            ({"per_sample": "yes"}, "per_sample"),
            ({"towers": "audio"}, "towers"),
        ],
        callback_args={"keep_ratio": 0.1, "fisher_batches": 1},
        applied_other={"keep_ratio": 0.2},
        grad_checkpointing=True,
        forward_unchanged=True,
        acts=lambda model, flags: _masked_entries(model),
    ),
    # Child-Tuning: nothing frozen, nothing added; the gradients are masked (a regulariser)
    "child_tuning_f": Settings(
        noop=None,
        active={"reserve_p": 0.5},
        refusals=[
            ({"reserve_p": 0}, "reserve_p"),
            ({"reserve_p": 1.5}, "reserve_p"),
            ({"reserve_p": float("nan")}, "reserve_p"),
            ({"seed": -1}, "seed"),
            ({"towers": "audio"}, "towers"),
        ],
        callback_args={"reserve_p": 0.5},
        applied_other={"reserve_p": 0.3},
        grad_checkpointing=True,
        forward_unchanged=True,
        acts=lambda model, flags: _masked_entries(model),
    ),
    "child_tuning_d": Settings(
        noop=None,
        active={"reserve_p": 0.3},
        refusals=[
            ({"reserve_p": 0}, "reserve_p"),
            ({"reserve_p": 1.01}, "reserve_p"),
            ({"max_grad_norm": 0}, "max_grad_norm"),
            ({"fisher_batches": 0}, "fisher_batches"),
            ({"towers": "audio"}, "towers"),
        ],
        callback_args={"reserve_p": 0.3, "fisher_batches": 1},
        applied_other={"reserve_p": 0.5},
        grad_checkpointing=True,
        forward_unchanged=True,
        acts=lambda model, flags: _masked_entries(model),
    ),
    # cross-attention only: BLIP's text models (the image towers and ViT / CLIP have none: refused)
    "xattn": Settings(
        noop=None,
        active={"train_norms": True},
        refusals=[
            ({"train_norms": "yes"}, "train_norms"),
            ({"train_head": 1}, "train_head"),
            ({"text_models": "both"}, "text_models"),
            ({"towers": "image"}, "towers"),
        ],
        callback_args={"train_norms": True},
        applied_other={"train_norms": False},
        families=("hf_blip",),
        fit=lambda: (tl.TinyBLIP(), tl.blip_loader(4, seed=1)),
        grad_checkpointing=True,
        forward_unchanged=True,
    ),
    # side networks read every block's output of the full stream: token reduction is refused
    "lst": Settings(
        noop={"reduction": 4},
        active={"reduction": 2},
        refusals=[
            ({"reduction": 0}, "reduction"),
            ({"reduction": 2.5}, "reduction"),
            ({"side_heads": 0}, "side_heads"),
            ({"init": "random"}, "init"),
            ({"temperature": 0}, "temperature"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_lst.",
        callback_args={"reduction": 4},
        applied_other={"reduction": 2},
        activate=_perturb_side_up,
        families=SIDE_FAMILIES,
        grad_checkpointing=True,
    ),
    "unipt": Settings(
        noop={"factor": 2},
        active={"factor": 1},
        refusals=[({"factor": 0}, "factor"), ({"factor": 1.5}, "factor"), ({"towers": "audio"}, "towers")],
        state_prefix="vleff_unipt.",
        callback_args={"factor": 2},
        applied_other={"factor": 1},
        activate=_perturb_side_up,
        families=SIDE_FAMILIES,
        grad_checkpointing=True,
    ),
    # peft LoRA on the attention input projections: plain modules, so it stacks with tower hooks on timm
    # and HF CLIP; on open_clip a tower hook's generic block reads in_proj_weight without peft's
    # substitution: refused both ways (CrossGET and MADTP meet LoRA on open_clip first)
    "lora": Settings(
        noop={"r": 2},
        active={"r": 2, "alpha": 8.0},
        activate=_perturb_lora,
        refusals=[
            ({"r": 0}, "r=0"),
            ({"r": 1.5}, "r=1.5"),
            ({"alpha": 0}, "alpha=0"),
            ({"alpha": float("nan")}, "alpha"),
            ({"dropout": 1.0}, "dropout"),
            ({"train_head": "yes"}, "train_head"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="lora_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        callback_args={"r": 2},
        applied_other={"r": 4},
        families=("timm_vit", "deit_distilled", "timm_registers", "open_clip", "open_clip_unequal", "hf_clip"),
        grad_checkpointing=True,
    ),
    # peft tuners beyond LoRA (DoRA, IA3, AdaLoRA): open_clip's bare in_proj_weight is reachable only
    # by peft's LoRA ParamWrapper, so they refuse open_clip (and BLIP), naming what is supported
    "dora": Settings(
        noop={"r": 2},
        active={"r": 2, "alpha": 8.0},
        activate=_perturb_peft(".lora_B."),
        refusals=[
            ({"r": 0}, "r=0"),
            ({"r": 1.5}, "r=1.5"),
            ({"alpha": 0}, "alpha=0"),
            ({"dropout": 1.0}, "dropout"),
            ({"train_head": "yes"}, "train_head"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="lora_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        callback_args={"r": 2},
        applied_other={"r": 4},
        families=PEFT_FAMILIES,
        grad_checkpointing=True,
        # peft's DoRA layer asks whether the weight is quantized (a str.startswith dynamo does not
        # trace): 8 graph breaks on the tiny ViT; the compiled model still equals eager
        fullgraph=False,
    ),
    # QLoRA: a 4-bit NF4 base changes the function (no no-op setting); every Linear of the blocks, so
    # open_clip's bare MultiheadAttention parameters are refused; the tiny towers' weights (64 x 64 = 64
    # NF4 blocks) need double-quantisation blocks of 64 (the paper's 256 on ViT-B)
    "qlora": Settings(
        noop=None,
        active={"r": 2, "alpha": 8.0, "scaler_block_size": 64},
        activate=_perturb_peft(".lora_B."),
        refusals=[
            ({"r": 0}, "r=0"),
            ({"alpha": 0}, "alpha=0"),
            ({"block_size": 63}, "block_size=63"),
            ({"scaler_block_size": 0}, "scaler_block_size=0"),
            ({"keep_original": "no"}, "keep_original"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="lora_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        replaced_keys=(r"\.(qkv|proj|fc1|fc2|[qkv]_proj|out_proj)\.weight$", r"\.nf4_"),
        callback_args={"r": 2, "scaler_block_size": 64},
        applied_other={"r": 4, "scaler_block_size": 64},
        families=PEFT_FAMILIES,
        grad_checkpointing=True,
    ),
    "ia3": Settings(
        noop={},
        active={"mlp": True},
        activate=_perturb_peft(".ia3_l."),
        refusals=[({"mlp": "yes"}, "mlp"), ({"train_head": 1}, "train_head"), ({"towers": "audio"}, "towers")],
        state_prefix="ia3_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        callback_args={"mlp": True},
        applied_other={"mlp": False},
        families=PEFT_FAMILIES,
        grad_checkpointing=True,
    ),
    "adalora": Settings(
        noop={"init_r": 2, "target_r": 1, "total_step": 4},
        active={"init_r": 2, "target_r": 1, "total_step": 4, "alpha": 4.0},
        activate=_perturb_peft(".lora_"),
        refusals=[
            ({"init_r": 0}, "init_r=0"),
            ({"init_r": 2, "target_r": 3}, "target_r=3"),
            ({"total_step": 0}, "total_step=0"),
            ({"total_step": 4, "tinit": 4}, "tinit=4"),
            ({"beta1": 1.0}, "beta1"),
            ({"orth_reg_weight": -1}, "orth_reg_weight"),
            ({"delta_t": 0}, "delta_t"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix=".default",  # peft's adapter name: lora_A/B/E.default and the ranknum.default buffer
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        callback_args={"init_r": 2, "target_r": 1, "total_step": 4},
        applied_other={"init_r": 3, "target_r": 1, "total_step": 4},
        families=PEFT_FAMILIES,
        grad_checkpointing=True,
    ),
    "lokr": Settings(
        noop={"r": 2},
        active={"r": 2, "alpha": 4.0},
        activate=_perturb_peft(".lokr_w1."),  # peft starts W1 at zero
        refusals=[
            ({"r": 0}, "r=0"),
            ({"alpha": 0}, "alpha=0"),
            ({"train_head": "yes"}, "train_head"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="lokr_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        callback_args={"r": 2},
        applied_other={"r": 4},
        families=PEFT_FAMILIES,
        grad_checkpointing=True,
        fullgraph=False,  # peft's LoKr layer draws its module dropout with torch.rand (as LoHa's)
    ),
    "oft": Settings(
        noop={"block_size": 16},
        active={"block_size": 16, "coft": False},
        activate=_perturb_peft(".oft_R."),
        refusals=[
            ({"block_size": 1}, "block_size=1"),
            ({"eps": 0}, "eps=0"),
            ({"cayley_neumann": "no"}, "cayley_neumann"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="oft_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        callback_args={"block_size": 16},
        applied_other={"block_size": 32},
        families=PEFT_FAMILIES,
        grad_checkpointing=True,
        fullgraph=False,
    ),
    "loha": Settings(
        noop={"r": 2},
        active={"r": 2, "alpha": 4.0},
        activate=_perturb_peft(".hada_w2_b."),
        refusals=[
            ({"r": 0}, "r=0"),
            ({"r": 1.5}, "r=1.5"),
            ({"alpha": 0}, "alpha=0"),
            ({"train_head": "yes"}, "train_head"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="hada_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        callback_args={"r": 2},
        applied_other={"r": 4},
        families=PEFT_FAMILIES,
        grad_checkpointing=True,
        # peft's LoHa layer branches on torch.rand(1) > module_dropout (its module dropout, drawn even
        # when it is 0): 6 graph breaks on the tiny ViT; the compiled model still equals eager
        fullgraph=False,
    ),
    # LoRAHub composes given LoRA modules (its row's inputs build them for each model) into peft LoRA
    # layers: w = 0 is the base model; the active weights need no search (the search, which needs
    # examples, is the method's own tests' and the callback's: a budget-3 search on TinyClassifier data)
    "lorahub": Settings(
        noop={"weights": (0.0, 0.0)},
        active={"weights": (1.0, -0.5)},
        refusals=[
            ({"budget": 0}, "budget=0"),
            ({"budget": 2.5}, "budget=2.5"),
            ({"l1": -1}, "l1=-1"),
            ({"bound": 0}, "bound=0"),
            ({"alpha": 0}, "alpha=0"),
            ({"seed": -1}, "seed=-1"),
            ({"weights": ()}, "weights"),
            ({"weights": (1.0, float("inf"))}, r"weights[1]=inf"),
            ({"train_head": "yes"}, "train_head"),
        ],
        state_prefix="lora_",
        renamed_keys=((r"(\.base_layer)+\.", "."),),
        inputs=_lorahub_modules,
        callback_args=_lorahub_callback_args(examples=[next(iter(tl.loader(8, batch_size=8, seed=2)))], budget=3),
        rules_args=_lorahub_callback_args(weights=(0.5, 1.0)),
        applied_other={"weights": (1.0, 0.5)},
        families=("timm_vit", "deit_distilled", "timm_registers", "open_clip", "open_clip_unequal", "hf_clip"),
        grad_checkpointing=True,
    ),
    "reversible": Settings(
        noop=None,
        active={"coupling": "meft"},  # with its adapters
        refusals=[
            ({"coupling": "revnet"}, "coupling='revnet'"),
            ({"lam": 0}, "lam=0"),
            ({"beta": -1}, "beta=-1"),
            ({"lam": float("inf")}, "lam=inf"),
            ({"adapter": -1}, "adapter=-1"),
            ({"adapter": 2.5}, "adapter"),
        ],
        state_prefix="vleff_reversible.",
        callback_args={"coupling": "meft"},
        applied_other={"coupling": "revvit"},
        families=("timm_vit", "deit_distilled", "timm_registers", "open_clip", "open_clip_unequal", "hf_clip"),
    ),  # tower hooks do not run in the stack
    # MemVP acts on a vision-language host (the LM's FFNs), not on one tower
    "memvp": Settings(
        noop={"n_mem": 20, "scale": 0.0},
        active={"n_mem": 20, "scale": 0.5, "vision_adapter_dim": 4},
        refusals=[
            ({"n_mem": 0}, "n_mem"),
            ({"scale": -1}, "scale=-1"),
            ({"scale": float("nan")}, "scale"),
            ({"dropout": 1.0}, "dropout"),
            ({"visual_tokens": "cls"}, "visual_tokens"),
            ({"projector_scale": 0}, "projector_scale"),
            ({"visual_dim": 0}, "visual_dim"),
            ({"vision_adapter_dim": -1}, "vision_adapter_dim"),
        ],
        state_prefix="vleff_memvp.",
        callback_args={"n_mem": 16},
        applied_other={"n_mem": 24},
        activate=_perturb_memvp,
        # both host kinds; GPT-2, open_clip and HF CLIP hosts run the same checks in test_memvp.py
        hosts=("hf_blip_captioning", "hf_blip_vqa", "vlm_llama_timm"),
        fit=_memvp_fit,
    ),
    # CrossGET needs both towers of an image-text pair; its cross token and merges own the towers' tokens
    "crossget": Settings(
        noop={"r_image": 0, "r_text": 0},
        active={"r_image": 2, "r_text": 4},
        refusals=[
            ({"r_image": -1}, "r_image=-1"),
            ({"r_text": 1.5}, "r_text=1.5"),
            ({"prop_attn": 1}, "prop_attn"),
            ({"loss_weight": -1}, "loss_weight"),
            ({"loss_weight": float("nan")}, "loss_weight"),
        ],
        state_prefix="vleff_crossget_offsets",
        callback_args={"r_image": 2, "r_text": 4},
        applied_other={"r_image": 4, "r_text": 4},
        families=("open_clip", "open_clip_unequal", "hf_clip", "hf_blip"),
        fit=lambda: (tl.TinyCLIP(), tl.pair_loader(4, seed=1)),
        grad_checkpointing=True,
        reentrant=False,
    ),
    # MADTP needs both towers of an image-text model (single-tower families are refused)
    "madtp": Settings(
        noop={"locations": []},
        active={"tau": 1e3},
        refusals=[
            ({"flops_reduction": 0}, "flops_reduction=0"),
            ({"flops_reduction": 1.0}, "flops_reduction=1.0"),
            ({"tau": 0}, "tau=0"),
            ({"num_codes": 0}, "num_codes"),
            ({"ragged": "min"}, "ragged"),
            ({"locations": [2, 1]}, "locations"),
            ({"towers": "audio"}, "towers"),
        ],
        state_prefix="vleff_madtp.",
        families=("open_clip", "open_clip_unequal", "hf_clip", "hf_blip"),
        fullgraph=False,
        grad_checkpointing=True,
        reentrant=False,
        callback_args={"flops_reduction": 0.3},
        applied_other={"flops_reduction": 0.3, "num_codes": 8},
        fit=lambda: (tl.TinyCLIP(), tl.pair_loader(4, seed=1)),
        exportable=False,
    ),
}
