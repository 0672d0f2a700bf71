"""MuE's decoder exit on BLIP's captioning text decoder, against its definition worked out here in
float64 with plain PyTorch on the model's weights: greedy decoding one token at a time; after
decoder layer ``l`` a sample leaves when ``cos(h_l, h_{l-1}) > tau_t`` (its new token, strict), the
remaining layers are skipped and their key/value cache entries for this position are set to the
exit layer's; the LM head reads the exited state. ``tau_t`` follows MuE's decay over the
generation. Also: threshold 1.0 is the library exactly, a full-sequence forward never exits, the
layer-wise loss (every layer through the shared head, summed), and bad settings."""

from __future__ import annotations

import copy
import math

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F

import vleff
from vleff.methods.mue import mue_decoder_loss, mue_decoder_threshold, mue_exit_blocks

LAYERS = 4
STEPS = 10
#: on :func:`_captioner`'s weights and :func:`_images`, the reference exits some steps after layer 1,
#: 2 and 3 and runs others through, and one sample of the batch never exits (checked in the test)
THRESHOLD = 0.92


def _captioner(seed: int = 0, spread: float = 0.8) -> torch.nn.Module:
    """A float64 tiny BLIP captioner with a 4-layer decoder whose layers move the new token's state
    by different amounts (random-init layers barely do), so some steps exit and others do not."""
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    config = tm.blip_config()
    config.text_config.num_hidden_layers = LAYERS
    model = BlipForConditionalGeneration(config).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.text_decoder.bert.encoder.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * spread / p.shape[1] ** 0.5)
        emb = model.text_decoder.bert.embeddings.word_embeddings.weight
        emb.copy_(torch.randn(emb.shape, generator=g, dtype=emb.dtype))
    return model


def _images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return tm.images(batch, seed=seed).double() * 3


# --- the reference: plain PyTorch on the model's weights ---------------------------------------
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], heads, -1).transpose(0, 1)  # [N, C] -> [H, N, Dh]


def _attend(q, k, v, heads: int) -> torch.Tensor:
    q, k, v = _heads(q, heads), _heads(k, heads), _heads(v, heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1)


