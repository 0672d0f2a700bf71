"""Model pairs: the embeddings, pooling position and temperature must be the library's own."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F

from vleff.backbones import TowerHook, find_pair, find_towers, get_patch, patch_tower
from vleff.backbones.pairs import PairContext, pair_context


def _clip_ids():
    return tm.token_ids()


PAIRS = {
    "open_clip": tm.open_clip_model,
    "hf_clip": tm.hf_clip_model,
    "blip_retrieval": tm.hf_blip_retrieval,
    "blip_captioning": tm.hf_blip_captioning,
    "blip_vqa": tm.hf_blip_vqa,
}


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["open_clip", "hf_clip"])
def test_clip_embeddings_equal_the_library_methods(name):
    torch.manual_seed(0)
    model = PAIRS[name]().eval()
    pair = find_pair(model)
    images, ids = tm.images(), _clip_ids()
    mask = (ids != 0).long()
    with torch.no_grad():
        if name == "open_clip":
            ref_img, ref_txt = model.encode_image(images), model.encode_text(ids)
        else:
            ref_img = model.get_image_features(pixel_values=images).pooler_output
            ref_txt = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        _exact(pair.encode_image(images), ref_img)
        _exact(pair.encode_text(ids, mask), ref_txt)
        _exact(pair.encode_image(images, normalize=True), F.normalize(ref_img, dim=-1))
        if name == "hf_clip":  # the library's own forward: its logits from the same embeddings
            out = model(input_ids=ids, pixel_values=images, attention_mask=mask)
            _exact(pair.encode_text(ids, mask, normalize=True), out.text_embeds)
            _exact(pair.encode_image(images, normalize=True), out.image_embeds)
    assert pair.logit_scale is model.logit_scale
    assert pair.image_tower.modality == "image" and pair.text_tower.modality == "text"


def test_blip_retrieval_embeddings_are_the_itc_path():
    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().eval()
    pair = find_pair(model)
    ids, mask = tm.blip_token_ids()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=tm.images(), attention_mask=mask, use_itm_head=False).itm_score
        sim = pair.encode_image(tm.images(), normalize=True) @ pair.encode_text(ids, mask, normalize=True).t()
    _exact(sim, ref)
    assert pair.logit_scale is None
    assert pair.text_tower.root is model.text_encoder and pair.image_tower.root is model.vision_model


@pytest.mark.parametrize("name", ["blip_captioning", "blip_vqa"])
def test_blip_generative_models_pair_their_unimodal_text_tower(name):
    torch.manual_seed(0)
    model = PAIRS[name]().eval()
    pair = find_pair(model)
    text_root = model.text_decoder.bert if name == "blip_captioning" else model.text_encoder
    assert pair.text_tower.root is text_root
    ids, mask = tm.blip_token_ids()
    with torch.no_grad():
        _exact(pair.encode_text(ids, mask), text_root(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
        _exact(pair.encode_image(tm.images()), model.vision_model(pixel_values=tm.images()).last_hidden_state[:, 0])
    assert pair.logit_scale is None


def test_eot_index_is_where_the_library_pools():
    from open_clip.transformer import text_global_pool

    ids = _clip_ids()
    b, n = ids.shape
    # open_clip: its own pooling function applied to token positions returns the pooled position
    model = tm.open_clip_model()
    positions = torch.arange(n, dtype=torch.float32)[None, :, None].expand(b, n, 1)
    pooled = text_global_pool(positions, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    _exact(find_pair(model).eot_index(ids), pooled[:, 0].long())
    # Hugging Face CLIP: pooler_output is the last hidden state at the pooled position
    model = tm.hf_clip_model().eval()
    with torch.no_grad():
        out = model.text_model(input_ids=ids)
    eot = find_pair(model).eot_index(ids)
    assert eot.tolist() == [4, 7]
    _exact(out.last_hidden_state[torch.arange(b), eot], out.pooler_output)
    # BLIP: the ITC projection reads token 0
    model = tm.hf_blip_retrieval().eval()
    blip_ids, mask = tm.blip_token_ids()
    pair = find_pair(model)
    with torch.no_grad():
        hidden = model.text_encoder(input_ids=blip_ids, attention_mask=mask).last_hidden_state
        at = pair.eot_index(blip_ids)
        _exact(model.text_proj(hidden[torch.arange(b), at]), pair.encode_text(blip_ids, mask))


class Recorder(TowerHook):
    """Reads, from the text tower, the image tower's state of the same step."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[PairContext | None, object]] = []

    def start(self, x, state):
        ctx = pair_context(state)
        self.seen.append((ctx, None if ctx is None else ctx.states.get("image")))
        return x


@pytest.mark.parametrize("name", list(PAIRS))
def test_context_is_one_object_on_both_patches_and_links_the_towers(name):
    torch.manual_seed(0)
    model = PAIRS[name]().eval()
    pair = find_pair(model)
    recorder = Recorder()

    class Noop(TowerHook):
        name = "noop"

    patch_tower(pair.image_tower).add_hook(Noop())
    patch_tower(pair.text_tower).add_hook(recorder)
    image_patch, text_patch = get_patch(pair.image_tower.root), get_patch(pair.text_tower.root)
    ids, mask = tm.blip_token_ids() if name.startswith("blip") else (_clip_ids(), None)
    with torch.no_grad():
        with pair.context() as ctx:
            assert image_patch.context is ctx and text_patch.context is ctx
            pair.encode_image(tm.images())
            pair.encode_text(ids, mask)
            text_state = text_patch.state
        assert image_patch.context is None and text_patch.context is None
        pair.encode_text(ids, mask)  # outside: no context
    (inside, image_state), (outside, _) = recorder.seen
    assert inside is ctx and image_state is image_patch.state and ctx.states["text"] is text_state
    assert outside is None
    with pair.context() as second:
        assert second is not ctx and not second.states


