"""LoRAHub: the composite against a plain-PyTorch float64 merge of ``Σ wᵢBᵢ · Σ wᵢAᵢ``, ``w = 0``
is the base model exactly, the objective against an independent computation, a seeded search that
beats the base model and each single module, bad modules and settings refused naming what is
wrong, the callback and the mixin in a real ``Trainer``."""

from __future__ import annotations

import copy

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from families import FAMILIES

import vleff
from vleff.methods.lora import lora_state_dict
from vleff.methods.lorahub import apply_lorahub, lorahub_applied, lorahub_result, remove_lorahub

FORWARDS = [("timm_vit", "image"), ("open_clip", "image"), ("open_clip", "text"), ("hf_clip", "text")]
#: float64 forwards (the families' own forwards feed float32 images)
F64 = {
    ("timm_vit", "image"): lambda m: m(tm.images().double()),
    ("open_clip", "image"): lambda m: m.encode_image(tm.images().double()),
    ("open_clip", "text"): lambda m: m.encode_text(tm.token_ids()),
    ("hf_clip", "text"): lambda m: m.get_text_features(input_ids=tm.token_ids()).pooler_output,
}


def lora_modules(base: torch.nn.Module, seeds=(1, 2), r: int = 2, scale: float = 0.3, **settings) -> list[dict]:
    """LoRA modules of ``base`` as vleff's LoRA saves them (adapter-only state), with seeded
    random factors standing in for trained ones."""
    modules = []
    for seed in seeds:
        model = copy.deepcopy(base)
        vleff.apply_lora(model, r=r, train_head=False, **settings)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        modules.append(lora_state_dict(model))
    return modules


def merged_reference(base: torch.nn.Module, modules: list[dict], weights, alpha: float = 16.0) -> torch.nn.Module:
    """The base model with ``W + (alpha/r)·(Σ wᵢBᵢ)(Σ wᵢAᵢ)`` written into each target weight, in
    float64, from the modules' tensors alone (no peft, no vleff)."""
    merged = copy.deepcopy(base).double()
    params = dict(merged.named_parameters())
    for key in modules[0]:
        if ".lora_A." not in key:
            continue
        path = key.split(".lora_A.")[0]
        a = sum(w * m[key].double() for w, m in zip(weights, modules))
        b = sum(w * m[key.replace(".lora_A.", ".lora_B.")].double() for w, m in zip(weights, modules))
        name = f"{path}.weight" if f"{path}.weight" in params else f"{path}.in_proj_weight"
        with torch.no_grad():
            params[name].add_((alpha / a.shape[0]) * b @ a)
    return merged


@pytest.mark.parametrize("family, tower", FORWARDS, ids=[f"{f}-{t}" for f, t in FORWARDS])
def test_the_composite_is_the_sum_of_the_factors_merged_in_float64(family, tower):
    torch.manual_seed(0)
    base = FAMILIES[family].make().double().eval()
    fwd = F64[(family, tower)]
    modules = lora_modules(base, towers=tower)
    weights = (0.7, -0.4)
    model = copy.deepcopy(base)
    result = apply_lorahub(model, modules=modules, weights=weights)
    assert result.weights == weights and lorahub_result(model) is result
    with torch.no_grad():
        out, ref = fwd(model), fwd(merged_reference(base, modules, weights))
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        # the rule is the product of the sums (cross terms wᵢwⱼBᵢAⱼ), not peft's Σ wᵢ BᵢAᵢ
        per_module = copy.deepcopy(base)
        for w, m in zip(weights, modules):
            per_module = merged_reference(per_module, [m], (w,))
        assert (fwd(per_module) - ref).abs().max() > 1e-4


def test_zero_weights_are_the_base_model_exactly():
    torch.manual_seed(0)
    base = tm.timm_vit().eval()
    model = copy.deepcopy(base)
    apply_lorahub(model, modules=lora_modules(base), weights=(0.0, 0.0))
    x = tm.images(4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)


def test_one_module_at_weight_one_is_the_lora_model_it_came_from():
    """LoRAHub reads vleff's LoRA state as it is saved (its trained head left out, with a warning)."""
    torch.manual_seed(0)
    base = tm.timm_vit().eval()
    lora = copy.deepcopy(base)
    vleff.apply_lora(lora, r=2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"modules\[0\] also holds 2 entries .*head\.weight"):
        apply_lorahub(model, modules=[lora_state_dict(lora)], weights=(1.0,))
    x = tm.images(4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lora(x), atol=1e-6, rtol=1e-5)


