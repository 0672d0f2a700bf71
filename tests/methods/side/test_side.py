"""Side tuning beside a frozen backbone (LST, UniPT, and VQT where it applies): nothing of the
backbone is saved for backward (a check that fails once a backbone weight is unfrozen), UniPT
starts at the frozen model and computes the paper's formula, LST's side blocks are the backbone's
blocks with channels kept by importance, side-only state reproduces a trained model on a fresh
backbone, Lightning checkpoints hold only the side state, 2-process DDP, clear refusals."""

from __future__ import annotations

import os
from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from families import FAMILIES
from method_rows import _lorahub_modules
from vleff.side.lst import apply_lst, choose_side_heads, fisher_information, lst_gate_values, remove_lst
from vleff.side.unipt import apply_unipt, remove_unipt
from vleff.side.vqt import apply_vqt

import vleff
from vleff.backbones import TowerHook, find_towers, patch_tower, unpatch_tower
from vleff.side import common

SIDE_CASES = [
    ("timm_vit", "image"),
    ("open_clip", "image"),
    ("open_clip", "text"),
    ("hf_clip", "image"),
    ("hf_clip", "text"),
]
CASE_IDS = [f"{f}-{t}" for f, t in SIDE_CASES]


def _model(family: str = "timm_vit") -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family].make().eval()