def _ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _lin(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _reference(
    model, pixel_values, threshold: float, max_len: int, steps: int, fill_cache: bool = True, cosines=None, prompt=None
):
    """Each sample alone: the tokens (prompt, default ``[BOS]``, then greedy ones), per-step logits
    ``[steps, V]`` and layers run per step (``cosines``: a list that gets every cosine a step
    reached after a layer but the last). The prompt's tokens run one at a time and never exit (the
    library runs them as one forward); step ``t`` = 0 predicts the first new token."""
    text = model.text_decoder
    cfg = text.config
    heads, bos, sep, pad = cfg.num_attention_heads, cfg.bos_token_id, cfg.sep_token_id, cfg.pad_token_id
    emb = text.bert.embeddings
    layers = text.bert.encoder.layer
    with torch.no_grad():
        images = model.vision_model(pixel_values=pixel_values).last_hidden_state
    out = []
    for image in images:  # [M, C]
        cache_k, cache_v = [[] for _ in layers], [[] for _ in layers]
        tokens = list(prompt or [bos])
        done, logits, ran, first = False, [], [], len(tokens) - 1
        for position in range(first + steps):
            t = position - first  # negative: a prompt token before the last
            h = emb.word_embeddings.weight[tokens[position]] + emb.position_embeddings.weight[position]
            h = _ln(h[None], emb.LayerNorm)  # [1, C]
            tau = (
                1.0
                if threshold >= 1.0 or t < 0 or 3 * t < max_len
                else 0.9 * threshold + 0.1 * math.exp(-(t + 1) / (max_len + 1))
            )
            exit_at = len(layers)
            for i, layer in enumerate(layers):
                sa = layer.attention.self
                k, v = _lin(h, sa.key), _lin(h, sa.value)
                cache_k[i].append(k)
                cache_v[i].append(v)
                o = _attend(_lin(h, sa.query), torch.cat(cache_k[i]), torch.cat(cache_v[i]), heads)
                h1 = _ln(_lin(o, layer.attention.output.dense) + h, layer.attention.output.LayerNorm)
                ca = layer.crossattention.self
                o = _attend(_lin(h1, ca.query), _lin(image, ca.key), _lin(image, ca.value), heads)
                h2 = _ln(_lin(o, layer.crossattention.output.dense) + h1, layer.crossattention.output.LayerNorm)
                f = F.gelu(_lin(h2, layer.intermediate.dense))
                h3 = _ln(_lin(f, layer.output.dense) + h2, layer.output.LayerNorm)
                cos = float((h3 * h).sum() / (h3.norm() * h.norm()))
                h = h3
                if cosines is not None and i < len(layers) - 1:
                    cosines.append(cos)
                if i < len(layers) - 1 and cos > tau:
                    exit_at = i + 1
                    for j in range(i + 1, len(layers)):  # the skipped layers' cache: the exit layer's entry
                        cache_k[j].append(k if fill_cache else _lin(h, layers[j].attention.self.key))
                        cache_v[j].append(v if fill_cache else _lin(h, layers[j].attention.self.value))
                    break
            if t < 0:  # a prompt token: its prediction is not generated
                continue
            head = text.cls.predictions
            z = _ln(F.gelu(_lin(h, head.transform.dense)), head.transform.LayerNorm)
            logit = (z @ head.decoder.weight.T + head.bias)[0]
            logits.append(logit)
            ran.append(exit_at)
            token = pad if done else int(logit.argmax())
            done = done or token == sep
            tokens.append(token)
        out.append((torch.tensor(tokens), torch.stack(logits), ran))
    return out


def _generate(model, pixel_values, steps: int):
    with torch.no_grad():
        result = model.generate(
            pixel_values=pixel_values,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return result.sequences, torch.stack(result.logits, dim=1)


def _min_new_tokens_off(model):
    # min_new_tokens keeps every step's logits (no early stop) but masks EOS below it: the reference
    # takes the argmax of the raw logits, so EOS is made unreachable in both by a large negative bias
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[model.config.text_config.sep_token_id] = -1e4
    return model


@pytest.fixture(scope="module")
def captioner():
    return _min_new_tokens_off(_captioner())


def test_threshold_one_is_the_library_exactly(captioner):
    """decoder_threshold 1.0 never exits: tokens and every step's logits are the unpatched model's."""
    plain = copy.deepcopy(captioner)
    pixels = _images()
    want_tokens, want_logits = _generate(plain, pixels, STEPS)
    vleff.apply_mue(captioner, towers="all", decoder_threshold=1.0, decoder_max_length=STEPS)
    try:
        tokens, logits = _generate(captioner, pixels, STEPS)
        assert mue_exit_blocks(captioner)["text"].tolist() == [LAYERS] * 4
    finally:
        vleff.remove_mue(captioner)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(logits, want_logits)


@pytest.mark.parametrize("how", ["apply", "update", "generation_config"])
def test_generation_equals_the_float64_reference(captioner, how):
    """Per sample, per step: the exit layer, the cache of the skipped layers filled with the exit
    layer's entry, the head on the exited state: tokens and logits as the reference's. The settings
    given at apply, changed by ``vleff.update``, or ``max_len`` read from the decoder's
    ``generation_config`` (``max_length`` = the BOS prompt + STEPS)."""
    pixels = _images()
    threshold = THRESHOLD
    with torch.no_grad():
        reference = _reference(captioner, pixels, threshold, STEPS, STEPS)
    ran = [runs for _, _, runs in reference]
    assert {r for run in ran for r in run} == set(range(1, LAYERS + 1)), ran  # exits at every depth, and none
    assert any(set(run) == {LAYERS} for run in ran), ran  # a sample that never exits beside ones that do
    generation = captioner.text_decoder.generation_config
    kept = generation.max_length
    if how == "apply":
        vleff.apply_mue(captioner, towers="all", decoder_threshold=threshold, decoder_max_length=STEPS)
    elif how == "update":
        vleff.apply_mue(captioner, towers="all")
        vleff.update(captioner, "mue", decoder_threshold=threshold, decoder_max_length=STEPS)
    else:
        generation.max_length = STEPS + 1
        vleff.apply_mue(captioner, towers="all", decoder_threshold=threshold)
    try:
        tokens, logits = _generate(captioner, pixels, STEPS)
        last = mue_exit_blocks(captioner)["text"]
    finally:
        vleff.remove_mue(captioner)
        generation.max_length = kept
    for i, (want_tokens, want_logits, want_ran) in enumerate(reference):
        assert tokens[i].tolist() == want_tokens.tolist(), (i, tokens[i], want_tokens)
        torch.testing.assert_close(logits[i], want_logits.float(), rtol=1e-6, atol=1e-6)  # generate gives float32
        assert last[i].item() == want_ran[-1]


@pytest.mark.parametrize("threshold", [THRESHOLD, 0.945, -1.0])
def test_exited_samples_skip_the_remaining_layers_compute(captioner, threshold):
    """Each step runs layer ``j`` on the rows of the samples still in (rows counted at the layer's
    FFN), and a layer no sample runs (-1.0: all leave after layer 1) only gets its cache entries;
    the result stays the reference's. At 0.945 a sample leaves after layer 2 and runs every layer
    at the next step, which reads the exit layer's entries in layers 3 and 4 (not layer 1's)."""
    pixels = _images()
    with torch.no_grad():
        reference = _reference(captioner, pixels, threshold, STEPS, STEPS)
    want = [[sum(runs[t] > j for _, _, runs in reference) for j in range(LAYERS)] for t in range(STEPS)]
    seen: list[int] = []
    layers = captioner.text_decoder.bert.encoder.layer
    handles = [layer.intermediate.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0])) for layer in layers]
    vleff.apply_mue(captioner, towers="all", decoder_threshold=threshold, decoder_max_length=STEPS)
    try:
        tokens, logits = _generate(captioner, pixels, STEPS)
    finally:
        vleff.remove_mue(captioner)
        for handle in handles:
            handle.remove()
    assert seen == [rows for row in want for rows in row if rows], (seen, want)  # every layer run, step by step
    if threshold == 0.945:
        assert any(2 <= run[t] < LAYERS and run[t + 1] == LAYERS for _, _, run in reference for t in range(STEPS - 1))
    if threshold == -1.0:
        assert any(row[-1] == 0 for row in want)  # steps where no sample ran the last layers
    for i, (want_tokens, want_logits, _) in enumerate(reference):
        assert tokens[i].tolist() == want_tokens.tolist()
        torch.testing.assert_close(logits[i], want_logits.float(), rtol=1e-6, atol=1e-6)