def _batches(base, n: int = 16, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, tm.IMG, tm.IMG, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


@pytest.mark.parametrize("reference_loss", [False, True])
def test_the_objective_of_every_evaluation_is_the_loss_plus_the_l1_term(reference_loss):
    """Each recorded evaluation, recomputed from the merged float64 model and its weights:
    mean cross-entropy over the examples (or the official sum of batch means / n) + 0.05·mean|w|."""
    torch.manual_seed(0)
    base = tm.timm_vit(depth=2).eval()
    modules = lora_modules(base)
    batches = _batches(base)
    model = copy.deepcopy(base)
    result = apply_lorahub(model, modules=modules, examples=batches, budget=4, reference_loss=reference_loss)
    assert len(result.history) == 4 and result.losses == [h["loss"] for h in result.history]
    for entry in (result.history[0], result.history[-1]):
        w = entry["weights"]
        merged = merged_reference(base, modules, w)
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(merged(x.double()), y, reduction="none") for x, y in batches]
        n = sum(len(v) for v in losses)
        loss = (sum(v.mean() for v in losses) if reference_loss else sum(v.sum() for v in losses)) / n
        expected = float(loss) + 0.05 * sum(abs(v) for v in w) / len(w)
        assert entry["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert entry["objective"] == pytest.approx(expected, rel=1e-5)
    assert result.history[0]["weights"] == (0.0, 0.0)  # nevergrad starts at the init: the base model


def test_a_seeded_search_beats_the_base_model_and_each_single_module():
    """A task that mixes the two modules: labels given by the base model composed at w* = (0.9,
    0.6). The search (budget 40, seeded) lands below the base model and below either module alone
    in few-shot loss; a seeded search is reproducible."""
    torch.manual_seed(0)
    base = tm.timm_vit(depth=2).eval()
    modules = lora_modules(base, scale=0.5)
    x = torch.randn(16, 3, tm.IMG, tm.IMG, generator=torch.Generator().manual_seed(7))
    teacher = copy.deepcopy(base)
    apply_lorahub(teacher, modules=modules, weights=(0.9, 0.6))
    with torch.no_grad():
        labels = teacher(x).argmax(-1)
    batches = [(x, labels)]

    def loss_at(weights):
        m = copy.deepcopy(base)
        apply_lorahub(m, modules=modules, weights=weights)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(x), labels))

    model = copy.deepcopy(base)
    result = apply_lorahub(model, modules=modules, examples=batches, budget=40, seed=0)
    baselines = {"base": loss_at((0.0, 0.0)), "module 1": loss_at((1.0, 0.0)), "module 2": loss_at((0.0, 1.0))}
    assert all(result.loss < v for v in baselines.values()), (result.weights, result.loss, baselines)
    assert result.loss == pytest.approx(loss_at(result.weights), rel=1e-5)  # the model holds the weights found
    short = [apply_lorahub(copy.deepcopy(base), modules=modules, examples=batches, budget=8, seed=0) for _ in range(2)]
    assert short[0].weights == short[1].weights and short[0].losses == short[1].losses  # seeded: reproducible


def test_a_loss_fn_modules_from_files_and_a_lightning_prefix(tmp_path):
    torch.manual_seed(0)
    base = tm.timm_vit(depth=2).eval()
    modules = lora_modules(base)
    paths = []
    for i, m in enumerate(modules):  # one plain state dict, one Lightning checkpoint of a module holding the model
        path = tmp_path / f"m{i}.pt"
        torch.save(m if i == 0 else {"state_dict": {f"model.{k}": v for k, v in m.items()}}, path)
        paths.append(str(path))
    x = tm.images(4)
    calls = []

    def loss_fn(model):
        calls.append(1)
        return model(x).square().mean()

    model = copy.deepcopy(base)
    result = apply_lorahub(model, modules=paths, examples=loss_fn, budget=3, progress=True)
    assert len(calls) == 3 and len(result.history) == 3
    ref = merged_reference(base, modules, result.weights)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), ref(x.double()), atol=1e-5, rtol=1e-5)
    # a LightningModule holding the model: the bare model's keys gain its prefix
    holder = tl.TinyClassifier(depth=2)
    holder.model.load_state_dict(base.state_dict())
    apply_lorahub(holder, modules=modules, weights=(0.5, 0.5))
    assert lorahub_applied(holder.model)


def test_remove_restores_the_library_model_exactly():
    torch.manual_seed(0)
    base = tm.timm_vit().eval()
    model = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lorahub(model, modules=lora_modules(base), weights=(1.0, 1.0))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if "lora_" in n
    }  # train_head=False: only the composite factors train
    remove_lorahub(model)
    assert not lorahub_applied(model) and lorahub_result(model) is None
    assert list(model.state_dict()) == list(base.state_dict())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        torch.testing.assert_close(model(tm.images()), base(tm.images()), atol=0, rtol=0)