@pytest.mark.parametrize("model", [lambda: tm.timm_vit(), lambda: torch.nn.Linear(2, 2)], ids=["timm_vit", "linear"])
def test_not_a_pair_names_the_class(model):
    m = model()
    with pytest.raises(TypeError, match=rf"{type(m).__name__} is not an image-text model pair.*CLIPModel"):
        find_pair(m)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        find_pair("model")


def test_pair_towers_are_the_ones_find_towers_lists():
    for name, make in PAIRS.items():
        model = make()
        pair = find_pair(model)
        roots = [t.root for t in find_towers(model)]
        assert pair.image_tower.root in roots and pair.text_tower.root in roots, name


@pytest.mark.parametrize("name", ["open_clip", "hf_clip"])
def test_clip_finetuner_encodes_through_the_pair_as_the_library_does(name):
    from vleff.models.clip_finetuner import CLIPFineTuner

    torch.manual_seed(0)
    model = PAIRS[name]().eval()
    tuner = CLIPFineTuner(model)
    ids = _clip_ids()
    with torch.no_grad():
        if name == "open_clip":
            ref_img, ref_txt = model.encode_image(tm.images(), normalize=True), model.encode_text(ids, normalize=True)
        else:
            out = model(input_ids=ids, pixel_values=tm.images(), attention_mask=(ids != 0).long())
            ref_img, ref_txt = out.image_embeds, out.text_embeds
        img, txt = tuner(tm.images(), ids)
    _exact(img, ref_img)
    _exact(txt, ref_txt)
    assert tuner.logit_scale is model.logit_scale and tuner.pair.model is model


def test_clip_finetuner_refuses_pairs_without_a_temperature_naming_the_class():
    from vleff.models.clip_finetuner import CLIPFineTuner

    with pytest.raises(TypeError, match="BlipForImageTextRetrieval is neither an open_clip CLIP nor a Hugging Face"):
        CLIPFineTuner(tm.hf_blip_retrieval())
    with pytest.raises(TypeError, match="VisionTransformer is neither"):
        CLIPFineTuner(tm.timm_vit())


def test_pair_encoder_is_the_library_path_and_refuses_bad_input():
    """``PairEncoder`` (what vleff-bench measures): the image path is the library's
    ``get_image_features``, the text path its ``get_text_features`` with the zero-padding mask."""
    from vleff.backbones.pairs import PairEncoder, caption_mask

    torch.manual_seed(0)
    model = tm.hf_clip_model().eval()
    images, ids = tm.images(), _clip_ids()
    with torch.no_grad():
        _exact(PairEncoder(model)(images), model.get_image_features(pixel_values=images).pooler_output)
        _exact(
            PairEncoder(model, path="text")(ids),
            model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output,
        )
    assert caption_mask(torch.tensor([[5, 7, 0, 0]])).tolist() == [[1, 1, 0, 0]]
    with pytest.raises(ValueError, match="path='audio' is not allowed; use 'image' or 'text'"):
        PairEncoder(model, path="audio")
    with pytest.raises(TypeError):
        PairEncoder(tm.timm_vit())


def _last_block_outputs(pair, run) -> dict[str, torch.Tensor]:
    """Each tower's last block output (raw, in the blocks' own layout) during ``run()``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for tower in (pair.image_tower, pair.text_tower):

        def grab(block, args, output, modality=tower.modality):
            seen[modality] = output[0] if isinstance(output, tuple) else output

        handles.append(tower.blocks()[-1].register_forward_hook(grab))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize(
    "name, pool",
    [
        ("open_clip", "argmax"),
        ("open_clip", "eos"),
        ("hf_clip", None),
        ("blip_retrieval", None),
        ("blip_captioning", None),
    ],
)
def test_embed_block_output_of_the_last_block_is_the_library_embedding(name, pool):
    """The seam an early exit reads (MuE's contrastive exit loss): the library's pooling, final norm
    and projection applied to a block's output. Checked on the last block, where it must give
    exactly what the library's own encode path gives; open_clip also with its ``eos`` pooling."""
    torch.manual_seed(0)
    model = PAIRS[name]().double().eval()
    pair = find_pair(model)
    if name.startswith("blip"):
        ids, mask = tm.blip_token_ids()
    else:
        ids = _clip_ids()
        mask = (ids != 0).long()
    if pool == "eos":  # pool at the first id 5: not the largest id, so argmax pooling would differ
        model.text_pool_type, model.text_eos_id = "eos", 5
        ids = ids.clone()
        ids[:, 3] = 5
    images = tm.images().double()
    with torch.no_grad():
        embeddings = {}
        seen = _last_block_outputs(
            pair,
            lambda: embeddings.update(image=pair.encode_image(images), text=pair.encode_text(ids, mask)),
        )
        for modality in ("image", "text"):
            got = pair.embed_block_output(modality, seen[modality], ids if modality == "text" else None)
            torch.testing.assert_close(got, embeddings[modality], rtol=0, atol=1e-12)


def test_embed_block_output_refuses_what_it_cannot_read():
    pair = find_pair(tm.open_clip_model())
    tokens = torch.zeros(2, 5, 8)
    with pytest.raises(ValueError, match="modality='audio' is not allowed"):
        pair.embed_block_output("audio", tokens)
    with pytest.raises(ValueError, match="needs the token ids"):
        pair.embed_block_output("text", tokens)