def test_generation_after_a_prompt_counts_steps_from_the_first_new_token(captioner):
    """A prompt of several tokens runs as one forward without exits; the schedule's step 0 is the
    first generated token (the hook records the prompt's length at the step that starts the cache)."""
    pixels = _images()
    bos, sep = captioner.config.text_config.bos_token_id, captioner.config.text_config.sep_token_id
    prompt = [bos, 11, 12, 13]
    with torch.no_grad():
        reference = _reference(captioner, pixels, THRESHOLD, STEPS, STEPS, prompt=prompt)
    assert any(r < LAYERS for _, _, runs in reference for r in runs)
    vleff.apply_mue(captioner, towers="all", decoder_threshold=THRESHOLD, decoder_max_length=STEPS)
    try:
        with torch.no_grad():  # BLIP's generate drops the last prompt token (a [SEP]) and sets [BOS] first
            result = captioner.generate(
                pixel_values=pixels,
                input_ids=torch.tensor([[*prompt, sep]] * 4),
                max_new_tokens=STEPS,
                min_new_tokens=STEPS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        vleff.remove_mue(captioner)
    logits = torch.stack(result.logits, dim=1)
    for i, (want_tokens, want_logits, _) in enumerate(reference):
        assert result.sequences[i].tolist() == want_tokens.tolist()
        torch.testing.assert_close(logits[i], want_logits.float(), rtol=1e-6, atol=1e-6)


def test_skipped_layers_need_the_exit_layers_cache(captioner):
    """The reference without the cache fill (the skipped layers' keys computed from the exited state
    by their own projections) gives other logits: the fill is what later steps read."""
    pixels = _images()
    threshold = THRESHOLD
    with torch.no_grad():
        filled = _reference(captioner, pixels, threshold, STEPS, STEPS)
        unfilled = _reference(captioner, pixels, threshold, STEPS, STEPS, fill_cache=False)
    assert any(not torch.allclose(a[1], b[1], rtol=0, atol=1e-6) for a, b in zip(filled, unfilled))


def test_a_full_sequence_forward_never_exits(captioner):
    """Teacher forcing (no cache, every position at once) runs the library's forward unchanged, in
    eval as in training, at any threshold."""
    pixels = _images()
    ids = torch.randint(1, 90, (4, 8), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = captioner.config.text_config.bos_token_id
    with torch.no_grad():
        want = captioner(pixel_values=pixels, input_ids=ids).logits
        vleff.apply_mue(captioner, towers="all", decoder_threshold=-1.0)
        try:
            got = captioner(pixel_values=pixels, input_ids=ids).logits
            assert mue_exit_blocks(captioner)["text"].tolist() == [LAYERS] * 4
            with_prompt = captioner.generate(pixel_values=pixels, input_ids=ids[:, :5], max_new_tokens=1)
        finally:
            vleff.remove_mue(captioner)
        want_prompt = captioner.generate(pixel_values=pixels, input_ids=ids[:, :5], max_new_tokens=1)
    assert torch.equal(got, want)
    assert torch.equal(with_prompt, want_prompt)  # a prompt's forward: several tokens, no exit


@pytest.mark.parametrize("max_len", [1, 2, 3, 7, 16, 20])
def test_the_threshold_schedule(max_len):
    """tau_t = 1 for the first third of max_len (3t < max_len), then
    0.9 threshold + 0.1 exp(-(t+1)/(max_len+1)); threshold 1.0: always 1."""
    for threshold in (0.9, 0.7, -1.0):
        for t in range(max_len + 2):
            want = 1.0 if 3 * t < max_len else 0.9 * threshold + 0.1 * math.exp(-(t + 1) / (max_len + 1))
            assert mue_decoder_threshold(threshold, t, max_len) == pytest.approx(want, rel=0, abs=1e-15)
    assert all(mue_decoder_threshold(1.0, t, max_len) == 1.0 for t in range(max_len + 2))
    assert mue_decoder_threshold(0.9, 5, 12) == pytest.approx(0.81 + 0.1 * math.exp(-6 / 13))


def test_layerwise_loss_sums_every_layer_through_the_head(captioner):
    """mue_decoder_loss = sum over decoder layers of the LM head's (label-smoothed) next-token
    cross-entropy, worked out here by a loop over output_hidden_states; its last term is the
    library's own loss."""
    model = copy.deepcopy(captioner).train()
    pixels = _images()
    ids = torch.randint(1, 90, (4, 8), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = model.config.text_config.bos_token_id
    labels = ids.masked_fill(torch.arange(8) >= 6, -100)
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    out = model.text_decoder(
        input_ids=ids, encoder_hidden_states=image, labels=labels, output_hidden_states=True, reduction="mean"
    )
    assert len(out.hidden_states) == LAYERS + 1
    for smoothing in (0.0, 0.1):
        want = 0.0
        for h in out.hidden_states[1:]:
            logits = model.text_decoder.cls.predictions(h)[:, :-1]
            keep = labels[:, 1:] != -100
            logp = logits.log_softmax(-1)[keep]
            target = labels[:, 1:][keep]
            nll = -logp.gather(1, target[:, None]).squeeze(1)
            want = want + ((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean()
        got = mue_decoder_loss(model, out.hidden_states, labels, label_smoothing=smoothing)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    library = mue_decoder_loss(model.text_decoder, out.hidden_states[:1] + out.hidden_states[-1:], labels)
    torch.testing.assert_close(library, out.loss, rtol=1e-12, atol=1e-12)
    got.backward()  # trains every layer and the head
    assert model.text_decoder.bert.encoder.layer[0].attention.self.query.weight.grad is not None


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"decoder_threshold": 1.5}, r"decoder_threshold=1.5 is not allowed.*>= -1 and <= 1"),
        ({"decoder_threshold": -1.01}, "decoder_threshold=-1.01"),
        ({"decoder_threshold": float("nan")}, "decoder_threshold=nan"),
        ({"decoder_threshold": "0.9"}, "decoder_threshold='0.9'"),
        ({"decoder_threshold": None}, "decoder_threshold=None"),
        ({"decoder_max_length": 0}, "decoder_max_length=0 .* integer >= 1"),
        ({"decoder_max_length": 2.5}, "decoder_max_length=2.5"),
    ],
)
def test_bad_decoder_settings_name_the_setting_and_what_is_allowed(bad, match):
    with pytest.raises(ValueError, match=match):
        vleff.apply_mue(tm.hf_blip_captioning(), towers="all", **bad)
    with pytest.raises(ValueError, match=match):
        vleff.callbacks.MuE(**bad)


def test_mue_decoder_loss_refuses_a_model_without_an_lm_head():
    with pytest.raises(TypeError, match="language-model head"):
        mue_decoder_loss(tm.hf_blip_retrieval(), [torch.zeros(1, 2, 64)] * 2, torch.zeros(1, 2, dtype=torch.long))