# --- bad input -----------------------------------------------------------------------------------
def test_modules_of_other_ranks_targets_or_bases_are_refused_naming_module_and_key():
    torch.manual_seed(0)
    base = tm.timm_vit().eval()
    m0, m1 = lora_modules(base)
    (rank4,) = lora_modules(base, seeds=(3,), r=4)
    shape = r"modules\[1\]'s lora_A of 'blocks\.0\.attn\.qkv' has shape \(4, 64\).*same targets and rank"
    with pytest.raises(ValueError, match=shape):
        apply_lorahub(copy.deepcopy(base), modules=[m0, rank4], weights=(1.0, 1.0))
    fewer = {k: v for k, v in m1.items() if not k.startswith("blocks.2.")}
    lacks = r"modules\[1\] has no lora_A factor for 'blocks\.2\.attn\.qkv', which modules\[0\] has"
    with pytest.raises(ValueError, match=lacks):
        apply_lorahub(copy.deepcopy(base), modules=[m0, fewer], weights=(1.0, 1.0))
    elsewhere = {k.replace("attn.qkv", "mlp.fc1"): v for k, v in m1.items()}
    with pytest.raises(ValueError, match=r"modules\[1\]'s LoRA factors of 'blocks\.0\.mlp\.fc1' adapt no LoRA target"):
        apply_lorahub(copy.deepcopy(base), modules=[m0, elsewhere], weights=(1.0, 1.0))
    (wider,) = lora_modules(tm.timm_vit(embed_dim=32), seeds=(4,))
    with pytest.raises(ValueError, match=r"modules\[0\]'s factors of 'blocks\.0\.attn\.qkv' .* do not fit its weight"):
        apply_lorahub(copy.deepcopy(base), modules=[wider], weights=(1.0,))
    dora = {**m0, "blocks.0.attn.qkv.lora_magnitude_vector.default.weight": torch.ones(192)}
    with pytest.raises(ValueError, match=r"modules\[0\] has .*lora_magnitude_vector.*not plain LoRA"):
        apply_lorahub(copy.deepcopy(base), modules=[dora], weights=(1.0,))
    with pytest.raises(ValueError, match=r"modules\[0\] holds no LoRA factor"):
        apply_lorahub(copy.deepcopy(base), modules=[{"head.weight": torch.zeros(10, 64)}], weights=(1.0,))
    with pytest.raises(TypeError, match=r"modules\[1\] is a int"):
        apply_lorahub(copy.deepcopy(base), modules=[m0, 3], weights=(1.0, 1.0))


def test_bad_settings_and_missing_input_are_refused_clearly():
    torch.manual_seed(0)
    base = tm.timm_vit().eval()
    modules = lora_modules(base)
    batches = _batches(base)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"modules=\[\] is not allowed"):
        apply_lorahub(model, modules=[], examples=batches)
    with pytest.raises(ValueError, match="modules is required"):
        apply_lorahub(model, examples=batches)
    with pytest.raises(ValueError, match="budget=0 is not allowed"):
        apply_lorahub(model, modules=modules, examples=batches, budget=0)
    with pytest.raises(ValueError, match="examples is required"):
        apply_lorahub(model, modules=modules)
    with pytest.raises(ValueError, match=r"examples=\[\] holds no batch"):
        apply_lorahub(model, modules=modules, examples=[])
    with pytest.raises(ValueError, match="weights=.* and examples were both given"):
        apply_lorahub(model, modules=modules, examples=batches, weights=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"weights=\(1\.0,\) has 1 entries for 2 modules"):
        apply_lorahub(model, modules=modules, weights=(1.0,))
    with pytest.raises(ValueError, match=r"weights\[1\]=nan"):
        apply_lorahub(model, modules=modules, weights=(1.0, float("nan")))
    assert not lorahub_applied(model)  # refused before anything changed
    with pytest.raises(TypeError, match="LoRAHub does not support"):
        apply_lorahub(tm.hf_blip_retrieval(), modules=modules, weights=(1.0, 1.0))


# --- Lightning -----------------------------------------------------------------------------------
def test_callback_composes_at_setup_and_a_later_setup_reuses_the_found_weights(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier(depth=2)
    modules = lora_modules(module.model)
    batches = _batches(module.model)
    callback = vleff.callbacks.LoRAHub(modules=modules, examples=batches, budget=4, remove_on_teardown=True)
    trainer = tl.trainer(tmp_path, [callback], max_steps=2, max_epochs=-1)
    trainer.fit(module, tl.loader(8, seed=1))
    assert callback.result is not None and len(callback.result.history) == 4
    assert not lorahub_applied(module.model)  # removed at teardown
    callback.setup(trainer, module, "validate")  # composes with the found weights, no search
    assert lorahub_result(module).weights == callback.result.weights
    assert lorahub_result(module).history == []
    with pytest.raises(ValueError, match="either examples .* or weights"):
        vleff.callbacks.LoRAHub(modules=modules)
    with pytest.raises(ValueError, match="modules=None is not allowed"):
        vleff.callbacks.LoRAHub(examples=batches)


def test_mixin_composes_in_init():
    from vleff.callbacks import LoRAHubMixin

    torch.manual_seed(0)
    base = tm.timm_vit(depth=2)
    modules = lora_modules(base)

    class Module(LoRAHubMixin, tl.TinyClassifier):
        def __init__(self):
            super().__init__(depth=2)
            self.model.load_state_dict(base.state_dict())
            self.result = self.use_lorahub(modules, weights=(0.5, -0.5))

    made = Module()
    assert lorahub_applied(made.model) and made.result.weights == (0.5, -0.5)