def _perturb_up(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up." in name and "vleff_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _apply(method: str, model: torch.nn.Module, tower: str) -> None:
    if method == "lst":
        apply_lst(model, reduction=2, towers=tower)
    elif method == "unipt":
        apply_unipt(model, factor=2, towers=tower)
    else:
        apply_vqt(model, num_queries=2)


# --------------------------------------------------------------- nothing of the backbone is saved
def backbone_saved_tensors(model: torch.nn.Module, fn) -> list[tuple[int, ...]]:
    """Shapes of the saved-for-backward tensors of ``fn()`` that are activations of the backbone.

    Backbone activations: what the frozen tower computes *inside* its blocks (norms, attention
    projections, MLP hidden states: every token-stream ``[B, N, ...]`` output of a module below a
    block) and its final norm's output. The layer outputs a side network reads (each block's
    output, detached) are not among them: they are the inputs of the side network's own first
    layers (LST's ``Down_i``, UniPT's ``Lin_i``), saved for those weights' gradients by design.

    Provenance by storage: forward hooks record those outputs' storages and keep a reference to
    each, so no storage is freed and reused during ``fn`` (a reused address could not be told
    from the original). A saved tensor whose storage is one of them is a backbone activation.
    Only ``[B, N, ...]`` outputs count (``N``: the tower's input tokens): VQT runs its queries
    (``[B, T, ...]``) through the blocks' own modules, and those are side activations."""
    recorded: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    handles = []
    for tower in find_towers(model):

        def start(block, args, key=id(tower.root), seq_first=tower.sequence_first):
            tokens[key] = args[0].shape[0 if seq_first else 1]

        handles.append(tower.blocks()[0].register_forward_pre_hook(start))
        inner = [m for b in tower.blocks() for m in b.modules() if m is not b]
        norm, _ = common.final_norm(tower)
        for module in [*inner, norm]:

            def record(module, args, out, key=id(tower.root)):
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    # the token stream's [B, N, ...] (VQT's query path through the same modules is [B, T, ...])
                    if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[1] == tokens.get(key):
                        recorded[t.untyped_storage().data_ptr()] = t

            handles.append(module.register_forward_hook(record))
    flagged: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() in recorded:
            flagged.append(tuple(t.shape))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.backward()
    finally:
        for h in handles:
            h.remove()
    return flagged


@pytest.mark.parametrize("method", ["lst", "unipt"])
@pytest.mark.parametrize("family, tower", SIDE_CASES, ids=CASE_IDS)
def test_no_backbone_tensor_is_saved_for_backward_and_unfreezing_one_weight_is_caught(method, family, tower):
    model = _model(family)
    _apply(method, model, tower)
    _perturb_up(model)
    common.freeze_backbone(model)
    fwd = FAMILIES[family].forwards[tower]
    assert backbone_saved_tensors(model, lambda: fwd(model).square().mean()) == []
    assert all(p.grad is not None for m in common.side_modules(model) for p in m.parameters())  # the side trains
    # the check can fail: one unfrozen backbone weight puts the backbone's activations in the graph
    t = [t for t in find_towers(model) if t.modality == tower][0]
    fc1 = [m for m in t.blocks()[0].modules() if isinstance(m, torch.nn.Linear)][-1]
    fc1.weight.requires_grad_(True)
    assert backbone_saved_tensors(model, lambda: fwd(model).square().mean()) != []
    with pytest.raises(RuntimeError, match="needs a frozen backbone"):
        common.refuse_unfrozen_backbone(model, method.upper())


@pytest.mark.parametrize("family", ["timm_vit", "open_clip", "hf_clip"])
def test_no_backbone_tensor_is_saved_for_backward_under_vqt(family):
    model = _model(family)
    apply_vqt(model, num_queries=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vleff_vqt.proj" in name:
                p.normal_()
    common.freeze_backbone(model)
    fwd = FAMILIES[family].forwards["image"]
    assert backbone_saved_tensors(model, lambda: fwd(model).square().mean()) == []
    assert all(p.grad is not None for p in common.side_modules(model)[0].parameters())
    t = find_towers(model, "image")[0]
    [m for m in t.blocks()[1].modules() if isinstance(m, torch.nn.Linear)][-1].weight.requires_grad_(True)
    assert backbone_saved_tensors(model, lambda: fwd(model).square().mean()) != []


@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
def test_vqt_on_clip_image_towers_keeps_the_stream_and_starts_at_the_frozen_model(family):
    model = _model(family)
    t = find_towers(model, "image")[0]
    fwd = FAMILIES[family].forwards["image"]
    outs: list[torch.Tensor] = []
    for b in t.blocks():
        b.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    plain = _generic_forward(model, fwd)
    plain_stream, outs[:] = list(outs), []
    apply_vqt(model, num_queries=2)
    with torch.no_grad():
        torch.testing.assert_close(fwd(model), plain, atol=0, rtol=0)
        t.root.vleff_vqt.proj.weight.normal_()
        assert not torch.allclose(fwd(model), plain, atol=1e-4)
    for a, b in zip(outs[-len(plain_stream) :], plain_stream):  # the frozen token stream is untouched
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------- UniPT
class _Noop(TowerHook):
    name = "noop"


def _generic_forward(model, fwd):
    """The tower run through vleff's generic block (a no-op hook), the path UniPT runs on."""
    towers = find_towers(model)
    for t in towers:
        patch_tower(t).add_hook(_Noop())
    try:
        with torch.no_grad():
            return fwd(model)
    finally:
        for t in towers:
            unpatch_tower(t.root)


@pytest.mark.parametrize("family, tower", SIDE_CASES, ids=CASE_IDS)
def test_unipt_at_initialisation_equals_the_frozen_model_exactly(family, tower):
    model = _model(family)
    fwd = FAMILIES[family].forwards[tower]
    ref = _generic_forward(model, fwd)
    apply_unipt(model, towers=tower)
    with torch.no_grad():
        torch.testing.assert_close(fwd(model), ref, atol=0, rtol=0)
        _perturb_up(model)
        assert not torch.allclose(fwd(model), ref, atol=1e-4)  # and the side output reaches it


def _unipt_by_hand(module, layers, a, mask, rows):
    """The paper's formulas written out (per sample, explicit loops over tokens and layers)."""
    out = []
    for b in range(a.shape[0]):
        anchor = F.relu(a[b]) @ module.anchor.weight.T + module.anchor.bias
        ms, cs = [], []
        valid = [n for n in range(layers[0].shape[1]) if mask[b, n] > 0]
        for lin, h in zip(module.layers, layers):
            t = F.relu(h[b]) @ lin.weight.T + lin.bias  # [N, m]
            s = torch.stack([F.relu(anchor @ t[n]) for n in valid])
            w = s / s.sum().clamp_min(1e-6)
            ms.append(sum(w[j] * t[n] for j, n in enumerate(valid)) + t[rows[b]])
            mean = sum(t[n] for n in valid) / len(valid)
            cs.append((anchor * mean) @ module.confidence.weight[0] + module.confidence.bias[0])
        soft = torch.softmax(torch.stack(cs), 0)
        agg = sum(soft[i] * ms[i] for i in range(len(ms)))
        out.append(F.relu(agg) @ module.up.weight.T + module.up.bias)
    return torch.stack(out)


@pytest.mark.parametrize("family, tower", [("timm_vit", "image"), ("open_clip", "text")])
def test_unipt_correction_equals_the_formula_by_hand(family, tower):
    model = _model(family)
    t = [t for t in find_towers(model) if t.modality == tower][0]
    layers: list[torch.Tensor] = []
    t.blocks()[0].register_forward_pre_hook(lambda m, a: layers.append(a[0].detach().clone()))
    for block in t.blocks():
        block.register_forward_hook(lambda m, a, o: layers.append(o.detach().clone()))
    norm, _ = common.final_norm(t)
    plain: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda m, a, o: plain.append(o.detach().clone()))
    fwd = FAMILIES[family].forwards[tower]
    with torch.no_grad():
        fwd(model)
    handle.remove()
    seq_first = getattr(t, "sequence_first", False)
    layers = [h.transpose(0, 1) if seq_first else h for h in layers]
    apply_unipt(model, towers=tower)
    _perturb_up(model)
    fed: list[torch.Tensor] = []
    norm.register_forward_hook(lambda m, a, o: fed.append(o.detach().clone()))  # after UniPT's hook
    with torch.no_grad():
        fwd(model)
    b = plain[0].shape[0]
    if tower == "text":
        ids = tm.token_ids()
        rows = ids.argmax(dim=-1)
        mask = (torch.arange(ids.shape[1])[None] <= rows[:, None]).float()
    else:
        rows = torch.zeros(b, dtype=torch.long)
        mask = torch.ones(b, layers[0].shape[1])
    a = plain[0][torch.arange(b), rows]
    module = t.root.vleff_unipt
    with torch.no_grad():
        expected = _unipt_by_hand(module, layers, a, mask, rows)
    got = fed[0][torch.arange(b), rows] - a
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    other = fed[0].clone()
    other[torch.arange(b), rows] = plain[0][torch.arange(b), rows]
    torch.testing.assert_close(other, plain[0], atol=0, rtol=0)  # only the pooled row changes


# ----------------------------------------------------------------------------------------- LST
@pytest.mark.parametrize("family, tower", SIDE_CASES, ids=CASE_IDS)
def test_lst_side_blocks_at_reduction_1_are_the_backbone_blocks(family, tower):
    """With r = 1 every channel is kept (in order): each side block, initialised from the
    backbone, must compute exactly what the backbone block computes on the same input."""
    model = _model(family)
    t = [t for t in find_towers(model) if t.modality == tower][0]
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    for block in t.blocks():
        block.register_forward_pre_hook(lambda m, a: ins.append(a[0].detach().clone()))
        block.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    with torch.no_grad():
        FAMILIES[family].forwards[tower](model)
    if getattr(t, "sequence_first", False):
        ins, outs = [x.transpose(0, 1) for x in ins], [x.transpose(0, 1) for x in outs]
    apply_lst(model, reduction=1, towers=tower)
    side = t.root.vleff_lst
    assert len(side.blocks) == len(t.blocks())
    with torch.no_grad():
        for block, x, y in zip(side.blocks, ins, outs):
            torch.testing.assert_close(block(x), y, atol=1e-5, rtol=1e-4)
    assert all(torch.allclose(g, torch.full_like(g, 0.5)) for g in lst_gate_values(model))  # alpha = 0


def _stream_scores(model, square):
    score = 0
    for b in model.blocks:
        q, k, v = square(b.attn.qkv.weight).chunk(3)
        score = score + q.sum(0) + k.sum(0) + v.sum(0) + square(b.mlp.fc1.weight).sum(0)
        score = score + square(b.attn.proj.weight).sum(1) + square(b.mlp.fc2.weight).sum(1)
    return score


@pytest.mark.parametrize("init", ["magnitude", "fisher"])
def test_lst_keeps_the_most_important_channels(init):
    model = _model()
    fisher = None
    square = lambda w: w.detach().square()  # noqa: E731
    if init == "fisher":
        batches = [(tm.images(4, seed=s), torch.arange(4)) for s in range(2)]
        fisher = fisher_information(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        assert all(p.grad is None for p in model.parameters())  # restored
        square = lambda w: fisher[id(w)]  # noqa: E731
    apply_lst(model, reduction=4, init=init, fisher=fisher)
    keep = _stream_scores(model, square).topk(16).indices.sort().values
    side = model.vleff_lst
    torch.testing.assert_close(side.blocks[0].norm1.weight, model.blocks[0].norm1.weight[keep], atol=0, rtol=0)
    torch.testing.assert_close(side.norm.weight, model.norm.weight[keep], atol=0, rtol=0)
    b = model.blocks[1]
    attn_scores = sum(square(b.attn.qkv.weight).chunk(3)[i].sum(1) for i in range(3)) + square(b.attn.proj.weight).sum(
        0
    )
    attn = attn_scores.topk(16).indices.sort().values
    torch.testing.assert_close(side.blocks[1].proj.weight, b.attn.proj.weight[keep][:, attn], atol=0, rtol=0)
    if init == "fisher":  # a different importance picks different channels than magnitude
        other = _stream_scores(model, lambda w: w.detach().square()).topk(16).indices.sort().values
        assert not torch.equal(keep, other)


def test_side_heads_are_fewer_where_the_side_width_is_narrow():
    assert choose_side_heads(96, 12) == 6  # ViT-B, r = 8: 16 channels per head, not 8
    assert choose_side_heads(384, 12) == 12
    assert choose_side_heads(8, 4) == 1
    model = _model()
    apply_lst(model, reduction=2)  # 32 channels, backbone 4 heads -> 2 heads of 16
    assert model.vleff_lst.blocks[0].heads == 2


# ------------------------------------------------------------------------------------ refusals
def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match=r"reduction=3 does not divide the width 64"):
        apply_lst(_model(), reduction=3)
    with pytest.raises(ValueError, match=r"side_heads=3 does not divide the side width 16"):
        apply_lst(_model(), reduction=4, side_heads=3)
    with pytest.raises(ValueError, match="init='fisher' needs fisher="):
        apply_lst(_model(), init="fisher")
    with pytest.raises(ValueError, match=r"factor=3 does not divide the width 64"):
        apply_unipt(_model(), factor=3)
    for apply in (apply_lst, apply_unipt):
        with pytest.raises(TypeError, match="no supported"):
            apply(torch.nn.Linear(3, 3))
        model = tm.timm_deit_distilled()
        with pytest.raises(TypeError, match="does not support"):
            apply(model)
        assert not common.side_towers(model)
    with pytest.raises(ValueError, match="reduction"):
        vleff.callbacks.LadderSideTuning(reduction=0)
    with pytest.raises(ValueError, match="init='fisher'"):
        vleff.callbacks.LadderSideTuning(init="fisher")


class _Unfreezes(tl.TinyClassifier):
    def configure_optimizers(self):
        self.model.blocks[1].mlp.fc1.weight.requires_grad_(True)  # the user's code unfreezes a weight
        return super().configure_optimizers()


@pytest.mark.parametrize(
    "callback, label", [("LadderSideTuning", "LST"), ("UniPT", "UniPT"), ("VisualQueryTuning", "VQT")]
)
def test_callbacks_refuse_a_module_that_unfreezes_the_backbone(callback, label, tmp_path):
    trainer = tl.trainer(tmp_path, [getattr(vleff.callbacks, callback)()], max_steps=1)
    with pytest.raises(RuntimeError, match=rf"{label} needs a frozen backbone.*blocks\.1\.mlp\.fc1\.weight"):
        trainer.fit(_Unfreezes(), tl.loader(8))


# ------------------------------------------------------------------------------ side-only state
@pytest.mark.parametrize("method", ["lst", "unipt", "vqt"])
def test_side_state_dict_on_a_fresh_backbone_reproduces_the_trained_model(method):
    model = _model()
    _apply(method, model, "image")
    common.freeze_backbone(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = tm.images(4), torch.arange(4)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = vleff.side_state_dict(model)
    assert state and all(k.startswith(f"vleff_{method}.") or k.startswith("head.") for k in state)
    fresh = _model()  # the same backbone (same seed: a "pretrained" model loaded again)
    _apply(method, fresh, "image")
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        vleff.load_side_state_dict(fresh, state)
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    with pytest.raises(KeyError, match="apply the same side method"):
        vleff.load_side_state_dict(_model(), state)


@pytest.mark.parametrize("full", [False, True])
def test_lightning_checkpoints_hold_only_the_side_state_unless_asked(full, tmp_path):
    torch.manual_seed(1)
    trained = tl.TinyClassifier().model.state_dict()  # a bare model's weights: init_from loads them into the backbone
    torch.save(trained, tmp_path / "trained.pt")
    module = tl.TinyClassifier()
    trainer = tl.trainer(
        tmp_path, [vleff.callbacks.UniPT(full_checkpoint=full, init_from=tmp_path / "trained.pt")], max_steps=1
    )
    trainer.fit(module, tl.loader(4))
    assert torch.equal(module.model.blocks[2].mlp.fc2.weight, trained["blocks.2.mlp.fc2.weight"])  # frozen, loaded
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    keys = set(torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"])
    side = {k for k in module.state_dict() if "vleff_unipt." in k or k.startswith("model.head.")}
    assert keys == (set(module.state_dict()) if full else side)


def test_lst_mixin_applies_freezes_and_saves_side_only(tmp_path):
    from vleff.callbacks import LSTMixin

    class Module(LSTMixin, tl.TinyClassifier):
        def __init__(self):
            super().__init__()
            self.use_lst(reduction=4)

    module = Module()
    assert all(not p.requires_grad for p in module.model.blocks.parameters())
    trainer = tl.trainer(tmp_path, max_steps=1)
    trainer.fit(module, tl.loader(4))
    assert not module.model.blocks[0].training and module.model.vleff_lst.training
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    keys = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert keys and all("vleff_lst." in k or k.startswith("model.head.") for k in keys)


# ------------------------------------------------------------------------------ DDP (2 processes)
def _whole(params) -> dict[int, torch.Tensor | None]:
    return {id(p): None for p in params}


def _named(model: torch.nn.Module, names) -> dict[int, torch.Tensor | None]:
    params = dict(model.named_parameters())
    return {id(params[n]): None for n in names}


def _peft(method: str):
    from vleff.side.peft_tuners import adapter_parameters

    return lambda model: _whole(adapter_parameters(model, method))


def _fishmask(model: torch.nn.Module) -> dict[int, torch.Tensor | None]:
    from vleff.methods.fishmask import fishmask_masks
    from vleff.side.selection import holder

    params = dict(holder(model, "fishmask").named_parameters())  # the masks' names are the holder's
    return {id(params[n]): mask for n, mask in (fishmask_masks(model) or {}).items()}


def _xattn(model: torch.nn.Module) -> dict[int, torch.Tensor | None]:
    from vleff.methods.xattn import cross_attention_names, cross_attention_towers

    heads = [h for t in cross_attention_towers(model) for h in t.task_heads(model)]
    return {**_named(model, cross_attention_names(model)), **_whole(p for h in heads for p in h.parameters())}


def _method_api(name: str):
    import importlib

    return importlib.import_module(f"vleff.methods.{name}.core")


#: what each method trains, asked of the method's own API (``{id(parameter): entry mask or None
#: for the whole tensor}``): the DDP check's notion of "what may move", per method, never a name list
TRAINED: dict[str, Callable[[torch.nn.Module], dict[int, torch.Tensor | None]]] = {
    "LadderSideTuning": lambda m: _whole(_method_api("lst").lst_parameters(m)),
    "UniPT": lambda m: _whole(_method_api("unipt").unipt_parameters(m)),
    "VisualQueryTuning": lambda m: _whole(_method_api("vqt").vqt_parameters(m)),
    "LoRA": lambda m: _whole(_method_api("lora").lora_parameters(m)),
    **{cb: _peft(method) for cb, method in [("DoRA", "dora"), ("IA3", "ia3"), ("AdaLoRA", "adalora")]},
    **{cb: _peft(method) for cb, method in [("LoHa", "loha"), ("LoKr", "lokr"), ("OFT", "oft"), ("QLoRA", "qlora")]},
    "SerialAdapter": lambda m: _whole(_method_api("serial_adapter").serial_adapter_parameters(m)),
    "ParallelAdapter": lambda m: _whole(_method_api("parallel_adapter").parallel_adapter_parameters(m)),
    "VPT": lambda m: _whole(_method_api("vpt").vpt_parameters(m)),
    "PrefixTuning": lambda m: _whole(_method_api("prefix").prefix_parameters(m)),
    "APrompt": lambda m: _whole(_method_api("aprompt").aprompt_parameters(m)),
    "BitFit": lambda m: _named(m, _method_api("bitfit").bias_names(m)),
    "FishMask": _fishmask,
    "Xattn": _xattn,
    "LoRAHub": _peft("lorahub"),
}


class _SyncCheck(pl.Callback):
    """Per rank, after the steps: the trained parameters (those requiring grad) equal across ranks
    and changed; nothing moved but what the methods' own APIs say they train (``trained``: the
    :data:`TRAINED` readers of the methods in the run; FishMask: only its masked entries) and the
    classifier head; every parameter requiring grad is one of those. Written as three words to
    ``rank<i>.txt``: same across ranks, changed, only the expected moved."""

    def __init__(self, out_dir, trained: list[Callable[[torch.nn.Module], dict[int, torch.Tensor | None]]]):
        self.out_dir, self.trained = out_dir, trained

    def _allowed(self, pl_module) -> dict[int, torch.Tensor | None]:
        allowed: dict[int, torch.Tensor | None] = {}
        for read in self.trained:  # asked of the LightningModule: the callbacks apply to it or to its model
            allowed.update(read(pl_module))
        heads = [t.classifier_head() for t in find_towers(pl_module.model)]
        allowed.update(_whole(p for h in heads if h is not None for p in h.parameters()))
        return allowed

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        params = dict(pl_module.named_parameters())
        trained = [p for p in params.values() if p.requires_grad]
        flat = torch.cat([p.detach().flatten().float() for p in trained])
        gathered = trainer.strategy.all_gather(flat)
        same = bool(torch.equal(gathered[0], gathered[1]))
        before = torch.cat([self.start[n].flatten().float() for n, p in params.items() if p.requires_grad])
        allowed = self._allowed(pl_module)
        only = all(id(p) in allowed for p in trained)
        for name, p in params.items():
            moved = p.detach() != self.start[name]
            mask = allowed.get(id(p), False) if id(p) in allowed else torch.zeros_like(moved)
            if mask is not None and bool((moved & ~mask.to(moved.device)).any()):
                only = False
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(f"{same} {not torch.equal(flat, before)} {only}")


class _SkewMaskOnRankOne(pl.Callback):
    """Broken on purpose: rank 1 trains one entry FishMask's rank-0 selection does not (a rank
    that selected its own mask), after the callback broadcast rank 0's masks."""

    def on_train_start(self, trainer, pl_module):
        from vleff.methods.fishmask import fishmask_masks

        if trainer.global_rank == 1:
            masks = fishmask_masks(pl_module)
            name = next(n for n, m in masks.items() if not bool(m.all()))
            mask = masks[name].flatten()
            mask[int((~mask).nonzero()[0])] = True


def _ddp_fit(tmp_path, callbacks: dict[str, dict], module, loader, extra=()) -> list[str]:
    methods = [getattr(vleff.callbacks, name)(**settings) for name, settings in callbacks.items()]
    check = _SyncCheck(tmp_path, [TRAINED[name] for name in callbacks])
    trainer = tl.trainer(tmp_path, [*methods, *extra, check], max_steps=2, devices=2, strategy="ddp_fork")
    trainer.fit(module, loader)
    assert trainer.state.finished
    return [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]


DDP_CASES = {
    "lst": {"LadderSideTuning": {"reduction": 4}},
    "lora": {"LoRA": {"r": 4}},
    "unipt+vqt": {"UniPT": {"factor": 2}, "VisualQueryTuning": {"num_queries": 1}},
    "dora": {"DoRA": {"r": 4}},
    "ia3": {"IA3": {}},
    "adalora": {"AdaLoRA": {"init_r": 6, "target_r": 2, "total_step": 2}},
    "loha": {"LoHa": {"r": 4}},
    "lokr": {"LoKr": {"r": 2}},
    "oft": {"OFT": {"block_size": 16}},
    "qlora": {"QLoRA": {"r": 2, "scaler_block_size": 64}},
    "serial+parallel_adapter": {
        "SerialAdapter": {"bottleneck": 2, "train_norms": False},
        "ParallelAdapter": {"bottleneck": 2, "dropout": 0.0},
    },
    "vpt": {"VPT": {"num_tokens": 2}},
    "prefix": {"PrefixTuning": {"num_tokens": 2, "dropout": 0.0}},
    "aprompt": {"APrompt": {"kv_tokens": 2, "num_tokens": 1}},
    "bitfit": {"BitFit": {}},
    "fishmask": {"FishMask": {"keep_ratio": 0.05, "fisher_batches": 1}},
    # two rank-2 modules of the tiny ViT composed with given weights; the composite factors train
    "lorahub": {"LoRAHub": {**_lorahub_modules(tm.timm_vit(), "image"), "weights": (1.0, -0.5)}},
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
@pytest.mark.parametrize("case", list(DDP_CASES))
def test_side_and_peft_callbacks_under_two_process_ddp_gloo(case, tmp_path):
    assert _ddp_fit(tmp_path, DDP_CASES[case], tl.TinyClassifier(), tl.loader(16)) == ["True True True"] * 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_xattn_on_tiny_blip_under_two_process_ddp_gloo(tmp_path):
    assert _ddp_fit(tmp_path, {"Xattn": {}}, tl.TinyBLIP(), tl.blip_loader(8)) == ["True True True"] * 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_a_rank_with_its_own_fishmask_entry_is_caught(tmp_path):
    """The check itself, broken on purpose: rank 1 trains one entry more than rank 0's mask."""
    got = _ddp_fit(tmp_path, DDP_CASES["fishmask"], tl.TinyClassifier(), tl.loader(16), extra=[_SkewMaskOnRankOne()])
    assert got == ["False True True"] * 2  # the ranks' trained entries differ: not the same model any more


def test_remove_restores_the_library_model():
    model = _model()
    keys = list(model.state_dict())
    x = tm.images()
    with torch.no_grad():
        ref = model(x)
        apply_lst(model, reduction=4)
        apply_unipt(model)  # two side methods stack
        _perturb_up(model)
        assert not torch.allclose(model(x), ref)
        remove_lst(model)
        remove_unipt(model)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    assert list(model.state_dict()) == keys and not model.norm._forward_hooks and not model.head._forward_pre_hooks


def test_lst_mixin_takes_fisher_importance():
    from vleff.callbacks import LSTMixin

    class Module(LSTMixin, tl.TinyClassifier):
        def __init__(self, fisher_batches):
            super().__init__()
            fisher = fisher_information(self, fisher_batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
            self.use_lst(reduction=4, init="fisher", fisher=fisher)

    module = Module([(tm.images(4), torch.arange(4))])
    assert module.model.vleff_lst is not None
    assert all(not p.requires_grad for p in module.model.blocks.parameters())
    with pytest.raises(ValueError, match="init='fisher' needs fisher="):
        Module.__bases__[0].use_lst(tl.TinyClassifier(), init="fisher")
